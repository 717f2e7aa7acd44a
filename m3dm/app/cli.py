"""The ``m3dm`` command (``main.py``): flags parsed once into ``Settings`` and validated, then the run.

The flags are ``m3dm.config``'s plus -v/-q; the run is ``m3dm.app.run``'s. A wrong input file (data, weights, a
fitted model) is reported in one line with exit status 2. ``m3dm check ROOT ...`` is the dataset check
(``python -m m3dm.data check``).

``--config FILE`` reads settings from a YAML file (``m3dm.config.read_settings_file``: unknown keys and values of
the wrong type are refused in one line); flags given on the command line override it. ``--print_config`` writes
the whole configuration, defaults included, as YAML and exits; every run writes the same to
``<output_dir>/config.yaml`` (``m3dm.app.run``).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from m3dm.app.console import add_logging_flags, configure_logging, interrupted, is_main_process
from m3dm.app.dataset_check import main as check_main
from m3dm.app.demo import prepare_demo
from m3dm.app.lock import output_lock
from m3dm.config import Settings, read_settings_file, settings_from_flags, settings_yaml
from m3dm.config import build_parser as settings_parser
from m3dm.errors import CheckpointError, ConfigError, DataError, DiskFullError, ModelFileError, OutputInUseError


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the reference with its name and default, the added ones, -v/-q, --config and
    --print_config."""
    parser = add_logging_flags(settings_parser())
    files = parser.add_argument_group("configuration files (docs/api.md)")
    files.add_argument("--config", metavar="FILE",
                       help="read the settings from this YAML file (one 'flag_name: value' per line, as "
                            "--print_config and every run's <output_dir>/config.yaml write them); flags given on "
                            "the command line override it")
    files.add_argument("--print_config", action="store_true",
                       help="write the whole configuration (--config's file and the flags given, every other "
                            "setting at its default) as YAML to stdout and exit")
    return parser


def parse_flags(argv: list[str] | None, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The flags of a command line over the settings of its ``--config`` file (ConfigError naming the file for
    an unknown key or a value of the wrong type)."""
    flags = parser.parse_args(argv)
    if flags.config is not None:
        parser.set_defaults(**read_settings_file(flags.config))  # the file replaces the defaults, flags win
        flags = parser.parse_args(argv)
    return flags


def parse_settings(argv=None, parser: argparse.ArgumentParser | None = None) -> tuple[Settings, argparse.Namespace]:
    """The validated settings of a command line (with ``--demo``, the demo's) and the parsed flags; an invalid
    combination exits with the parser's usage message and what to use instead. With ``--print_config`` the
    settings are returned as given, unchecked (the defaults alone are not a runnable combination)."""
    parser = parser or build_parser()
    flags = parse_flags(argv, parser)
    configure_logging(flags.verbose, flags.quiet)
    settings = settings_from_flags(flags)
    if flags.print_config:
        return settings, flags
    if settings.run.demo:
        settings = prepare_demo(settings, progress=not flags.quiet)
    try:
        settings.validate()
    except ConfigError as exc:
        parser.error(str(exc))
    return settings, flags


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:  # ``m3dm check ROOT``: the dataset check (python -m m3dm.data check)
        return check_main(argv)
    parser = build_parser()
    try:
        settings, flags = parse_settings(argv, parser)
    except ConfigError as exc:  # a --config file's key or value: one line naming the file and the key
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if flags.print_config:
        sys.stdout.write(settings_yaml(settings))
        return 0
    from m3dm.app.run import run_classes  # here: the pipeline (torch, timm, ...) loads after the flags are checked

    output_dir = settings.run.output_dir
    # one run at a time in --output_dir (process 0 holds the lock for a torchrun launch)
    lock = output_lock(output_dir, "--output_dir") if is_main_process() else nullcontext()
    try:
        with lock:
            run_classes(settings, progress=not flags.quiet)
    except (DataError, CheckpointError, ModelFileError, ConfigError, DiskFullError, OutputInUseError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)  # a wrong input, a full disk: say which file
        return 2
    except KeyboardInterrupt:
        return interrupted(parser.prog, f"the classes finished so far are kept in {Path(output_dir) / 'classes'}; "
                                        f"run the same command with --resume to run the others")
    return 0


if __name__ == "__main__":
    sys.exit(main())
