"""The preprocessing commands: ``m3dm-preprocess`` (MVTec 3D-AD), ``m3dm-preprocess-eyecandies`` and
``m3dm-preprocess-depth`` (depth-sensor data).

``m3dm-preprocess`` cleans raw MVTec 3D-AD (plane removal, padding, DBSCAN); ``m3dm-preprocess-eyecandies``
converts raw Eyecandies into the MVTec 3D-AD layout; ``m3dm-preprocess-depth`` turns depth images and camera
intrinsics into organized clouds. ``utils/*.py`` run them under the reference's script names.

Imports of the preprocessing code wait until the flags are parsed, so that ``--help`` is immediate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from m3dm.app.console import add_logging_flags, configure_logging, interrupted
from m3dm.errors import DataError
from m3dm.preprocess.common import default_workers
from m3dm.preprocess.depth import Intrinsics, convert_depth_dataset
from m3dm.preprocess.eyecandies import convert_dataset
from m3dm.preprocess.mvtec3d import preprocess_dataset

MVTEC_DESCRIPTION = """Preprocess raw MVTec 3D-AD (plane removal, padding, DBSCAN cleaning) into a new dataset root.

    m3dm-preprocess datasets/mvtec3d            # writes datasets/mvtec3d_preprocessed
    m3dm-preprocess SRC --output_root DST --workers 2
    (python utils/preprocessing.py ... is the same)
The source is never modified unless --inplace is given. Re-running resumes an interrupted run.
"""

EYECANDIES_DESCRIPTION = """Convert raw Eyecandies (depth + pose + lighting images) into the MVTec 3D-AD layout.

    m3dm-preprocess-eyecandies --dataset_path datasets/eyecandies --target_dir datasets/eyecandies_preprocessed
    (python utils/preprocess_eyecandies.py ... is the same)
Writes <target>/<Class>/{train/good, test/good, test/bad}/{rgb,xyz,gt}/NNN.*; re-running resumes.
"""

DEPTH_DESCRIPTION = """Convert depth-sensor data (depth images + camera intrinsics + RGB) into the MVTec 3D-AD layout.

    m3dm-preprocess-depth datasets/own_depth --depth_scale 0.001 --fx 1050 --fy 1050 --cx 639.5 --cy 359.5
    m3dm-preprocess-depth datasets/own_depth --intrinsics camera.yaml --output_root datasets/own
    (python utils/preprocess_depth.py ... is the same)
Input: <root>/<class>/{train,validation,test}/<defect>/{rgb,depth[,gt]}/<stem>.* (depth: 16-bit PNG or float
TIFF). Output: the same tree with xyz/<stem>.tiff (float32 (H, W, 3) camera-frame points, 0 where the depth is
missing) instead of depth/, RGB images and masks copied. Intrinsics: the flags, else --intrinsics (JSON/YAML:
fx, fy, cx, cy; a 3x3 K; or MVTec 3D-AD's camera_parameters.json), else <class>/calibration/camera_parameters.json.
The source is never modified; re-running resumes.
"""


def _parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def _workers_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="parallel processes (default: all cores)")


def _finish(convert, output: str) -> int:
    """Run ``convert()`` (writing into ``output``) and print its summary: 0 when every sample was written, 1 when
    some failed, 2 when the input cannot be processed at all or the disk is full (reported in one line)."""
    try:
        summary = convert()
    except (DataError, ValueError, OSError) as exc:  # OSError: e.g. an output root that cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted(Path(sys.argv[0]).name, f"the samples written so far are kept in {output}; run the "
                                                   f"same command again to resume")
    print(summary.report())
    return 1 if summary.errors else 0


def mvtec_main(argv=None) -> int:
    parser = _parser(MVTEC_DESCRIPTION)
    parser.add_argument("dataset_path", help="raw MVTec 3D-AD root (holding bagel/, cable_gland/, ...)")
    parser.add_argument("--output_root", default=None, help="where to write (default: <dataset_path>_preprocessed)")
    parser.add_argument("--inplace", action="store_true",
                        help="overwrite the source files like the reference script (keep a pristine copy!)")
    _workers_flag(parser)
    parser.add_argument("--seed", type=int, default=0, help="RANSAC seed (the reference is unseeded)")
    args = add_logging_flags(parser, quiet_help="only warnings and errors").parse_args(argv)
    configure_logging(args.verbose, args.quiet)

    output = args.dataset_path if args.inplace else args.output_root or f"{args.dataset_path}_preprocessed"
    return _finish(lambda: preprocess_dataset(args.dataset_path, args.output_root, args.inplace, args.workers,
                                              args.seed), output)


def eyecandies_main(argv=None) -> int:
    parser = _parser(EYECANDIES_DESCRIPTION)
    parser.add_argument("--dataset_path", default="datasets/eyecandies", help="raw Eyecandies root")
    parser.add_argument("--target_dir", default="datasets/eyecandies_preprocessed", help="output root")
    _workers_flag(parser)
    parser.add_argument("--exact_zero_background", action="store_true",
                        help="write background points as (0,0,0) instead of the reference's non-zero y/z "
                             "(no effect on any score)")
    args = add_logging_flags(parser, quiet_help="only warnings and errors").parse_args(argv)
    configure_logging(args.verbose, args.quiet)

    return _finish(lambda: convert_dataset(args.dataset_path, args.target_dir, args.workers,
                                           args.exact_zero_background), args.target_dir)


def depth_main(argv=None) -> int:
    parser = _parser(DEPTH_DESCRIPTION)
    parser.add_argument("dataset_path", help="root holding <class>/<split>/<defect>/{rgb,depth}/")
    parser.add_argument("--output_root", default=None, help="where to write (default: <dataset_path>_xyz)")
    parser.add_argument("--depth_scale", type=float, default=None,
                        help="metres per stored depth unit (e.g. 0.001 for millimetre PNGs; default 1 for float "
                             "TIFFs, required for integer images)")
    camera = parser.add_argument_group("camera intrinsics (pixels; all four, or --intrinsics)")
    for name in ("fx", "fy", "cx", "cy"):
        camera.add_argument(f"--{name}", type=float, default=None)
    camera.add_argument("--intrinsics", default=None, help="JSON/YAML file of the camera parameters")
    _workers_flag(parser)
    args = add_logging_flags(parser, quiet_help="only warnings and errors").parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    given = [getattr(args, name) for name in ("fx", "fy", "cx", "cy")]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        parser.error("give all four of --fx --fy --cx --cy, or none (then --intrinsics or the class's "
                     "calibration/camera_parameters.json)")
    if args.depth_scale is not None and not args.depth_scale > 0:
        parser.error(f"--depth_scale must be positive, got {args.depth_scale}")

    intrinsics = Intrinsics(*given) if given[0] is not None else None
    if intrinsics is not None and min(intrinsics.fx, intrinsics.fy) <= 0:
        parser.error("--fx and --fy must be positive")
    return _finish(lambda: convert_depth_dataset(args.dataset_path, args.output_root, intrinsics=intrinsics,
                                                 intrinsics_file=args.intrinsics, depth_scale=args.depth_scale,
                                                 workers=args.workers),
                   args.output_root or f"{args.dataset_path}_xyz")
