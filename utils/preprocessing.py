"""Preprocess raw MVTec 3D-AD (plane removal, padding, DBSCAN cleaning) into a new dataset root.

    python utils/preprocessing.py datasets/mvtec3d            # writes datasets/mvtec3d_preprocessed
    python utils/preprocessing.py SRC --output_root DST --workers 2
The source is never modified unless --inplace is given. Re-running resumes an interrupted run.
"""

import argparse
import sys
from pathlib import Path


from m3dm.errors import DataError
from m3dm.preprocess.common import default_workers
from m3dm.preprocess.mvtec3d import preprocess_dataset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_path", help="raw MVTec 3D-AD root (holding bagel/, cable_gland/, ...)")
    parser.add_argument("--output_root", default=None, help="where to write (default: <dataset_path>_preprocessed)")
    parser.add_argument("--inplace", action="store_true",
                        help="overwrite the source files like the reference script (keep a pristine copy!)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="parallel processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="RANSAC seed (the reference is unseeded)")
    args = parser.parse_args(argv)
    try:
        summary = preprocess_dataset(args.dataset_path, args.output_root, args.inplace, args.workers, args.seed)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.report())
    return 1 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
