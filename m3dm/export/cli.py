"""``python -m m3dm.export``: write a fitted class model (``main.py --save_model``) as one ONNX file.

    python -m m3dm.export --model results/models/bagel.pt --format onnx [--out bagel.onnx]

The backbones are rebuilt from the weight files the model records and verified, as ``m3dm.predict`` does; the
artefact is scored with ``python -m m3dm_runner --model bagel.onnx PART_FOLDERS...`` where only NumPy,
onnxruntime, Pillow and tifffile are installed (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from m3dm.app.console import add_logging_flags, configure_logging
from m3dm.errors import CheckpointError, DataError, ModelFileError

FORMATS = ("onnx",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m m3dm.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a class-model file written by main.py --save_model")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="artefact format (default: onnx)")
    parser.add_argument("--out", default=None, help="the artefact to write (default: the model's path with .onnx)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "int8"),
                        help="int8: the RGB backbone's linear layers quantised dynamically by onnxruntime (the "
                             "point backbone, bank search, alignment, blur and decision layer stay float32); its "
                             "measured speed-up and score cost are in docs/deployment.md (default: fp32)")
    parser.add_argument("--rgb_checkpoint", default=None, help="RGB backbone weights (default: the recorded file)")
    parser.add_argument("--xyz_checkpoint", default=None, help="point backbone weights (default: the recorded file)")
    parser.add_argument("--fusion_module_path", default=None, help="UFF block (default: the recorded file)")
    add_logging_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    from m3dm.app.predict import Predictor
    from m3dm.detection.persistence import load_class_model
    from m3dm.export.onnx import export_onnx

    out = Path(args.out) if args.out else Path(args.model).with_suffix(".onnx")
    try:
        predictor = Predictor(load_class_model(args.model), device="cpu", rgb_checkpoint=args.rgb_checkpoint,
                              xyz_checkpoint=args.xyz_checkpoint, fusion_module_path=args.fusion_module_path)
        path = export_onnx(predictor, out, precision=args.precision)
    except (ModelFileError, CheckpointError, DataError, ValueError, NotImplementedError) as exc:
        print(f"m3dm.export: {exc}", file=sys.stderr)
        return 2
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MB)")
    return 0
