"""``python -m m3dm.compare --methods M1 M2 ... [main.py flags]``: several methods on the same classes, one after
the other, each in a process of its own, then one table per metric and the time and memory of each.

Every method writes a normal results folder, ``<output_dir>/<method>/`` (``results.json``, ``per_sample.csv``, the
tables; ``--save_model`` puts its models there too), and ``resources.json`` with its peak memory. The comparison is
``<output_dir>/comparison.md`` and ``comparison.json``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from pathlib import Path

from m3dm.app.cli import build_parser as main_parser
from m3dm.app.cli import parse_flags
from m3dm.app.console import interrupted
from m3dm.app.lock import output_lock
from m3dm.config import METHODS, settings_from_flags
from m3dm.errors import ConfigError, DiskFullError, OutputInUseError
from m3dm.evaluation.comparison import comparison_markdown, comparison_record, read_method_run, write_comparison
from m3dm.report.build import COMPARISON_NAME, build_report

log = logging.getLogger(__name__)

FORBIDDEN = {"--method_name": "give the methods with --methods",
             "--memory_bank": "each method runs with the reference's --memory_bank for it",
             "--demo": "run `python main.py --demo` once and compare on its data with --dataset_path",
             "--save_feature": "dumping UFF pretraining features is main.py's job"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m m3dm.compare",
        description="Run several methods on the same classes (each in its own process) and compare them: one "
                    "table per metric, seconds per test sample and peak memory, in <output_dir>/comparison.md "
                    "and comparison.json. Every other flag is main.py's and applies to every method.")
    parser.add_argument("--methods", nargs="+", required=True, choices=tuple(METHODS), metavar="METHOD",
                        help=f"methods to run, in this order: {', '.join(METHODS)}")
    return parser


def method_folder(output_dir: Path, method: str) -> Path:
    return output_dir / method


def method_argv(method: str, main_flags: list[str], output_dir: Path, classes: list[str] | None = None) -> list[str]:
    """main.py's flags for one method: the shared ones (less ``--use_uff``, given to the methods that need the
    UFF block only), then the method, its memory bank, folder and classes (given last, argparse keeps them)."""
    spec = METHODS[method]
    shared = [flag for flag in _without_output_dir(main_flags) if flag != "--use_uff"]
    return [*shared, *(["--use_uff"] if spec.needs_uff else []), "--method_name", method,
            "--memory_bank", spec.memory_bank, "--output_dir", str(method_folder(output_dir, method)),
            *(["--classes", *classes] if classes else [])]


def _without_output_dir(flags: list[str]) -> list[str]:
    """``flags`` less ``--output_dir DIR`` / ``--output_dir=DIR`` (each method has its own folder)."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag == "--output_dir":
            skip = True
        elif not flag.startswith("--output_dir="):
            kept.append(flag)
    return kept


def _method_settings(parser: argparse.ArgumentParser, main_flags: list[str], methods: list[str]):
    """The settings of each method's run, checked as main.py checks them before any method runs (the output
    folder, dataset and classes are every method's)."""
    for flag in main_flags:
        name = flag.split("=", 1)[0]
        if name in FORBIDDEN:
            parser.error(f"{name} cannot be given to the comparison: {FORBIDDEN[name]}")
    settings = {}
    for method in methods:
        argv = method_argv(method, main_flags, Path("."))
        try:
            settings[method] = settings_from_flags(parse_flags(argv, main_parser()))  # --config's file included
            settings[method].validate()
        except ConfigError as exc:
            parser.error(f"{method}: {exc}")
    return settings


def _shared_settings(main_flags: list[str]):
    """What main.py's flags say about every method's run: output folder, dataset, classes."""
    return settings_from_flags(parse_flags(main_flags, main_parser()))


def run_method(method: str, argv: list[str]) -> int:
    """One method's main.py in a process of its own (m3dm.app.measured); its output goes to this terminal."""
    command = [sys.executable, "-m", "m3dm.app.measured", *argv]
    print(f"\n=== {method}: {shlex.join(['python', 'main.py', *argv])}", flush=True)
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    from m3dm.app.run import dataset_classes  # here: the pipeline is heavy to import and the runs are subprocesses

    parser = build_parser()
    args, main_flags = parser.parse_known_args(argv)
    methods = list(dict.fromkeys(args.methods))  # each method once, in the order given
    _method_settings(parser, main_flags, methods)
    shared = _shared_settings(main_flags)
    output_dir = Path(shared.run.output_dir)
    classes = dataset_classes(shared.run)
    if not classes:
        parser.error(f"no class found under --dataset_path {shared.run.dataset_path}")
    try:
        with output_lock(output_dir, "--output_dir"):
            return compare(methods, main_flags, output_dir, classes)
    except (DiskFullError, OutputInUseError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted(parser.prog, f"the classes each method finished are kept in {output_dir}/<method>/"
                                        f"classes; run the same command with --resume to run the others")


def compare(methods: list[str], main_flags: list[str], output_dir: Path, classes: list[str]) -> int:
    """Run every method, then write and print the comparison; 1 when a method failed."""

    runs = []
    for method in methods:
        status = run_method(method, method_argv(method, main_flags, output_dir, classes))
        runs.append(read_method_run(method, method_folder(output_dir, method), status))
    paths = write_comparison(output_dir, runs, classes)
    print("\n" + comparison_markdown(comparison_record(runs, classes)))
    print(f"comparison written to {paths['md']} and {paths['json']}")
    folders = [method_folder(output_dir, r.method) for r in runs if r.exit_status == 0]
    if len(folders) > 1:
        report = _side_by_side_report(folders, output_dir)
        again = f"python -m m3dm.report {' '.join(shlex.quote(str(f)) for f in folders)}"
        print(f"side-by-side report: {report} (again: {again})" if report else f"build it with: {again}")
    failed = [r.method for r in runs if r.exit_status != 0]
    if failed:
        print(f"failed: {', '.join(failed)} (see their messages above)", file=sys.stderr)
        return 1
    return 0


def _side_by_side_report(folders: list[Path], output_dir: Path) -> Path | None:
    """``<output_dir>/comparison.html`` of the methods' results folders; a failure is logged, not raised (the
    tables are written already)."""
    try:
        return build_report(folders, output_dir / COMPARISON_NAME)
    except DiskFullError:
        raise  # the comparison must not look complete
    except Exception:
        log.exception("the side-by-side report could not be built")
        return None


if __name__ == "__main__":
    sys.exit(main())
