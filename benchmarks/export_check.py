"""Exported (onnxruntime) against PyTorch scores on a dataset folder: image scores and maps of every test part.

    python benchmarks/export_check.py RAW_MVTEC3D_FOLDER [--methods DINO Point_MAE ...] [--work DIR] [--int8]
        [--xyz_checkpoint POINT_MAE.pth] [--fusion_module_path UFF.pth]
    python benchmarks/export_check.py --synthetic [--int8] ...

The folder is a raw MVTec 3D-AD dataset (its classes' train/validation/test), e.g. the nine real cable_gland
samples the project keeps next to it. It is copied and preprocessed in ``--work``, each method is fitted with
``main.py --save_model`` in the small test configuration (random backbone weights unless ``--xyz_checkpoint``
gives Point-MAE's; nothing is downloaded; the Fusion methods need a UFF block, ``--fusion_module_path``),
exported with ``python -m m3dm.export`` and every test part scored both ways in the same order (batch 1). Prints,
per method, the largest relative image-score difference and the largest map difference in blur steps
(``max/255`` of the PyTorch map, docs/deployment.md). ``--synthetic``: the folder is the project's synthetic
class ``gadget`` (``m3dm.data.synthetic``, 128 px, 10 good test parts and 10 of each of its 4 defects).
``--int8``: each model is also exported with ``--precision int8``, and a second table gives the int8 artefact's
deviation from the float32 one and both artefacts' I-AUROC, P-AUROC and AU-PRO (0.3) on the test parts. Results
are in benchmarks/README.md.
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
           "G2SF": ["--num_anomalies", "3", "--max_epoch", "2", "--n_hidden", "16", "--emb_dim", "8"],
           "BTF_RGB": ["--memory_bank", "single"], "BTF_FPFH": ["--memory_bank", "single"],
           "BTF_RGB+FPFH": ["--memory_bank", "single"], "Fusion": ["--memory_bank", "single", "--use_uff"],
           "DINO+Point_MAE+Fusion": ["--memory_bank", "multiple", "--use_uff"]}


Scores = list[tuple[float, np.ndarray]]  # (image score, (224, 224) map) per part


def exported_scores(onnx_path: Path, loaded) -> Scores:
    """Every part scored by the artefact, in order, batch 1 (the DropPath draws follow as in ``m3dm.predict``)."""
    from m3dm_runner import ExportedModel

    exported = ExportedModel(onnx_path)
    scored = (exported.score_arrays(part.rgb.numpy()[None], part.pc.numpy()[None]) for part in loaded)
    return [(float(score[0]), score_map[0]) for score, score_map in scored]


def deviation(reference: Scores, other: Scores) -> tuple[float, float, float]:
    """(largest relative image-score difference, its median, largest map difference in blur steps of the
    reference's map)."""
    relative = [abs(got - score) / abs(score) for (score, _), (got, _) in zip(reference, other)]
    steps = [float(np.abs(got_map - score_map).max()) / (float(np.abs(score_map).max()) / 255)
             for (_, score_map), (_, got_map) in zip(reference, other)]
    return max(relative), float(np.median(relative)), max(steps)


def metrics(loaded, scored: Scores) -> dict:
    """I-AUROC, P-AUROC and AU-PRO (0.3) of the scored test parts (a part is defective unless under ``good/``)."""
    from m3dm.evaluation.metrics import compute_metrics

    labels = np.array([0 if "good" in part.part.name.split("/") else 1 for part in loaded])
    masks = np.stack([np.zeros((224, 224), bool) if part.gt is None else part.gt for part in loaded])
    return compute_metrics(labels, [score for score, _ in scored], masks, np.stack([m for _, m in scored]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", default=None)
    parser.add_argument("--synthetic", action="store_true", help="the synthetic class instead of a folder")
    parser.add_argument("--int8", action="store_true", help="also export int8 and compare it with float32")
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if "Fusion" not in m],
                        choices=list(METHODS))
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--backbone_eval", action="store_true", help="fit with the point backbone in eval mode")
    parser.add_argument("--xyz_checkpoint", default=None, help="point backbone weights (default: random ones)")
    parser.add_argument("--fusion_module_path", default=None, help="UFF block (the Fusion methods need one)")
    args = parser.parse_args()
    if (args.folder is None) != args.synthetic:
        parser.error("give a dataset folder or --synthetic")
    if args.fusion_module_path is None and any("--use_uff" in METHODS[m] for m in args.methods):
        parser.error("the Fusion methods need --fusion_module_path")
    work = args.work or Path(tempfile.mkdtemp(prefix="export_check_"))
    dataset = prepare(args.folder, args.synthetic, work)
    print("| method | parts | image score, largest relative difference | map, largest difference (blur steps) |")
    print("|---|---:|---:|---:|")
    int8_rows = [check(method, dataset, work, args) for method in args.methods]
    if args.int8:
        print("\n| method | int8 against fp32: score, largest (median) relative difference | map, largest "
              "(blur steps) | I-AUROC fp32 / int8 | P-AUROC fp32 / int8 | AU-PRO fp32 / int8 |")
        print("|---|---:|---:|---:|---:|---:|")
        print("\n".join(row for rows in int8_rows for row in rows))


def cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def prepare(folder: Path | None, synthetic: bool, work: Path) -> Path:
    """The preprocessed dataset in ``work``: a copy of ``folder``, or the synthetic class."""
    from m3dm.data.synthetic import write_mvtec3d
    from m3dm.preprocess.mvtec3d import preprocess_dataset

    raw = work / "raw"
    if synthetic:
        write_mvtec3d(raw, classes=("gadget",), n_test_good=10, n_test_defect=10, progress=False)
    elif not raw.exists():
        shutil.copytree(folder, raw)
    return preprocess_dataset(raw, workers=1).output


def check(method: str, dataset: Path, work: Path, args) -> list[str]:
    """Fit, export and compare one method (prints the fp32 row); returns its int8 rows."""
    import main as main_module
    from m3dm.app.parts import discover_parts, load_part
    from m3dm.app.predict import Predictor
    from m3dm.detection.persistence import load_class_model
    from m3dm.export.cli import main as export_main

    out = work / method
    extra = METHODS[method] + (["--backbone_eval"] if args.backbone_eval else [])
    extra += ["--xyz_checkpoint", str(args.xyz_checkpoint)] if args.xyz_checkpoint else []
    if "--use_uff" in extra:
        extra += ["--fusion_module_path", args.fusion_module_path]
    with contextlib.redirect_stdout(io.StringIO()):  # main.py's tables
        assert main_module.main(["--dataset_path", str(dataset), "--output_dir", str(out), "--method_name",
                                 method, "--save_model", *SMALL, *extra]) == 0
    rows = []
    for model_path in sorted((out / "models").glob("*.pt")):
        loaded = [load_part(p, 224) for p in discover_parts([str(dataset / model_path.stem / "test")], [], [])]
        reference = Predictor(load_class_model(model_path), device="cpu").score(loaded)
        scored = {}
        for precision in ("fp32", "int8") if args.int8 else ("fp32",):
            onnx_path = model_path.with_name(f"{model_path.stem}.{precision}.onnx")
            assert export_main(["--model", str(model_path), "--out", str(onnx_path), "--precision", precision,
                                "-q"]) == 0
            scored[precision] = exported_scores(onnx_path, loaded)
        score, _, steps = deviation(reference, scored["fp32"])
        print(f"| {method} ({model_path.stem}) | {len(loaded)} | {score:.2e} | {steps:.2f} |", flush=True)
        if args.int8:
            worst, median, int8_steps = deviation(scored["fp32"], scored["int8"])
            fp32_metrics, int8_metrics = metrics(loaded, scored["fp32"]), metrics(loaded, scored["int8"])
            pairs = " | ".join(f"{cell(fp32_metrics[k])} / {cell(int8_metrics[k])}"
                               for k in ("image_rocauc", "pixel_rocauc", "au_pro"))
            rows.append(f"| {method} ({model_path.stem}) | {worst:.2e} ({median:.2e}) | {int8_steps:.1f} | {pairs} |")
    return rows


if __name__ == "__main__":
    main()
