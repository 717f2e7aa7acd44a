"""M3DM: fit and evaluate per class (MVTec 3D-AD, Eyecandies, or the built-in synthetic data with --demo).

Same flags and defaults as the reference's main.py (see docs/quirks.md for --fix_quirks), plus --classes,
--device, --batch_size, --num_workers, --output_dir, checkpoint paths, --random_init and --demo.
"""

import sys
from pathlib import Path

from m3dm.app.cli import build_parser, run, validate

DEMO_CLASSES = ("gadget", "widget")


def prepare_demo(args) -> None:
    """Synthetic data (generated and preprocessed once), DINO+Point_MAE on two classes, pictures on."""
    from m3dm.features.weights import default_checkpoint_available
    from m3dm.preprocess.mvtec3d import preprocess_dataset
    from m3dm.data.synthetic import write_mvtec3d

    raw = write_mvtec3d(Path(args.demo_root) / "synthetic_mvtec3d", classes=DEMO_CLASSES)
    summary = preprocess_dataset(raw, workers=2)
    print(summary.report())
    args.dataset_path = str(summary.output)
    args.classes = list(DEMO_CLASSES)
    args.method_name, args.memory_bank = "DINO+Point_MAE", "multiple"
    args.save_preds = True
    if args.output_dir == "results":
        args.output_dir = "results/demo"
    have_weights = all(default_checkpoint_available(kind, name) for kind, name in
                       (("rgb", args.rgb_backbone_name), ("xyz", args.xyz_backbone_name)))
    if not have_weights and not args.random_init:
        print("demo: pretrained weights not found under checkpoints/ (see checkpoints/README.md): running with "
              "RANDOM backbone weights", file=sys.stderr)
        args.random_init = True


def main(argv=None) -> int:
    parser = build_parser()
    parser.add_argument("--demo_root", default="datasets", help="where --demo writes its synthetic data")
    args = parser.parse_args(argv)
    if args.demo:
        prepare_demo(args)
    try:
        validate(args)
    except ValueError as exc:
        parser.error(str(exc))
    from m3dm.errors import DataError
    from m3dm.errors import CheckpointError
    from m3dm.errors import ModelFileError

    try:
        run(args)
    except (DataError, CheckpointError, ModelFileError) as exc:  # a wrong input file: say which, no traceback
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
