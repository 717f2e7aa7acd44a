"""Errors that mean "this input file is wrong": main.py and the other commands report them in one line."""


class CheckpointError(RuntimeError):
    """A weight file that is missing, unreadable or of the wrong architecture (the message names it)."""
