"""Per-sample anomaly scoring (nearest-neighbour search) against full-size memory banks: the plain float32 search
against the exact bfloat16-screened one (m3dm.memory.screened).

    python benchmarks/scoring.py [--samples 2] [--fix_quirks] [--query_noise 0.08]
                                 [--from_features [--tile_noise 0.1]] [--threads N]

Bank sizes are those fitting 400 training samples gives (10 % coreset); query rows per test sample in brackets:

  * default DINO+Point_MAE+Fusion: xyz 125,440 x 1152 [3136], rgb 12,544 x 768 [784], fusion 12,544 x 1920 [3136]
    (rgb and fusion keep 10 % of the reduced xyz bank, quirk 27);
  * --fix_quirks: xyz 125,440 x 1152, rgb 31,360 x 768, fusion 125,440 x 1920 (each bank 10 % of its own rows).

Data (timing depends on it through the number of candidates the screening keeps):

  * default, a clustered generator (see ``clustered_bank``): rows = a common offset + one of rows/32 cluster
    centres + within-cluster noise, queries = random bank rows + noise, i.e. test patches close to training
    patches; --query_noise flattens it. Row norms, the nearest/typical distance ratio and the relative gap between
    the second and the first nearest squared distance (what decides the screening) are measured and printed.
  * --from_features: real extracted features (random-weight ViT-B/8 DINO and Point-MAE, a random-weight fusion
    block) of synthetic MVTec 3D-AD scenes, preprocessed (about 80 % of the xyz patches empty, as on the real
    data): 3 training samples, normalised like the method (quirk 26: xyz mean and
    rgb std for every bank; own statistics with --fix_quirks), tiled to the bank size with small noise (the copies
    are near-duplicates, unlike a coreset's spread rows; --tile_noise 0.5 spreads them); the queries are further
    scenes' features. Random weights give flat distances: the screening may not pay, and then falls back.

For each bank: seconds per sample of the plain ``nearest_neighbours`` (blocked torch.cdist, float32) and of
``ScreenedBank.search`` (the once-per-bank preparation is timed apart), their ratio, candidates per screened
query, the mean re-ranked union as a fraction of the bank, the blocks scored by the plain path (fallbacks), and
whether both give bit-identical distances and indices. With --from_features also MemoryBank.score itself (its
distances and image score checked against the plain search), which searches the row of empty (all-zero) patches
once per bank: about 80 % of an xyz sample.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from m3dm.memory.bank import MemoryBank
from m3dm.memory.screened import ScreenedBank, bf16_matmul_is_fast
from m3dm.memory.search import nearest_neighbours, reweighted_score

TRAIN_SAMPLES = 400
XYZ_ROWS = TRAIN_SAMPLES * 3136 // 10  # 125,440
BANKS = {  # name: (bank rows, dim, query rows per sample)
    False: {"xyz": (XYZ_ROWS, 1152, 3136), "rgb": (XYZ_ROWS // 10, 768, 784), "fusion": (XYZ_ROWS // 10, 1920, 3136)},
    True: {"xyz": (XYZ_ROWS, 1152, 3136), "rgb": (TRAIN_SAMPLES * 784 // 10, 768, 784),
           "fusion": (XYZ_ROWS, 1920, 3136)},
}
CLUSTER_SIZE = 32  # bank rows per cluster in the clustered generator
OFFSET, CENTRE_SPREAD, WITHIN_SPREAD, QUERY_NOISE = 1.0, 0.25, 0.10, 0.08  # per element (std)
TILE_NOISE = 0.1  # --from_features default: noise per element, a fraction of the features' centred per-element std


def clustered_bank(rows: int, dim: int, queries: int, samples: int, seed: int, query_noise: float = QUERY_NOISE):
    """A clustered bank and ``samples`` query sets (float32).

    Per element: offset ~ N(0, 1.0) shared by all rows (features are far from centred), centres ~ N(0, 0.25^2),
    within-cluster noise N(0, 0.10^2), query noise N(0, 0.08^2) by default. So the nearest row is usually the
    query's own source row (distance ~ 0.08 sqrt(dim)), its cluster mates lie at ~ 0.16 sqrt(dim) and other
    clusters at ~ 0.39 sqrt(dim): nearest/typical ratio about 0.2; raw row norms ~ 1.04 sqrt(dim), centred
    ~ 0.27 sqrt(dim). A larger ``query_noise`` flattens the distances (harder for the screening).
    """
    generator = torch.Generator().manual_seed(seed)
    offset = OFFSET * torch.randn(dim, generator=generator)
    centres = CENTRE_SPREAD * torch.randn(max(1, rows // CLUSTER_SIZE), dim, generator=generator)
    members = torch.randint(0, centres.shape[0], (rows,), generator=generator)
    bank = torch.randn(rows, dim, generator=generator).mul_(WITHIN_SPREAD).add_(centres[members]).add_(offset)
    query_sets = []
    for _ in range(samples):
        source = torch.randint(0, rows, (queries,), generator=generator)
        query_sets.append(bank[source] + query_noise * torch.randn(queries, dim, generator=generator))
    return bank, query_sets


# -- real features -----------------------------------------------------------------------------------------

def extract_scene_features(scenes: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """xyz, rgb and fusion patch features of ``scenes`` synthetic scenes, preprocessed as MVTec 3D-AD (background
    plane removed: most xyz patches are empty, as in the real data), random-weight backbones and block."""
    from PIL import Image

    from m3dm.data.dataset import sample_tensors
    from m3dm.data.synthetic import make_mvtec_scene
    from m3dm.features.extractor import FeatureExtractor
    from m3dm.features.weights import build_point_backbone, build_rgb_backbone
    from m3dm.preprocess.mvtec3d import preprocess_arrays
    from m3dm.uff.block import FeatureFusionBlock

    torch.manual_seed(seed)
    rgb_backbone = build_rgb_backbone("vit_base_patch8_224_dino", random_init=True, quiet=True).eval()
    point_backbone = build_point_backbone("Point_MAE", random_init=True, quiet=True)  # train mode, as the reference
    extractor = FeatureExtractor(rgb_backbone, point_backbone, seed=seed)
    block = FeatureFusionBlock().eval()
    out = []
    for index in range(scenes):
        scene = make_mvtec_scene(np.random.default_rng(seed + index), 256, 256, "gadget")
        cloud, image, _, _ = preprocess_arrays(scene.cloud, scene.rgb, seed=seed)
        rgb, cloud, _ = sample_tensors(cloud, Image.fromarray(image), None, 224, f"scene {index}")
        features = extractor(rgb[None], cloud[None])[0]
        with torch.no_grad():
            fused = block.feature_fusion(features.xyz, features.rgb_aligned())
        out.append({"xyz": features.xyz, "rgb": features.rgb, "fusion": fused})
    return out


def tiled_bank(train: torch.Tensor, rows: int, noise: float, seed: int) -> torch.Tensor:
    """``rows`` rows: the training rows repeated in order, each copy after the first with noise of ``noise``
    times the centred per-element std."""
    generator = torch.Generator().manual_seed(seed)
    scale = noise * float((train - train.mean(dim=0)).std())
    copies = -(-rows // train.shape[0])
    bank = train.repeat(copies, 1)[:rows].clone()
    noisy = bank[train.shape[0]:]
    noisy.add_(scale * torch.randn(noisy.shape, generator=generator))
    return bank


def feature_banks(fix_quirks: bool, samples: int, noise: float, seed: int) -> dict[str, tuple]:
    """Per bank: the normalised bank, the normalised query sets, and (the raw query sets, mean, std), from real
    features: 3 training scenes, ``samples`` test scenes."""
    scenes = extract_scene_features(3 + samples, seed)
    train, test = scenes[:3], scenes[3:]
    raw = {m: torch.cat([s[m] for s in train]) for m in ("xyz", "rgb", "fusion")}
    if fix_quirks:
        stats = {m: (raw[m].mean(), raw[m].std()) for m in raw}
    else:  # quirk 26: the xyz bank's mean and the rgb bank's std normalise every bank
        stats = {m: (raw["xyz"].mean(), raw["rgb"].std()) for m in raw}
    banks = {}
    for name, (rows, _, _) in BANKS[fix_quirks].items():
        mean, std = stats[name]
        bank = tiled_bank((raw[name] - mean) / std, rows, noise, seed)
        raw_queries = [s[name] for s in test]  # what MemoryBank.score gets: unnormalised, empty patches all zero
        banks[name] = (bank, [(q - mean) / std for q in raw_queries], (raw_queries, mean, std))
    return banks


# -- measurement -------------------------------------------------------------------------------------------

def describe(bank: torch.Tensor, queries: torch.Tensor, nearest: torch.Tensor, seed: int) -> str:
    """Median raw and centred row norms, the median nearest / typical query-bank distance ratio, and the median
    relative gap between the second and the first nearest squared distance (what the screening must resolve)."""
    generator = torch.Generator().manual_seed(seed)
    some_rows = bank[torch.randint(0, bank.shape[0], (2000,), generator=generator)]
    some_queries = queries[torch.randint(0, queries.shape[0], (200,), generator=generator)]
    typical = torch.cdist(some_queries.double(), some_rows.double()).median()
    two = torch.cdist(some_queries, bank).topk(2, dim=1, largest=False).values.double().square()
    gap = ((two[:, 1] - two[:, 0]) / two[:, 0]).median()
    centred = (bank - bank.mean(dim=0)).norm(dim=1).median()
    return (f"row norm {bank.norm(dim=1).median():.1f} (centred {centred:.1f}), nearest/typical distance "
            f"{nearest.median() / typical:.2f}, 2nd/1st nearest squared distance +{100 * gap:.1f} %")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure_bank(bank: torch.Tensor, query_sets: list[torch.Tensor], raw: tuple | None = None) -> dict:
    """Seconds per sample of both searches, the screening's statistics, and whether the results agree; with
    ``raw`` (the unnormalised query sets and the normalisation's mean and std) also of ``MemoryBank.score``,
    which searches the row of empty (all-zero) patches once per bank."""
    screened, prepare_s = timed(lambda: ScreenedBank(bank))
    screened.search(query_sets[0][:64])  # warm-up (kernel selection)
    nearest_neighbours(query_sets[0][:64], bank)
    plain_s = screened_s = 0.0
    identical, candidates, screened_queries, unions, max_candidates = True, 0, 0, [], 0
    blocks = plain_blocks = 0
    for queries in query_sets:
        (plain_dist, plain_idx), t_plain = timed(lambda q=queries: nearest_neighbours(q, bank))
        (dist, idx, stats), t_screened = timed(lambda q=queries: screened.search_with_stats(q))
        plain_s += t_plain
        screened_s += t_screened
        identical &= torch.equal(idx, plain_idx) and torch.equal(dist, plain_dist)
        candidates += stats.candidates
        screened_queries += stats.screened_queries
        max_candidates = max(max_candidates, stats.max_candidates)
        unions += [u / bank.shape[0] for u in stats.union_rows]
        blocks += stats.blocks
        plain_blocks += stats.plain_blocks
    n = len(query_sets)
    scored_s, empty_share = None, None
    if raw is not None:
        raw_sets, mean, std = raw
        memory_bank = MemoryBank.from_state({"bank": bank, "mean": mean, "std": std})  # the default strategies
        memory_bank.score(raw_sets[0])  # warm-up, and the once-per-bank preparation of the screened search
        scored_s = 0.0
        for queries, raw_queries in zip(query_sets, raw_sets):
            (image_score, dist), t_scored = timed(lambda q=raw_queries: memory_bank.score(q))
            scored_s += t_scored / n
            plain_dist, plain_idx = nearest_neighbours(queries, bank)
            identical &= torch.equal(dist, plain_dist)
            identical &= image_score == reweighted_score(queries, bank, plain_dist, plain_idx)
        empty_share = float(torch.cat([(q == 0).all(dim=1) for q in raw_sets]).float().mean())
    return {"prepare": prepare_s, "plain": plain_s / n, "screened": screened_s / n, "identical": identical,
            "scored": scored_s, "empty_share": empty_share,
            "candidates": candidates / max(1, screened_queries), "screened_queries": screened_queries,
            "max_candidates": max_candidates, "blocks": blocks,
            "plain_blocks": plain_blocks,
            "union": sum(unions) / max(1, len(unions)), "nearest": plain_dist}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2, help="test samples (query sets) timed per bank")
    parser.add_argument("--fix_quirks", action="store_true", help="bank sizes of --fix_quirks")
    parser.add_argument("--from_features", action="store_true", help="real extracted features, tiled")
    parser.add_argument("--query_noise", type=float, default=QUERY_NOISE,
                        help="clustered generator: query noise per element (larger: flatter distances)")
    parser.add_argument("--tile_noise", type=float, default=TILE_NOISE,
                        help="--from_features: noise of the tiled copies, times the centred per-element std")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layout = BANKS[args.fix_quirks]
    data = ("real features (random weights), tiled" if args.from_features
            else f"clustered generator (query noise {args.query_noise})")
    print(f"{torch.get_num_threads()} threads; native bf16 GEMM: {bf16_matmul_is_fast()}; "
          f"{'--fix_quirks' if args.fix_quirks else 'default'} bank sizes; "
          f"{data}; "
          f"{args.samples} samples")
    if args.from_features:
        (banks, extract_s) = timed(lambda: feature_banks(args.fix_quirks, args.samples, args.tile_noise, args.seed))
        print(f"features of {3 + args.samples} scenes extracted in {extract_s:.0f} s; tile noise {args.tile_noise}")
    results = {}
    for offset, (name, (rows, dim, queries)) in enumerate(layout.items()):
        raw = None
        if args.from_features:
            bank, query_sets, raw = banks.pop(name)
        else:
            bank, query_sets = clustered_bank(rows, dim, queries, args.samples, args.seed + offset, args.query_noise)
        result = measure_bank(bank, query_sets, raw)
        results[name] = result
        gflop = 2 * queries * rows * (dim + 2) / 1e9
        print(f"\n{name}: bank {rows:,} x {dim}, {queries} queries per sample; "
              f"{describe(bank, query_sets[-1], result['nearest'], args.seed)}")
        print(f"  plain float32 (torch.cdist)  {result['plain']:7.2f} s/sample  ({gflop / result['plain']:.0f} GFLOPS)")
        print(f"  screened (bf16 + re-rank)    {result['screened']:7.2f} s/sample  "
              f"{result['plain'] / result['screened']:.2f}x   (preparation once per bank: {result['prepare']:.2f} s)")
        print(f"  candidates per screened query {result['candidates']:.1f} (max {result['max_candidates']}; "
              f"{result['screened_queries']} queries screened), re-ranked "
              f"union {100 * result['union']:.2f} % of the bank per group on average; "
              f"{result['plain_blocks']} of {result['blocks']} blocks by the plain path; "
              f"identical to plain (bitwise): {'yes' if result['identical'] else 'NO'}")
        if result["scored"] is not None:
            print(f"  MemoryBank.score              {result['scored']:7.2f} s/sample  "
                  f"{result['plain'] / result['scored']:.2f}x   ({100 * result['empty_share']:.0f} % of the queries "
                  f"are empty patches, searched once)")
        del bank, query_sets
    plain = sum(r["plain"] for r in results.values())
    screened = sum(r["screened"] for r in results.values())
    print(f"\ntotal per sample: plain {plain:.2f} s, screened {screened:.2f} s, {plain / screened:.2f}x; "
          f"all identical: {'yes' if all(r['identical'] for r in results.values()) else 'NO'}")
    if args.from_features:
        scored = sum(r["scored"] for r in results.values())
        print(f"MemoryBank.score (empty patches searched once): {scored:.2f} s per sample, "
              f"{plain / scored:.2f}x the plain search")


if __name__ == "__main__":
    main()
