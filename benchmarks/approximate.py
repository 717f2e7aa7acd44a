"""The approximate mode for large classes: each option's speed-up and its cost in the metrics against the exact
default, on the real cable-gland samples and on synthetic classes.

    python benchmarks/approximate.py [--real RAW_MVTEC3D_FOLDER] [--synthetic 1]
                                     [--train 20] [--test 12] [--shards 4] [--rows 392] [--method DINO+Point_MAE]
                                     [--shard_rows 1024] [--fusion_samples M] [--only exact ivf recommended]

Options (docs/approximate.md): ``--bank_search faiss`` (exact, for comparison), ``--coreset_shards S``,
``--bank_rows_per_sample N``, ``--bank_search hnsw``, and all three approximate ones together; the mode for large
classes: ``--bank_search ivf``, ``--coreset_shard_rows R``, ``--fusion_samples M`` (default: half the training
samples) and the three together (``recommended``). ``--only`` picks options by name (the exact default is
always run first). Full configuration
(ViT-B/8 224 px, Point-MAE 1024 x 128), random weights (none are shipped): the metrics are those of random
features, so the differences from the exact default, not the values, are the result. Every sample is extracted
once (``benchmarks/coreset.py``'s cache); the same features then fit and score the class with each option.

Data: ``--real`` (a raw MVTec 3D-AD tree, e.g. the nine real cable-gland samples: 3 training, 5 test; its class
folder is linked into a temporary root and preprocessed there) and ``--synthetic`` classes of the demo generator
(``--train`` training and ``--test`` test samples each, about half defective), preprocessed into a temporary
folder. Prints, per class and option: the fitting stages' CPU seconds (coreset, pass 2 scoring, DLF fit; all
threads; the wall seconds of the fit beside them), the test scoring's CPU seconds per sample, the speed-up of the
fit over the exact default and the metrics' differences.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from coreset import METRICS, CachedExtractor

FIT_STAGES = ("coreset", "pass 2 scoring", "dlf fit")


@dataclass
class Outcome:
    fit_seconds: float  # CPU seconds of the fitting stages (all threads)
    fit_wall: float
    test_seconds_per_sample: float  # CPU
    metrics: dict[str, float]
    stages: dict[str, float]  # CPU seconds per stage


def cpu_timer():
    """A StageTimer that also adds up each stage's CPU seconds (``cpu``): on a shared machine they depend much
    less on the other jobs than the wall seconds."""
    from contextlib import contextmanager

    from m3dm.app.run import StageTimer

    class CPUTimer(StageTimer):
        def __init__(self):
            super().__init__()
            self.cpu: dict[str, float] = {}

        @contextmanager
        def __call__(self, stage: str):
            start = time.process_time()
            with super().__call__(stage):
                yield
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - start

    return CPUTimer()


OPTION_NAMES = ("faiss", "shards", "rows", "hnsw", "all three", "ivf", "shard_rows", "fusion_samples",
                "recommended")


def options(args, train: int) -> dict[str, dict]:
    """Label -> DetectorSettings changes of the options ``args.only`` names; the first is the exact default."""
    shards, rows, shard_rows = args.shards, args.rows, args.shard_rows
    fusion = args.fusion_samples or max(1, train // 2)
    every = {"faiss": ("faiss (exact)", {"bank_search": "faiss"}),
             "shards": (f"coreset_shards {shards}", {"coreset_shards": shards}),
             "rows": (f"bank_rows_per_sample {rows}", {"bank_rows_per_sample": rows}),
             "hnsw": ("bank_search hnsw", {"bank_search": "hnsw"}),
             "all three": ("all three", {"coreset_shards": shards, "bank_rows_per_sample": rows,
                                         "bank_search": "hnsw"}),
             "ivf": ("bank_search ivf", {"bank_search": "ivf"}),
             "shard_rows": (f"coreset_shard_rows {shard_rows}", {"coreset_shard_rows": shard_rows}),
             "fusion_samples": (f"fusion_samples {fusion}", {"fusion_samples": fusion}),
             "recommended": (f"ivf + shard_rows {shard_rows} + fusion_samples {fusion}",
                             {"bank_search": "ivf", "coreset_shard_rows": shard_rows, "fusion_samples": fusion})}
    chosen = dict(every[name] for name in (args.only or OPTION_NAMES))
    return {"exact (default)": {}, **chosen}


def run_option(data: Path, class_name: str, extractor, method: str, changes: dict) -> Outcome:
    from m3dm.app.run import ClassRun
    from m3dm.config import DetectorSettings, RunSettings, Settings
    from m3dm.runtime import seed_everything

    bank = "multiple" if method in ("DINO+Point_MAE", "DINO+Point_MAE+Fusion") else "single"
    settings = Settings(detector=DetectorSettings(method_name=method, memory_bank=bank, **changes),
                        run=RunSettings(dataset_path=str(data), batch_size=2))
    seed_everything(0)
    timer = cpu_timer()
    run = ClassRun(settings, class_name, extractor, timer=timer, progress=False)
    run.fit()
    result = run.evaluate()
    stages = dict(timer.cpu)
    return Outcome(sum(stages.get(s, 0.0) for s in FIT_STAGES), sum(timer.seconds.get(s, 0.0) for s in FIT_STAGES),
                   stages["test scoring"] / len(result.labels), {m: float(result.metrics[m]) for m in METRICS},
                   stages)


def prepared_datasets(root: Path, args) -> list[tuple[str, Path, str]]:
    """``(label, preprocessed root, class)`` of every class to measure."""
    from m3dm.data.synthetic import DEFAULT_CLASSES, write_mvtec3d
    from m3dm.preprocess.mvtec3d import preprocess_dataset

    datasets = []
    if args.real:
        real = Path(args.real).resolve()
        linked = root / "real"
        linked.mkdir()
        classes = sorted(p for p in real.iterdir() if p.is_dir())
        for folder in classes:
            os.symlink(folder, linked / folder.name, target_is_directory=True)
        data = preprocess_dataset(linked, root / "real_preprocessed", workers=2, progress=False).output
        datasets += [(f"real {folder.name}", data, folder.name) for folder in classes]
    if args.synthetic:
        classes = DEFAULT_CLASSES[:args.synthetic]
        n_defect = max(1, args.test // 8)
        raw = write_mvtec3d(root / "synthetic", classes=classes, size=args.size, n_train=args.train, n_val=0,
                            n_test_good=args.test - 4 * n_defect, n_test_defect=n_defect, progress=False)
        data = preprocess_dataset(raw, workers=2, progress=False).output
        datasets += [(f"synthetic {name}", data, name) for name in classes]
    return datasets


def print_table(label: str, outcomes: dict[str, Outcome]) -> None:
    exact = next(iter(outcomes.values()))
    print(f"\n{label}\n")
    print("| option | coreset CPU s | pass 2 CPU s | DLF CPU s | fit CPU s (wall) | fit speed-up (CPU) | "
          "test CPU s/sample | "
          + " | ".join(f"{m} (diff)" for m in METRICS) + " |")
    print("|:--|--:|--:|--:|--:|--:|--:|" + "--:|" * len(METRICS))
    for name, o in outcomes.items():
        stages = " | ".join(f"{o.stages.get(s, 0.0):.1f}" for s in FIT_STAGES)
        metrics = " | ".join(f"{o.metrics[m]:.4f} ({o.metrics[m] - exact.metrics[m]:+.4f})" for m in METRICS)
        speed_up = exact.fit_seconds / o.fit_seconds
        print(f"| {name} | {stages} | {o.fit_seconds:.1f} ({o.fit_wall:.1f}) | {speed_up:.2f}x | "
              f"{o.test_seconds_per_sample:.2f} | {metrics} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", default=None, help="a raw MVTec 3D-AD tree of real samples (default: none)")
    parser.add_argument("--synthetic", type=int, default=1, help="synthetic classes (0: none)")
    parser.add_argument("--train", type=int, default=20, help="training samples per synthetic class")
    parser.add_argument("--test", type=int, default=12, help="test samples per synthetic class (half defective)")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic images")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=392, help="--bank_rows_per_sample")
    parser.add_argument("--shard_rows", type=int, default=1024, help="--coreset_shard_rows")
    parser.add_argument("--fusion_samples", type=int, default=None,
                        help="--fusion_samples (default: half the training samples)")
    parser.add_argument("--only", nargs="+", default=None, choices=OPTION_NAMES, help="options to run (default: all)")
    parser.add_argument("--method", default="DINO+Point_MAE")
    args = parser.parse_args()

    import torch

    from m3dm.data.layout import discover_samples
    from m3dm.features.extractor import FeatureExtractor
    from m3dm.features.weights import build_point_backbone, build_rgb_backbone

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        datasets = prepared_datasets(Path(tmp), args)
        print(f"data prepared in {time.perf_counter() - start:.0f} s; {torch.get_num_threads()} torch threads",
              flush=True)
        torch.manual_seed(0)  # the random backbone weights, the same in every run
        extractor = CachedExtractor(FeatureExtractor(
            build_rgb_backbone("vit_base_patch8_224_dino", random_init=True, quiet=True).eval(),
            build_point_backbone("Point_MAE", random_init=True, quiet=True), device="cpu", seed=0))
        for label, data, class_name in datasets:
            outcomes = {}
            train = len(discover_samples(data, class_name, "train"))
            for name, changes in options(args, train).items():
                outcomes[name] = run_option(data, class_name, extractor, args.method, changes)
                print(f"{label}, {name}: fit {outcomes[name].fit_seconds:.1f} CPU s, "
                      + ", ".join(f"{m} {v:.4f}" for m, v in outcomes[name].metrics.items()), flush=True)
            print_table(f"{label}: {args.method}, random weights (extraction, once: {extractor.seconds:.0f} s "
                        f"so far)", outcomes)


if __name__ == "__main__":
    main()
