"""``python -m m3dm.report RESULTS_DIR [RESULTS_DIR ...]`` (``m3dm-report``): the HTML report from saved results.

One folder: its ``report.html`` again (as main.py writes it at the end of a run, or m3dm.predict for a batch of
parts). Several folders (e.g. one per method): ``comparison.html`` in their common parent, the runs side by side
with the deltas of every metric and of every part's score and rank to the first folder.
"""

from __future__ import annotations

import argparse
import sys
import time

from m3dm.app.console import add_logging_flags, configure_logging
from m3dm.errors import DataError
from m3dm.report import build_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3dm-report", description="Build the HTML report of saved M3DM results "
                                "(one folder), or compare several results folders side by side.")
    p.add_argument("folders", nargs="+", metavar="RESULTS_DIR",
                   help="output folder(s) of main.py (results.json, per_sample.json, report_data/) or m3dm.predict")
    p.add_argument("--output", default=None, help="the HTML file to write (default: RESULTS_DIR/report.html for "
                                                  "one folder, comparison.html in the folders' common parent)")
    return add_logging_flags(p, quiet_help="no messages but warnings and errors")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    start = time.perf_counter()
    try:
        path = build_report(args.folders, args.output)
    except (DataError, OSError, ValueError) as exc:
        print(f"m3dm-report: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
