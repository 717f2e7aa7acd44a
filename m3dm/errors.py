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


class DiskFullError(M3DMError, OSError):
    """A file could not be written because its disk (or the user's quota) is full; the message names the file.
    Nothing half-written is left in its place (``m3dm.data.io``)."""


class OutputInUseError(M3DMError, RuntimeError):
    """Another run is writing the same output folder (its lock file names the process and its command)."""
