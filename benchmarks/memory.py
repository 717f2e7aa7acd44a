"""Peak host memory of fitting one class with 400 training samples at the full configuration, all three banks.

    python benchmarks/memory.py [--train 400] [--bank_storage disk] [--coreset_shards 400] [--pass2 8]

DINO+Point_MAE+Fusion with decision layer fusion, the reference's default: xyz bank 400 x 3136 = 1,254,400 rows
x 1152, fusion bank 1,254,400 x 1920, RGB bank 400 x 784 = 313,600 x 768 (16.4 GB of float32 patches before the
coreset). The backbones (ViT-B/8, Point-MAE) and the UFF block are the real modules with random weights, loaded
as a run loads them. Extracting 400 samples on 2 cores takes ~25 min and does not change the banks' memory, so
the backbones extract ``--real`` samples (a 41k-point cloud each, as benchmarks/extract.py) and every training
sample is one of them plus small Gaussian noise (per-row norms and cluster structure of real features). The
fusion rows come from the real UFF block, per sample, as in a run.

Stages, each with seconds and peak resident memory (sampled every 20 ms): models, extract, memory (bank
appends; the patches go to the spool file with --bank_storage disk), coreset (projection + greedy selection of
every bank; --coreset_shards 1 is the reference's exact selection, slower), pass 2 (--pass2 samples scored
against the full-size banks: its memory does not grow with the count), dlf fit (on 400 training samples' score
vectors and maps: the pass-2 results repeated). The float32 patches the reference would hold are printed for
comparison.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from extract import dense_cloud
from pipeline import MemoryTimer, rss_gb


def noisy(features, generator: torch.Generator, scale: float):
    from m3dm.features.extractor import SampleFeatures

    def jitter(tensor):
        return tensor + scale * tensor.std() * torch.randn(tensor.shape, generator=generator)

    return SampleFeatures(rgb_map=(rgb_map := jitter(features.rgb_map)),
                          rgb=rgb_map.flatten(1).T.contiguous(), xyz=jitter(features.xyz))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--real", type=int, default=2, help="samples really extracted")
    parser.add_argument("--bank_storage", default="disk", choices=("disk", "memory"))
    parser.add_argument("--coreset_shards", type=int, default=400,
                        help="400: one greedy selection per training sample (~8 min); 1: exact (hours on a CPU)")
    parser.add_argument("--pass2", type=int, default=8, help="training samples scored in pass 2")
    parser.add_argument("--noise", type=float, default=0.05, help="noise std relative to the features' std")
    args = parser.parse_args()

    from m3dm.config import DetectorSettings
    from m3dm.detection.detector import Detector
    from m3dm.features.extractor import FeatureExtractor
    from m3dm.features.weights import build_point_backbone, build_rgb_backbone
    from m3dm.uff.block import FeatureFusionBlock

    timer = MemoryTimer()
    baseline = rss_gb()
    with timer("models"):
        extractor = FeatureExtractor(
            build_rgb_backbone("vit_base_patch8_224_dino", random_init=True, quiet=True).eval(),
            build_point_backbone("Point_MAE", random_init=True, quiet=True), device="cpu", seed=0)
        torch.manual_seed(0)
        fusion_block = FeatureFusionBlock().eval()
    with timer("extract"):
        real = []
        for i in range(args.real):
            rgb = torch.rand((1, 3, 224, 224), generator=torch.Generator().manual_seed(i))
            real += extractor(rgb, dense_cloud(224, seed=i)[None])
    config = DetectorSettings(method_name="DINO+Point_MAE+Fusion", memory_bank="multiple", random_state=0,
                              coreset_shards=args.coreset_shards)
    with tempfile.TemporaryDirectory() as spool:
        detector = Detector(config, fusion_block=fusion_block, progress=True,
                            spool_dir=spool if args.bank_storage == "disk" else None)
        generator = torch.Generator().manual_seed(1)
        with timer("memory"):
            for i in range(args.train):
                detector.add(noisy(real[i % len(real)], generator, args.noise))
        rows = {m: bank.rows for m, bank in detector.banks.items()}
        with timer("coreset"):
            detector.finalize()
        with timer("pass 2"):
            scores = [detector.modality_scores(detector.training_patches(i)) for i in range(args.pass2)]
        with timer("dlf fit"):
            detector.fit_fusion([scores[i % len(scores)] for i in range(args.train)])
        detector.release_training_samples()
    timer._stop = True

    float32_gb = sum(rows[m] * detector.banks[m].dim * 4 for m in rows) / 1e9
    print(f"\n{args.train} training samples, DINO+Point_MAE+Fusion, --bank_storage {args.bank_storage}, "
          f"--coreset_shards {args.coreset_shards}, {torch.get_num_threads()} threads")
    print("bank rows before -> after the coreset: " + ", ".join(
        f"{m} {rows[m]:,} -> {detector.banks[m].rows:,} x {detector.banks[m].dim}" for m in rows))
    print(f"float32 training patches (what the reference holds in RAM before its coreset): {float32_gb:.1f} GB")
    print(f"resident memory at start {baseline:.2f} GB")
    print(f"{'stage':<12}{'seconds':>10}{'peak RSS GB':>14}")
    for stage, seconds in timer.seconds.items():
        print(f"{stage:<12}{seconds:>10.1f}{timer.peak.get(stage, float('nan')):>14.2f}")
    peak = max(timer.peak.values())
    print(f"peak resident memory {peak:.2f} GB (target < 10 GB): {'met' if peak < 10 else 'NOT met'}; "
          f"pass 2 {timer.seconds['pass 2'] / max(1, args.pass2):.2f} s per training sample")


if __name__ == "__main__":
    main()
