"""``python -m m3dm_runner --model X.onnx PART_FOLDERS... [--out scores.csv]``: one CSV row per part.

A folder holds ``rgb/*.png`` with ``xyz/*.tiff`` (preprocessed, paired by stem) or ``<defect>/{rgb,xyz}`` folders.
Columns: name, image_score, result (pass / fail against the model's image threshold, empty without one; error),
error. Exit status: 0 when every part was scored, 1 when some could not be, 2 when nothing could run.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from m3dm_runner.inputs import PartError, find_parts
from m3dm_runner.model import ExportedModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m3dm_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an .onnx file written by python -m m3dm.export")
    parser.add_argument("folders", nargs="+", help="part folders ({rgb,xyz} or <defect>/{rgb,xyz})")
    parser.add_argument("--out", default=None, help="CSV file to write (default: standard output)")
    parser.add_argument("--batch_size", type=int, default=1, help="parts per run of the model")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads and the FPFH's threads "
                        "(0: their defaults)")
    args = parser.parse_args(argv)
    try:
        model = ExportedModel(args.model, threads=args.threads or None)
        parts = [part for folder in args.folders for part in find_parts(Path(folder))]
    except (OSError, ValueError) as exc:
        print(f"m3dm_runner: {exc}", file=sys.stderr)
        return 2
    handle = open(args.out, "w", newline="") if args.out else sys.stdout  # noqa: SIM115
    writer = csv.writer(handle)
    writer.writerow(["name", "image_score", "result", "error"])
    errors = 0
    for result in model.score_files(parts, args.batch_size):
        if isinstance(result, PartError):
            errors += 1
            writer.writerow(["", "", "error", str(result)])
        else:
            verdict = "" if result.fails is None else "fail" if result.fails else "pass"
            writer.writerow([result.name, repr(result.score), verdict, ""])
    if args.out:
        handle.close()
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
