"""What every command line shares: the -v/--verbose and -q/--quiet flags and the logging set-up they choose."""

from __future__ import annotations

import argparse
import logging
import sys


def add_logging_flags(parser: argparse.ArgumentParser, quiet_help: str = "only warnings and errors, no progress "
                                                                          "bars") -> argparse.ArgumentParser:
    """Add ``-v/--verbose`` (repeatable) and ``-q/--quiet`` to ``parser``."""
    group = parser.add_argument_group("messages")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="more messages: -v adds the library's debug messages with their origin")
    group.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment a message comes (a test or a progress bar may replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Messages of the ``m3dm`` loggers (and Python warnings) on stderr: information by default, warnings and
    errors only with ``quiet``, debug messages with ``verbose``. Calling it again replaces the earlier set-up."""
    shown = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = _StderrHandler()
    handler.setLevel(shown)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _StderrHandler)] + [handler]
    # records of the package pass on to the root's handlers (and to anything else listening there)
    logging.getLogger("m3dm").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


EXIT_INTERRUPTED = 130  # what a shell reports for a program stopped by Ctrl-C (128 + SIGINT)


def interrupted(prog: str, kept: str) -> int:
    """Ctrl-C: one line (no traceback) saying what was kept and how to go on; returns ``EXIT_INTERRUPTED``."""
    print(f"\n{prog}: interrupted: {kept}", file=sys.stderr)
    return EXIT_INTERRUPTED


class Terminated(BaseException):
    """SIGTERM, raised where the process is (``raise_on_sigterm``): a launcher such as torchrun stops the other
    processes that way when one of them failed."""


def raise_on_sigterm() -> None:
    """Turn SIGTERM into ``Terminated`` so that a command can say in one line what it keeps before it ends."""
    import signal

    def stop(_signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one would break the clean-up of the first
        raise Terminated()

    signal.signal(signal.SIGTERM, stop)


def is_main_process() -> bool:
    """Whether this process is the only one or rank 0 of a torchrun launch (the one that holds output locks)."""
    import os

    return os.environ.get("RANK", "0") == "0"
