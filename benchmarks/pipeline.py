"""One class end to end at a realistic size on the CPU: per stage, seconds and peak host memory.

    python benchmarks/pipeline.py [--train 100] [--test 20] [--method DINO+Point_MAE] [--size 256]

Full configuration (ViT-B/8 at 224 px, Point-MAE with 1024 groups of 128 points, random weights: timings do not
depend on the weights) on synthetic MVTec 3D-AD data generated and preprocessed into a temporary folder.
Stages: extract (both backbones + PFA, pass 1 and test), memory (bank appends), coreset, pass 2 scoring and DLF
fit (decision layer fusion), test scoring, metrics. Peak memory is the process's resident set size sampled every
20 ms while the stage runs.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from m3dm.app.run import StageTimer

METHODS_WITHOUT_UFF = ("DINO", "Point_MAE", "DINO+Point_MAE", "DINO+Point_MAE+add")
# The reference's seconds per sample pass through both backbones, measured on the benchmark machine
# (benchmarks/README.md, "Performance targets")
REFERENCE_SECONDS_PER_PASS = 8.9


def rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024 ** 2
    return float("nan")


class MemoryTimer(StageTimer):
    """StageTimer that also records the peak resident memory seen during each stage."""

    def __init__(self):
        super().__init__()
        self.peak: dict[str, float] = {}
        self._current = 0.0
        self._stop = False
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop:
            self._current = max(self._current, rss_gb())
            time.sleep(0.02)

    @contextmanager
    def __call__(self, stage: str):
        self._current = rss_gb()
        with super().__call__(stage):
            yield
        self.peak[stage] = max(self.peak.get(stage, 0.0), self._current, rss_gb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=20, help="test samples (half good, half defective)")
    parser.add_argument("--size", type=int, default=256, help="side of the generated images")
    parser.add_argument("--method", default="DINO+Point_MAE", choices=METHODS_WITHOUT_UFF)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--coreset_shards", type=int, default=1)
    args = parser.parse_args()

    import torch

    from m3dm.app.run import ClassRun
    from m3dm.config import METHODS, Settings
    from m3dm.data.synthetic import write_mvtec3d
    from m3dm.features.extractor import FeatureExtractor
    from m3dm.features.weights import build_point_backbone, build_rgb_backbone
    from m3dm.preprocess.mvtec3d import preprocess_dataset
    from m3dm.runtime import seed_everything

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        n_defect = max(1, args.test // 8)  # half the test samples defective, over the four defect kinds
        raw = write_mvtec3d(Path(tmp) / "raw", classes=("gadget",), size=args.size, n_train=args.train, n_val=0,
                            n_test_good=args.test - 4 * n_defect, n_test_defect=n_defect, progress=False)
        data = preprocess_dataset(raw, workers=2).output
        print(f"data: {args.train} training and {args.test} test samples at {args.size} px, prepared in "
              f"{time.perf_counter() - start:.0f} s")
        settings = Settings().replace(
            detector={"method_name": args.method, "memory_bank": METHODS[args.method].memory_bank,
                      "coreset_shards": args.coreset_shards},
            backbones={"random_init": True, "precision": args.precision},
            run={"dataset_path": str(data), "batch_size": args.batch_size, "spool_dir": tmp})
        settings.validate()
        seed_everything(0)
        rgb = build_rgb_backbone("vit_base_patch8_224_dino", random_init=True, quiet=True).eval()
        point = build_point_backbone("Point_MAE", random_init=True, quiet=True)
        extractor = FeatureExtractor(rgb, point, device="cpu", seed=0, precision=args.precision)
        timer = MemoryTimer()
        baseline = rss_gb()
        run = ClassRun(settings, "gadget", extractor, timer=timer)
        run.fit()
        result = run.evaluate()
        timer._stop = True
    print(f"\nmethod {args.method}, --precision {args.precision}, --coreset_shards {args.coreset_shards}, "
          f"{torch.get_num_threads()} threads, resident memory before fitting {baseline:.2f} GB")
    print(f"{'stage':<18}{'seconds':>10}{'peak RSS GB':>14}")
    for stage, seconds in timer.seconds.items():
        print(f"{stage:<18}{seconds:>10.1f}{timer.peak.get(stage, float('nan')):>14.2f}")
    total = sum(timer.seconds.values())
    print(f"{'total':<18}{total:>10.1f}")
    # The reference passes every training sample through the extractor twice (pass 1, and pass 2 for decision
    # layer fusion) and every test sample once; its coreset (hours on a CPU for these banks) is left out, which
    # favours the reference.
    dlf = settings.detector.uses_dlf
    reference_passes = (2 if dlf else 1) * args.train + args.test
    reference = REFERENCE_SECONDS_PER_PASS * reference_passes
    print(f"reference, at least: {reference_passes} sample passes x {REFERENCE_SECONDS_PER_PASS} s = "
          f"{reference:.0f} s (its coreset not counted) -> this run is {reference / total:.2f}x faster; per "
          f"sample: {total / (args.train + args.test):.2f} s")
    print("metrics (random weights, for completeness):", {k: round(v, 3) for k, v in result.metrics.items()})


if __name__ == "__main__":
    main()
