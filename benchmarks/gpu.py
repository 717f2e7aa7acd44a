"""The GPU figures in one command: extraction, fit and test throughput, coreset time and peak GPU memory.

    python benchmarks/gpu.py [--device cuda] [--train 400] [--test 100] [--json gpu.json]
    python benchmarks/gpu.py --device cpu --tiny          # CI: a tiny size on the CPU keeps the script working

Full configuration (the default): synthetic MVTec 3D-AD scenes generated raw at 800 x 800 and preprocessed, ViT-B/8
at 224 px, Point-MAE with 1024 groups of 128 points, a UFF block, random weights in the official formats
(timings do not depend on the weights). Figures (their targets in brackets):

- extraction samples/s through both backbones and PFA at batch 1, 8 and 32 (>= 100 at batch 32), data loaded
  by worker processes into pinned memory;
- fit of a ``--train``-sample class with DINO+Point_MAE+Fusion, all three banks and decision layer fusion
  (< 60 s for 400 samples), and the finalisation of the xyz bank alone (projection + exact greedy coreset of its
  400 x 3136 = 1.25 M rows, < 30 s);
- test samples/s of DINO+Point_MAE+Fusion against those full-size banks (>= 50);
- peak GPU memory of the test pass at batch 1 (< 10 GB);
- the CPU's extraction samples/s at batch 1 on a few samples, for the ratio.

Prints a Markdown table; ``--json`` also writes the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "full": {"size": 800, "rgb": "vit_base_patch8_224_dino", "num_group": 1024, "group_size": 128, "train": 400,
             "test": 100, "batches": (1, 8, 32), "extract_samples": 96, "workers": 8, "cpu_samples": 4},
    "tiny": {"size": 96, "rgb": "vit_tiny_patch16_224", "num_group": 64, "group_size": 32, "train": 4,
             "test": 4, "batches": (1, 2, 4), "extract_samples": 4, "workers": 0, "cpu_samples": 2},
}
TARGETS = {"extract_per_s_batch32": ">= 100", "fit_s": "< 60 (400 samples)", "xyz_coreset_s": "< 30 (1.25 M rows)",
           "test_per_s": ">= 50", "peak_gpu_gb_batch1": "< 10"}
METHOD = "DINO+Point_MAE+Fusion"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(root: Path, size: dict, train: int, test: int) -> Path:
    """Raw synthetic scenes at the configured size, preprocessed as utils/preprocessing.py does, both on every
    core (without Open3D the background plane is m3dm's own RANSAC, which gives Open3D's plane)."""
    from m3dm.data.synthetic import write_mvtec3d
    from m3dm.preprocess.common import default_workers
    from m3dm.preprocess.mvtec3d import preprocess_dataset

    n_defect = max(1, test // 8)  # half the test parts defective, over the four defect kinds
    raw = write_mvtec3d(root / "raw", classes=("gadget",), size=size["size"], n_train=train, n_val=0,
                        n_test_good=max(1, test - 4 * n_defect), n_test_defect=n_defect, progress=False,
                        workers=default_workers())
    summary = preprocess_dataset(raw, workers=default_workers())
    if summary.errors:
        raise RuntimeError("preprocessing failed:\n" + summary.report())
    return summary.output


def build(size: dict, device: torch.device, folder: Path):
    """Backbones and a UFF block with random weights; the block goes through its official checkpoint format."""
    from m3dm.config import BackboneSettings
    from m3dm.features.extractor import build_extractor
    from m3dm.runtime import seed_everything
    from m3dm.uff.block import FeatureFusionBlock, load_fusion_block

    seed_everything(0)
    backbones = BackboneSettings(rgb_backbone_name=size["rgb"], num_group=size["num_group"],
                                 group_size=size["group_size"], random_init=True)
    extractor = build_extractor(backbones, needs_rgb=True, needs_xyz=True, device=device, seed=0, clamp_pfa=False)
    checkpoint = folder / "uff_random.pth"
    torch.save({"model": FeatureFusionBlock(rgb_dim=extractor.rgb_backbone.feature_dim).state_dict()}, checkpoint)
    return extractor, load_fusion_block(checkpoint, device, rgb_dim=extractor.rgb_backbone.feature_dim)


def extraction_rate(extractor, data: Path, size: dict, batch: int, samples: int, workers: int) -> float:
    """Samples per second through both backbones and PFA (one warm-up batch first)."""
    from torch.utils.data import Subset

    from m3dm.data.dataset import AnomalyDataset, make_loader

    dataset = AnomalyDataset(data, "gadget", "train", 224)
    samples = min(samples, len(dataset))
    cuda = extractor.device.type == "cuda"
    loader = make_loader(Subset(dataset, range(samples)), batch, workers, pin_memory=cuda)
    batches = list(loader)  # decoded up front: this figure is the extractor's, the loader's is in the fit
    extractor(batches[0]["rgb"], batches[0]["pc"])
    sync(extractor.device)
    start = time.perf_counter()
    for b in batches:
        extractor(b["rgb"], b["pc"])
    sync(extractor.device)
    return samples / (time.perf_counter() - start)


class FinalizeTimes:
    """Seconds of each bank's finalisation (normalisation, projection, coreset), in the detector's order."""

    def __init__(self):
        from m3dm.memory.bank import MemoryBank

        self.seconds: list[tuple[int, float]] = []
        self._bank, self._original = MemoryBank, MemoryBank.finalize
        times = self

        def timed(bank, *args, **kwargs):
            rows, start = int(bank.rows), time.perf_counter()
            out = times._original(bank, *args, **kwargs)
            times.seconds.append((rows, time.perf_counter() - start))
            return out

        MemoryBank.finalize = timed

    def restore(self) -> None:
        self._bank.finalize = self._original


def fit_and_test(settings, extractor, fusion_block, device: torch.device) -> dict:
    from m3dm.app.run import ClassRun, StageTimer

    figures: dict = {}
    timer = StageTimer()
    run = ClassRun(settings, "gadget", extractor, fusion_block, device=device, timer=timer, progress=False)
    finalize_times = FinalizeTimes()
    try:
        start = time.perf_counter()
        run.fit()
        sync(device)
        figures["fit_s"] = time.perf_counter() - start
    finally:
        finalize_times.restore()
    figures["fit_stages_s"] = dict(timer.seconds)
    figures["bank_rows_and_finalize_s"] = finalize_times.seconds
    figures["xyz_coreset_s"] = finalize_times.seconds[0][1]  # xyz is finalised first
    timer.seconds.clear()
    start = time.perf_counter()
    result = run.evaluate()
    sync(device)
    figures["test_per_s"] = len(result.labels) / (time.perf_counter() - start)
    figures["metrics"] = result.metrics
    single = ClassRun(settings.replace(run={"batch_size": 1}), "gadget", extractor, fusion_block, device=device,
                      progress=False)
    single.detector = run.detector
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    single.evaluate()
    figures["peak_gpu_gb_batch1"] = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                     else None)
    return figures


def table(figures: dict) -> str:
    """The figures measured so far (a run stopped by its time limit shows n/a for the rest)."""
    finalize = figures.get("bank_rows_and_finalize_s") or [("?", None)]
    rows = [("data: generate + preprocess (s)", figures.get("data_s"), "")]
    rows += [(f"extraction samples/s, batch {b}", v, TARGETS["extract_per_s_batch32"] if b == 32 else "")
             for b, v in figures.get("extract_per_s", {}).items()]
    rows += [(f"fit of {figures['train']} samples, all banks + DLF (s)", figures.get("fit_s"), TARGETS["fit_s"]),
             (f"xyz bank finalisation, {finalize[0][0]:,} rows (s)" if finalize[0][1] is not None
              else "xyz bank finalisation (s)", figures.get("xyz_coreset_s"), TARGETS["xyz_coreset_s"]),
             (f"test samples/s, {METHOD}", figures.get("test_per_s"), TARGETS["test_per_s"]),
             ("peak GPU memory, test at batch 1 (GB)", figures.get("peak_gpu_gb_batch1"),
              TARGETS["peak_gpu_gb_batch1"]),
             ("CPU extraction samples/s, batch 1", figures.get("cpu_extract_per_s"), ""),
             ("GPU / CPU extraction at batch 1", figures.get("gpu_over_cpu"), "")]
    lines = ["| figure | value | target |", "|---|---:|---|"]
    for name, value, target in rows:
        shown = "n/a" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {shown} | {target} |")
    return "\n".join(lines)


def measure(figures: dict, args, size: dict, device: torch.device, tmp: Path) -> None:
    """Fill ``figures`` stage by stage, printing each figure as soon as it is measured."""
    from m3dm.config import Settings

    def done(*keys: str) -> None:
        print("  " + ", ".join(f"{key} = {figures[key]}" for key in keys), flush=True)

    start = time.perf_counter()
    data = make_data(tmp, size, figures["train"], figures["test"])
    figures["data_s"] = time.perf_counter() - start
    done("data_s")
    extractor, fusion_block = build(size, device, tmp)
    figures["extract_per_s"] = {}
    # a batch larger than the training samples would measure the same batch again (the rehearsal's few samples)
    for b in sorted({min(b, figures["train"]) for b in size["batches"]}):
        figures["extract_per_s"][b] = extraction_rate(extractor, data, size, b, size["extract_samples"],
                                                      size["workers"])
        print(f"  extraction samples/s at batch {b} = {figures['extract_per_s'][b]:.3g}", flush=True)
    settings = Settings().replace(
        detector={"method_name": METHOD, "memory_bank": "multiple"},
        backbones={"rgb_backbone_name": size["rgb"], "num_group": size["num_group"],
                   "group_size": size["group_size"], "random_init": True},
        uff={"use_uff": True, "fusion_module_path": str(tmp / "uff_random.pth")},
        run={"dataset_path": str(data), "batch_size": args.batch_size, "num_workers": size["workers"],
             "device": str(device), "spool_dir": str(tmp), "max_sample": figures["train"]})
    settings.validate()
    figures.update(fit_and_test(settings, extractor, fusion_block, device))
    done("fit_s", "xyz_coreset_s", "test_per_s", "peak_gpu_gb_batch1")
    if device.type == "cuda":
        cpu_extractor, _ = build(size, torch.device("cpu"), tmp)
        figures["cpu_extract_per_s"] = extraction_rate(cpu_extractor, data, size, 1, size["cpu_samples"], 0)
        figures["gpu_over_cpu"] = figures["extract_per_s"][1] / figures["cpu_extract_per_s"]
    else:
        figures["cpu_extract_per_s"] = figures["extract_per_s"][min(figures["extract_per_s"])]
        figures["gpu_over_cpu"] = None
    done("cpu_extract_per_s", "gpu_over_cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and data (CI, CPU)")
    parser.add_argument("--train", type=int, help="training samples (default 400; tiny: 4)")
    parser.add_argument("--test", type=int, help="test samples (default 100; tiny: 4)")
    parser.add_argument("--batch_size", type=int, default=32, help="batch of the fit and the test pass")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from m3dm.runtime import resolve_device, use_device

    size = SIZES["tiny" if args.tiny else "full"]
    device = resolve_device(args.device)
    use_device(device)
    train, test = args.train or size["train"], args.test or size["test"]
    figures: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                     or "cpu", "torch": torch.__version__, "size": "tiny" if args.tiny else "full", "train": train,
                     "test": test, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            measure(figures, args, size, device, Path(tmp))
        except KeyboardInterrupt:  # a time limit (timeout -s INT): report what was measured, then leave at once
            figures["stopped"] = "interrupted before the end (time limit?)"
            report(figures, args)
            print("stopped before every figure was measured", file=sys.stderr, flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
            # Freeing the interrupted frames would shut the data loaders' worker processes down one by one, each
            # join waiting up to 5 s: longer than the grace before `timeout -k` kills. The figures are written.
            os._exit(1)
    report(figures, args)


def report(figures: dict, args) -> None:
    """Print the table of the figures measured so far, and write them to ``--json``."""
    print(f"\n{figures['device']}, torch {figures['torch']}, {figures['size']} size, {figures['train']} training / "
          f"{figures['test']} test samples, batch {args.batch_size}\n")
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
        print(f"\nfigures written to {args.json}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
