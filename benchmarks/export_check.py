"""Exported (onnxruntime) against PyTorch scores on a dataset folder: image scores and maps of every test part.

    python benchmarks/export_check.py RAW_MVTEC3D_FOLDER [--methods DINO Point_MAE ...] [--work DIR]
        [--xyz_checkpoint POINT_MAE.pth] [--fusion_module_path UFF.pth]

The folder is a raw MVTec 3D-AD dataset (its classes' train/validation/test), e.g. the nine real cable_gland
samples the project keeps next to it. It is copied and preprocessed in ``--work``, each method is fitted with
``main.py --save_model`` in the small test configuration (random backbone weights unless ``--xyz_checkpoint``
gives Point-MAE's; nothing is downloaded; the Fusion methods need a UFF block, ``--fusion_module_path``),
exported with ``python -m m3dm.export`` and every test part scored both ways in the same order (batch 1). Prints,
per method, the largest relative image-score difference and the largest map difference in blur steps
(``max/255`` of the PyTorch map, docs/deployment.md). Results are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "64", "--group_size", "32",
         "--random_init", "--device", "cpu", "--batch_size", "1", "-q"]
METHODS = {"DINO": ["--memory_bank", "single"], "Point_MAE": ["--memory_bank", "single"], "CFM": ["--cfm_epochs", "1"],
           "DINO+Point_MAE": ["--memory_bank", "multiple"], "DINO+Point_MAE+add": ["--memory_bank", "single"],
           "Fusion": ["--memory_bank", "single", "--use_uff"], "DINO+Point_MAE+Fusion": ["--memory_bank", "multiple",
                                                                                       "--use_uff"]}


def compare(model_path: Path, onnx_path: Path, test_folder: Path) -> tuple[float, float, int]:
    """(largest relative image-score difference, largest map difference in blur steps, parts)."""
    from m3dm.app.parts import discover_parts, load_part
    from m3dm.app.predict import Predictor
    from m3dm.detection.persistence import load_class_model
    from m3dm_runner import ExportedModel

    loaded = [load_part(p, 224) for p in discover_parts([str(test_folder)], [], [])]
    reference = Predictor(load_class_model(model_path), device="cpu").score(loaded)
    exported = ExportedModel(onnx_path)
    worst_score = worst_map = 0.0
    for part, (score, score_map) in zip(loaded, reference):
        got_score, got_map = exported.score_arrays(part.rgb.numpy()[None], part.pc.numpy()[None])
        worst_score = max(worst_score, abs(float(got_score[0]) - score) / abs(score))
        step = float(np.abs(score_map).max()) / 255
        worst_map = max(worst_map, float(np.abs(got_map[0] - score_map).max()) / step)
    return worst_score, worst_map, len(loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if "Fusion" not in m],
                        choices=list(METHODS))
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--backbone_eval", action="store_true", help="fit with the point backbone in eval mode")
    parser.add_argument("--xyz_checkpoint", default=None, help="Point-MAE weights (default: random)")
    parser.add_argument("--fusion_module_path", default=None, help="UFF block (the Fusion methods need one)")
    args = parser.parse_args()
    if args.fusion_module_path is None and any("--use_uff" in METHODS[m] for m in args.methods):
        parser.error("the Fusion methods need --fusion_module_path")
    import main as main_module
    from m3dm.export.cli import main as export_main
    from m3dm.preprocess.mvtec3d import preprocess_dataset

    work = args.work or Path(tempfile.mkdtemp(prefix="export_check_"))
    raw = work / "raw"
    if not raw.exists():
        shutil.copytree(args.folder, raw)
    dataset = preprocess_dataset(raw, workers=1).output
    print("| method | parts | image score, largest relative difference | map, largest difference (blur steps) |")
    print("|---|---:|---:|---:|")
    for method in args.methods:
        out = work / method
        extra = METHODS[method] + (["--backbone_eval"] if args.backbone_eval else [])
        extra += [] if args.xyz_checkpoint is None else ["--xyz_checkpoint", args.xyz_checkpoint]
        if "--use_uff" in extra:
            extra += ["--fusion_module_path", args.fusion_module_path]
        with contextlib.redirect_stdout(io.StringIO()):  # main.py's tables
            assert main_module.main(["--dataset_path", str(dataset), "--output_dir", str(out), "--method_name",
                                     method, "--save_model", *SMALL, *extra]) == 0
        for model_path in sorted((out / "models").glob("*.pt")):
            onnx_path = model_path.with_suffix(".onnx")
            assert export_main(["--model", str(model_path), "--out", str(onnx_path), "-q"]) == 0
            score, steps, n = compare(model_path, onnx_path, dataset / model_path.stem / "test")
            print(f"| {method} ({model_path.stem}) | {n} | {score:.2e} | {steps:.2f} |", flush=True)


if __name__ == "__main__":
    main()
