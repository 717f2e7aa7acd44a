"""Peak resident memory of ``python -m m3dm.predict`` over N parts: it must not grow with N.

    python benchmarks/predict_memory.py [--parts 50 400] [--batch_size 8] [--pictures]

A tiny Point_MAE model (random weights, 64 groups of 32 points, point backbone in eval mode) is fitted on a
64 x 64 synthetic class; the N parts are its preprocessed test samples linked again and again under new names in
the ``{rgb,xyz}`` layout. Each run is a fresh ``m3dm.predict`` process; its peak resident memory is the ``ru_maxrss``
of a wrapper process's children (the wrapper starts only that one child). Prints N, the peak and the growth per
part from the smallest N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "64", "--group_size", "32", "--random_init",
         "--device", "cpu", "--batch_size", "4"]
PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def fitted_model(folder: Path) -> tuple[Path, Path]:
    """A saved tiny Point_MAE model of class gadget and the preprocessed test split it was evaluated on."""
    import main as main_module
    from m3dm.data.synthetic import write_mvtec3d
    from m3dm.preprocess.mvtec3d import preprocess_dataset

    raw = write_mvtec3d(folder / "raw", classes=("gadget",), size=64, n_train=2, n_val=0, n_test_good=3,
                        n_test_defect=1, progress=False)
    dataset = preprocess_dataset(raw, workers=1).output
    argv = ["--dataset_path", str(dataset), "--output_dir", str(folder / "fit"), *SMALL, "--method_name",
            "Point_MAE", "--memory_bank", "single", "--backbone_eval", "--save_model"]
    if main_module.main(argv) != 0:
        raise SystemExit("fitting the model failed")
    return folder / "fit" / "models" / "gadget.pt", dataset / "gadget" / "test"


def many_parts(test_split: Path, folder: Path, count: int) -> Path:
    """``folder/{rgb,xyz}`` with ``count`` parts: links to the test split's samples in turn."""
    samples = sorted(test_split.glob("*/rgb/*.png"))
    for kind in ("rgb", "xyz"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rgb = samples[i % len(samples)]
        xyz = rgb.parent.parent / "xyz" / f"{rgb.stem}.tiff"
        os.symlink(rgb, folder / "rgb" / f"{i:05d}.png")
        os.symlink(xyz, folder / "xyz" / f"{i:05d}.tiff")
    return folder


def peak_rss_mb(model: Path, parts: Path, output: Path, batch_size: int, pictures: bool) -> float:
    """Peak resident memory (MB) of one ``m3dm.predict`` process over ``parts``."""
    command = [sys.executable, "-m", "m3dm.predict", "--model", str(model), str(parts), "--output", str(output),
               "--batch_size", str(batch_size), "-q"] + ([] if pictures else ["--no_pictures"])
    run = subprocess.run([sys.executable, "-c", PEAK, *command], capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"m3dm.predict failed ({run.returncode}): {run.stderr[-2000:]}")
    return int(run.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, nargs="+", default=[50, 400])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--pictures", action="store_true", help="also write the heatmap PNGs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, test_split = fitted_model(Path(tmp))
        peaks = {}
        for count in sorted(args.parts):
            parts = many_parts(test_split, Path(tmp) / f"parts{count}", count)
            peaks[count] = peak_rss_mb(model, parts, Path(tmp) / f"out{count}", args.batch_size, args.pictures)
            print(f"{count} parts: peak RSS {peaks[count]:.1f} MB", flush=True)
    smallest = min(peaks)
    for count in sorted(peaks)[1:]:
        growth = (peaks[count] - peaks[smallest]) * 1024 / (count - smallest)
        print(f"{smallest} -> {count} parts: {peaks[count] - peaks[smallest]:+.1f} MB, {growth:+.1f} KB per part")
    print(json.dumps({str(k): round(v, 1) for k, v in peaks.items()}))


if __name__ == "__main__":
    main()
