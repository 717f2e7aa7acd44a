"""Convert raw Eyecandies (depth + pose + lighting images) into the MVTec 3D-AD layout.

    python utils/preprocess_eyecandies.py --dataset_path datasets/eyecandies \
        --target_dir datasets/eyecandies_preprocessed
Writes <target>/<Class>/{train/good, test/good, test/bad}/{rgb,xyz,gt}/NNN.*; re-running resumes.
"""

import argparse
import sys
from pathlib import Path


from m3dm.errors import DataError
from m3dm.preprocess.common import default_workers
from m3dm.preprocess.eyecandies import convert_dataset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default="datasets/eyecandies", help="raw Eyecandies root")
    parser.add_argument("--target_dir", default="datasets/eyecandies_preprocessed", help="output root")
    parser.add_argument("--workers", type=int, default=default_workers(), help="parallel processes (default: all cores)")
    parser.add_argument("--exact_zero_background", action="store_true",
                        help="write background points as (0,0,0) instead of the reference's non-zero y/z "
                             "(no effect on any score)")
    args = parser.parse_args(argv)
    try:
        summary = convert_dataset(args.dataset_path, args.target_dir, args.workers, args.exact_zero_background)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.report())
    return 1 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
