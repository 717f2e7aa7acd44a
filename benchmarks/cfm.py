"""CFM against M3DM's DINO+Point_MAE on the same data in the same run: fit time, seconds per test sample, peak
host memory and the size of the fitted model.

    python benchmarks/cfm.py [--train 10] [--test 8] [--cfm_epochs 2] [--size 256] [--small] [--device cpu]

Full backbones by default (ViT-B/8 at 224 px, Point-MAE with 1024 groups of 128 points; random weights: timings
do not depend on the weights) on synthetic MVTec 3D-AD data generated and preprocessed into a temporary folder;
``--small`` uses the test suite's tiny ViT and 64 groups of 32 points. Both methods share one feature extractor
(the same seed per class, as main.py). Fit = extraction of the training samples plus the method's own fitting
(banks, coreset, pass 2 and decision layer fusion; or training the two mappings); test = extraction plus scoring.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline import MemoryTimer, rss_gb

METHODS = ("DINO+Point_MAE", "CFM")


def state_bytes(value) -> int:
    """Bytes of every tensor and array in a fitted detector's state (what its model file holds)."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=10)
    parser.add_argument("--test", type=int, default=8, help="test samples (half good, half defective)")
    parser.add_argument("--size", type=int, default=256, help="side of the generated images")
    parser.add_argument("--cfm_epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2, help="extraction batch")
    parser.add_argument("--small", action="store_true", help="tiny ViT, 64 groups of 32 points")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from m3dm.app.run import ClassRun
    from m3dm.config import METHODS as SPECS
    from m3dm.config import Settings
    from m3dm.data.synthetic import write_mvtec3d
    from m3dm.features.extractor import FeatureExtractor
    from m3dm.features.weights import build_point_backbone, build_rgb_backbone
    from m3dm.preprocess.mvtec3d import preprocess_dataset
    from m3dm.runtime import seed_everything

    vit, groups = ("vit_tiny_patch16_224", (64, 32)) if args.small else ("vit_base_patch8_224_dino", (1024, 128))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_defect = max(1, args.test // 8)
        raw = write_mvtec3d(Path(tmp) / "raw", classes=("gadget",), size=args.size, n_train=args.train, n_val=0,
                            n_test_good=args.test - 4 * n_defect, n_test_defect=n_defect, progress=False)
        data = preprocess_dataset(raw, workers=2).output
        seed_everything(0)
        rgb = build_rgb_backbone(vit, random_init=True, quiet=True).eval()
        point = build_point_backbone("Point_MAE", random_init=True, quiet=True, num_group=groups[0],
                                     group_size=groups[1])
        # one extractor for both methods: PFA patches for M3DM's banks, the point groups for CFM
        extractor = FeatureExtractor(rgb, point, device=args.device, seed=0, point_outputs=("patches", "groups"))
        timer = MemoryTimer()
        for method in METHODS:
            settings = Settings().replace(
                detector={"method_name": method, "memory_bank": SPECS[method].memory_bank,
                          "cfm_epochs": args.cfm_epochs},
                backbones={"random_init": True, "rgb_backbone_name": vit, "num_group": groups[0],
                           "group_size": groups[1]},
                run={"dataset_path": str(data), "batch_size": args.batch_size, "spool_dir": tmp,
                     "device": args.device})
            settings.validate()
            seed_everything(0)
            extractor.reseed(0)
            run = ClassRun(settings, "gadget", extractor, device=args.device, timer=timer, progress=False)
            timer.seconds.clear()
            timer.peak.clear()
            start = time.perf_counter()
            run.fit()
            fit = time.perf_counter() - start
            fit_peak = max(timer.peak.values())
            fit_stages = dict(timer.seconds)
            timer.seconds.clear()
            start = time.perf_counter()
            result = run.evaluate()
            test = time.perf_counter() - start
            rows.append({"method": method, "fit_s": fit, "fit_stages": fit_stages, "test_s": test,
                         "test_per_sample_s": test / len(result.labels),
                         "scoring_per_sample_s": timer.seconds.get("test scoring", 0.0) / len(result.labels),
                         "peak_rss_gb": max(fit_peak, *timer.peak.values()),
                         "model_mb": state_bytes(run.detector.to_state()) / 2**20, "metrics": result.metrics})
        timer._stop = True
    print(f"\n{args.train} training and {args.test} test samples at {args.size} px, {vit}, Point-MAE "
          f"{groups[0]}x{groups[1]}, CFM {args.cfm_epochs} epochs, device {args.device}, "
          f"{torch.get_num_threads()} threads, resident memory at the end {rss_gb():.2f} GB")
    print(f"{'method':<16}{'fit s':>9}{'test s/sample':>15}{'scoring s/sample':>18}{'peak RSS GB':>13}"
          f"{'model MB':>10}")
    for row in rows:
        print(f"{row['method']:<16}{row['fit_s']:>9.1f}{row['test_per_sample_s']:>15.2f}"
              f"{row['scoring_per_sample_s']:>18.2f}{row['peak_rss_gb']:>13.2f}{row['model_mb']:>10.1f}")
    for row in rows:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in row["fit_stages"].items())
        print(f"{row['method']}: fit stages (s): {stages}; metrics (random weights): "
              f"{ {k: round(v, 3) for k, v in row['metrics'].items()} }")


if __name__ == "__main__":
    main()
