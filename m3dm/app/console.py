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


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Messages of the ``m3dm`` loggers (and Python warnings) on stderr: information by default, warnings and
    errors only with ``quiet``, debug messages with ``verbose``."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    for name in ("m3dm", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    logging.captureWarnings(True)
