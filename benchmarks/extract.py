"""Per-sample feature extraction at the full configuration: ViT-B/8 at 224 px, Point-MAE with 1024 groups of 128
points, a cloud of >= 40k valid points, PFA to 56 x 56 patches.

    python benchmarks/extract.py [--samples 4] [--batch_size 2] [--device cpu] [--threads N] [--reference_seconds S]

Prints seconds per sample and peak memory for
  * the reference's way, per stage (batch 1, PFA through the interpolated (Nv x 1152) features scattered on the
    dense 1152 x 224 x 224 grid, then pooled), and
  * this project's FeatureExtractor on batches (fast PFA: one (3136 x G) operator), in float32 (default, exact)
    and with --precision bf16,
and their ratios. Weights are random (timing does not depend on them). ``--reference_seconds`` adds the ratio to
the reference implementation's own seconds per sample measured on the same machine (not re-measured here; the
figure of the recorded runs is in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch


def dense_cloud(size: int = 224, valid_fraction: float = 0.85, seed: int = 0) -> torch.Tensor:
    """An organized ``(3, size, size)`` cloud: a bumpy surface covering ``valid_fraction`` of the grid."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size
    z = 0.3 + 0.02 * np.sin(9 * u) * np.cos(7 * v) + 0.002 * rng.standard_normal((size, size))
    cloud = np.stack([u * 0.1 - 0.05, v * 0.1 - 0.05, z]).astype(np.float32)
    radius = np.sqrt((u - 0.5) ** 2 + (v - 0.5) ** 2)
    keep = radius < np.sqrt(valid_fraction / np.pi)
    cloud[:, ~keep] = 0
    return torch.from_numpy(cloud)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reference_seconds", type=float, default=None,
                        help="the reference implementation's seconds per sample on this machine, for a ratio")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from m3dm.features.alignment import pfa_patches_reference, valid_points
    from m3dm.features.extractor import FeatureExtractor
    from m3dm.features.weights import build_point_backbone, build_rgb_backbone

    torch.manual_seed(0)
    rgb_backbone = build_rgb_backbone("vit_base_patch8_224_dino", random_init=True, quiet=True).eval().to(device)
    point_backbone = build_point_backbone("Point_MAE", random_init=True, quiet=True).to(device)  # train mode
    cloud = dense_cloud().to(device)
    points, flat_index = valid_points(cloud)
    print(f"device {device}, {torch.get_num_threads()} threads; cloud with {len(points)} valid points; "
          f"{args.samples} samples")
    rgb = torch.randn(1, 3, 224, 224, device=device)
    generator = torch.Generator().manual_seed(0)

    def timed(fn, *args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(device)
        return out, time.perf_counter() - start

    with torch.no_grad():
        # warm-up
        rgb_backbone(rgb)
        point_backbone([points], generator=generator)
        stages = {"rgb backbone": 0.0, "point backbone": 0.0, "pfa": 0.0}
        rss_before = peak_rss_gb()
        # --- the reference's way: batch 1, dense grid PFA
        ref = dict(stages)
        for _ in range(args.samples):
            _, t = timed(rgb_backbone, rgb)
            ref["rgb backbone"] += t
            (feats, centres), t = timed(point_backbone, [points], generator=generator)
            ref["point backbone"] += t
            _, t = timed(pfa_patches_reference, points, flat_index, centres[0], feats[0].T, 224)
            ref["pfa"] += t
        rss_ref = peak_rss_gb()
        # --- ours: FeatureExtractor on batches (fast PFA), float32 and bfloat16
        ours_by_precision = {}
        for precision in ("fp32", "bf16"):
            extractor = FeatureExtractor(rgb_backbone, point_backbone, device=device, seed=0, precision=precision)
            extractor(rgb, cloud[None])  # warm-up
            seconds, done = 0.0, 0
            while done < args.samples:
                b = min(args.batch_size, args.samples - done)
                _, t = timed(extractor, rgb.expand(b, -1, -1, -1), cloud[None].expand(b, -1, -1, -1))
                seconds += t
                done += b
            ours_by_precision[precision] = seconds / args.samples
    n = args.samples
    print("\nthe reference's way (batch 1, dense-grid PFA), seconds per sample:")
    for stage in stages:
        print(f"  {stage:<16}{ref[stage] / n:>8.3f}")
    total_ref = sum(ref.values()) / n
    print(f"  {'total':<16}{total_ref:>8.3f}")
    print(f"\nours (FeatureExtractor, batch {args.batch_size}), seconds per sample and ratio to the reference's way:")
    for precision, seconds in ours_by_precision.items():
        versus_reference = "" if args.reference_seconds is None else \
            f"   ({args.reference_seconds / seconds:.1f}x vs the reference's {args.reference_seconds} s)"
        print(f"  {precision:<16}{seconds:>8.3f}   {total_ref / seconds:.2f}x{versus_reference}")
    print(f"\npeak host memory (process max RSS): {rss_before:.2f} GB after warm-up, {rss_ref:.2f} GB after the "
          f"reference-way passes, {peak_rss_gb():.2f} GB at the end")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 1024 ** 3:.2f} GB")


if __name__ == "__main__":
    main()
