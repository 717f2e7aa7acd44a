"""The faster CPU coreset option (``--coreset_shards S``) against the reference's exact greedy selection.

    python benchmarks/coreset.py [--train 40] [--test 20] [--shards 4 16] [--method DINO+Point_MAE]

One class of synthetic MVTec 3D-AD data (generated and preprocessed into a temporary folder) at the full
configuration (ViT-B/8 224 px, Point-MAE 1024 x 128, random weights). Every sample is extracted once; the same
features then fit the method with the exact coreset (S = 1) and with each S given, and the same test features
are scored. Prints, per S: the coreset stage's seconds and its speed-up over S = 1, and the metrics with their
differences from S = 1. Random weights: the metrics are those of random features on synthetic defects, so the
differences, not the values, are the result.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

METRICS = ("image_rocauc", "pixel_rocauc", "au_pro")


class CachedExtractor:
    """Extracts each sample once (by name) and hands out the same features to every run."""

    def __init__(self, extractor):
        self.extractor, self.cache, self.seconds = extractor, {}, 0.0

    def __call__(self, rgb, pc, names):
        if not all(name in self.cache for name in names):
            start = time.perf_counter()
            for name, features in zip(names, self.extractor(rgb, pc, names=names)):
                self.cache[name] = features
            self.seconds += time.perf_counter() - start
        return [self.cache[name] for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=40)
    parser.add_argument("--test", type=int, default=20, help="test samples (about half defective)")
    parser.add_argument("--shards", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--method", default="DINO+Point_MAE")
    parser.add_argument("--size", type=int, default=256, help="side of the generated images")
    args = parser.parse_args()

    from m3dm.app.run import ClassRun, StageTimer
    from m3dm.config import DetectorSettings, RunSettings, Settings
    from m3dm.data.synthetic import write_mvtec3d
    from m3dm.features.extractor import FeatureExtractor
    from m3dm.features.weights import build_point_backbone, build_rgb_backbone
    from m3dm.preprocess.mvtec3d import preprocess_dataset
    from m3dm.runtime import seed_everything

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        n_defect = max(1, args.test // 8)
        raw = write_mvtec3d(Path(tmp) / "raw", classes=("gadget",), size=args.size, n_train=args.train, n_val=0,
                            n_test_good=args.test - 4 * n_defect, n_test_defect=n_defect, progress=False)
        data = preprocess_dataset(raw, workers=2).output
        extractor = CachedExtractor(FeatureExtractor(
            build_rgb_backbone("vit_base_patch8_224_dino", random_init=True, quiet=True).eval(),
            build_point_backbone("Point_MAE", random_init=True, quiet=True), device="cpu", seed=0))
        bank = "multiple" if args.method in ("DINO+Point_MAE", "DINO+Point_MAE+Fusion") else "single"
        for shards in [1, *args.shards]:
            settings = Settings(detector=DetectorSettings(method_name=args.method, memory_bank=bank,
                                                          coreset_shards=shards),
                                run=RunSettings(dataset_path=str(data), batch_size=2))
            seed_everything(0)
            timer = StageTimer()
            run = ClassRun(settings, "gadget", extractor, timer=timer, progress=False)
            run.fit()
            rows = {m: b.rows for m, b in run.detector.banks.items()}
            metrics = run.evaluate().metrics
            results[shards] = (timer.seconds["coreset"], metrics, rows)
            print(f"S = {shards}: coreset {timer.seconds['coreset']:.1f} s, banks {rows}, "
                  + ", ".join(f"{k} {metrics[k]:.4f}" for k in METRICS), flush=True)

    exact_seconds, exact, _ = results[1]
    print(f"\n{args.method}, {args.train} training + {args.test} test samples, full config, random weights "
          f"(extraction, once: {extractor.seconds:.0f} s)")
    print(f"{'shards':>6}{'coreset s':>11}{'speed-up':>10}" + "".join(f"{m:>16}{'diff':>9}" for m in METRICS))
    for shards, (seconds, metrics, _) in results.items():
        print(f"{shards:>6}{seconds:>11.1f}{exact_seconds / seconds:>9.1f}x" + "".join(
            f"{metrics[m]:>16.4f}{metrics[m] - exact[m]:>+9.4f}" for m in METRICS))


if __name__ == "__main__":
    main()
