"""``python -m m3dm.data check ROOT`` (also ``m3dm check ROOT``): every problem of a dataset tree in one pass.

    python -m m3dm.data check datasets/mvtec3d_preprocessed
    python -m m3dm.data check datasets/own --classes widget --headers_only

Prints the samples per class and split and every error and warning (each naming its file or folder). Exit
status 0 when the tree can be used (warnings allowed), 1 when it has errors, 2 for a wrong command line.
"""

from __future__ import annotations

import argparse
import sys

from m3dm.config import class_name, class_names_problem
from m3dm.data.check import check_dataset

# the help in plain text (the module docstring is reStructuredText, which a terminal shows raw)
DESCRIPTION = "Every problem of a dataset tree in one pass (also: m3dm check ROOT)."
EPILOG = """examples:
  python -m m3dm.data check datasets/mvtec3d_preprocessed
  python -m m3dm.data check datasets/own --classes widget --headers_only

Prints the samples per class and split and every error and warning (each naming its file or folder). Exit
status 0 when the tree can be used (warnings allowed), 1 when it has errors, 2 for a wrong command line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m m3dm.data", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check a dataset tree (MVTec 3D-AD layout, raw or preprocessed)",
                                description="Check a dataset tree in the MVTec 3D-AD layout "
                                            "<root>/<class>/{train,validation,test}/<defect>/{rgb,xyz,gt}.")
    check.add_argument("root", help="dataset root (holding one folder per class)")
    check.add_argument("--classes", nargs="+", default=None, help="classes to check (default: every class folder)")
    check.add_argument("--headers_only", action="store_true",
                       help="read file headers only (sizes, dtypes, pairing): what main.py checks before a run")
    check.add_argument("--no_train", action="store_true",
                       help="the train split is not needed (evaluating a saved model with --load_model)")
    check.add_argument("--workers", type=int, default=4, help="threads reading files (default 4)")
    check.add_argument("--show", type=int, default=10, help="problems shown per kind (default 10; all are counted)")
    check.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    classes = [class_name(name) for name in args.classes] if args.classes else None
    problem = class_names_problem(classes)
    if problem:  # main.py's rule
        parser.error(problem)
    report = check_dataset(args.root, classes, contents=not args.headers_only, fitting=not args.no_train,
                           workers=args.workers, progress=not args.quiet)
    print(report.summary(shown_per_kind=max(1, args.show)))
    return 0 if report.usable else 1


if __name__ == "__main__":
    sys.exit(main())
