"""Methods side by side at the full configuration: seconds per test sample and peak memory of each, in one run.

    python benchmarks/methods.py [--methods DINO+Point_MAE+Fusion BTF_RGB BTF_FPFH BTF_RGB+FPFH CFM]
                                 [--classes 1] [--train 10] [--test 10] [--size 800] [--device cpu]
                                 [--cfm_epochs 50]

Full configuration: ViT-B/8 at 224 px and Point-MAE with 1024 groups of 128 points (main.py's defaults), BTF's
wide-ResNet-50-2 and FPFH, random weights (timings do not depend on them; the UFF block of the Fusion methods is a
random one saved in its official layout), on synthetic MVTec 3D-AD scenes of ``--size`` px (800: the size of the
largest MVTec 3D-AD scans) generated and preprocessed into a temporary folder. Each method runs through
``python -m m3dm.compare`` (one process per method, so each peak memory is the method's own); seconds per test
sample count the test split's extraction and scoring, peak memory is the method process's resident set (and,
on CUDA, the most GPU memory torch allocated). Prints the Markdown table (figures in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_METHODS = ("DINO+Point_MAE+Fusion", "BTF_RGB", "BTF_FPFH", "BTF_RGB+FPFH", "CFM")


def class_names(n: int) -> tuple[str, ...]:
    from m3dm.data.synthetic import DEFAULT_CLASSES

    return tuple(DEFAULT_CLASSES[:n]) + tuple(f"part{i}" for i in range(len(DEFAULT_CLASSES), n))


def random_uff_checkpoint(path: Path) -> Path:
    """A UFF block with random weights in fusion_pretrain.py's layout (``model`` state dict, ``epoch``)."""
    import torch

    from m3dm.uff.block import FeatureFusionBlock

    torch.manual_seed(0)
    torch.save({"model": FeatureFusionBlock(rgb_dim=768).state_dict(), "epoch": 0}, path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="METHODS names, in order")
    parser.add_argument("--classes", type=int, default=1, help="synthetic classes")
    parser.add_argument("--train", type=int, default=10, help="training samples per class")
    parser.add_argument("--test", type=int, default=10, help="test samples per class (about half defective)")
    parser.add_argument("--size", type=int, default=800, help="side of the generated scenes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--cfm_epochs", type=int, default=50,
                        help="CFM's training epochs (the reference's 50; its test time does not depend on them)")
    parser.add_argument("--keep", default=None, help="write the data and results here instead of a temporary folder")
    args = parser.parse_args()

    from m3dm.app import compare
    from m3dm.data.synthetic import write_mvtec3d
    from m3dm.preprocess.mvtec3d import preprocess_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        start = time.perf_counter()
        n_defect = max(1, args.test // 8)  # about half the test samples defective, over the four defect kinds
        raw = write_mvtec3d(root / "raw", classes=class_names(args.classes), size=args.size, n_train=args.train,
                            n_val=0, n_test_good=max(1, args.test - 4 * n_defect), n_test_defect=n_defect,
                            progress=False)
        data = preprocess_dataset(raw, workers=os.cpu_count() or 1).output
        print(f"data: {args.classes} class(es), {args.train} training and {args.test} test samples each at "
              f"{args.size} px, prepared in {time.perf_counter() - start:.0f} s", flush=True)
        out = root / "comparison"
        argv = ["--methods", *args.methods, "--dataset_path", str(data), "--output_dir", str(out), "--random_init",
                "--device", args.device, "--batch_size", str(args.batch_size), "--spool_dir", str(root), "-q",
                "--fusion_module_path", str(random_uff_checkpoint(root / "uff_random.pth")),
                "--cfm_epochs", str(args.cfm_epochs)]
        status = compare.main(argv)
        record = json.loads((out / "comparison.json").read_text())
    import torch

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
          f"threads, device {args.device}; {args.classes} class(es) x {args.train} train / {args.test} test at "
          f"{args.size} px\n")
    print("| Method | s / test sample | peak RSS GiB | peak CUDA GiB | I-AUROC (random weights) |")
    print("|:--|--:|--:|--:|--:|")
    gib = lambda n: "–" if n is None else f"{n / 1024 ** 3:.2f}"
    for method, run in record["runs"].items():
        seconds = run["seconds_per_test_sample"]
        auroc = record["metrics"]["image_rocauc"][method]["mean"]
        print(f"| {method} | {'–' if seconds is None else f'{seconds:.2f}'} | {gib(run['peak_rss_bytes'])} | "
              f"{gib(run['peak_cuda_bytes'])} | {'–' if auroc is None else f'{auroc:.3f}'} |")
    return status


if __name__ == "__main__":
    sys.exit(main())
