"""Synthetic datasets in the on-disk formats of MVTec 3D-AD and Eyecandies (``m3dm.data.synthetic``).

    python -m m3dm.data.synthetic OUT [--format mvtec3d|eyecandies] [--classes a b] [--size 128] ...
"""

from __future__ import annotations

import argparse

from m3dm.data.synthetic import DEFAULT_CLASSES, write_eyecandies, write_mvtec3d


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m m3dm.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output root (created; existing samples are kept)")
    parser.add_argument("--format", choices=("mvtec3d", "eyecandies"), default="mvtec3d")
    parser.add_argument("--classes", nargs="+", default=None, help="class names")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (MVTec 3D-AD: 800)")
    parser.add_argument("--train", type=int, default=6, help="training samples per class")
    parser.add_argument("--validation", type=int, default=2, help="validation samples per class (mvtec3d)")
    parser.add_argument("--test_good", type=int, default=3, help="good test samples per class (mvtec3d)")
    parser.add_argument("--test_defect", type=int, default=2, help="test samples per defect type (mvtec3d)")
    parser.add_argument("--test", type=int, default=6, help="public test samples per class (eyecandies)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.format == "mvtec3d":
        root = write_mvtec3d(args.out, args.classes or DEFAULT_CLASSES, args.size, args.train, args.validation,
                             args.test_good, args.test_defect, args.seed)
    else:
        root = write_eyecandies(args.out, args.classes or ("CandyCane", "GummyBear"), args.size, args.train,
                                args.test, args.seed)
    print(f"wrote synthetic {args.format} data to {root}")


if __name__ == "__main__":
    main()
