"""Every exception the package raises on purpose: each means "this input is wrong" and names it.

The command lines report them in one line (exit status 2) instead of a traceback.
"""


class M3DMError(Exception):
    """Base of the errors below."""


class ConfigError(M3DMError, ValueError):
    """A setting or a combination of settings that cannot run; the message says what to use instead."""


class DataError(M3DMError, ValueError):
    """A dataset file is missing, unreadable or does not hold what the format requires."""


class CheckpointError(M3DMError, RuntimeError):
    """A weight file that is missing, unreadable or of the wrong architecture (the message names it)."""


class ModelFileError(M3DMError, RuntimeError):
    """A fitted-model file is missing, unreadable, damaged, of another version, or does not match the run."""


class FeatureDumpError(M3DMError, ValueError):
    """A missing, empty or inconsistent folder of UFF pretraining feature dumps."""
