"""The exact bank searches side by side: the default torch search against faiss's (``--bank_search faiss``).

    python benchmarks/search.py [--threads 1 2] [--samples 3] [--hnsw]

Banks of the sizes a 100-sample class gives DINO+Point_MAE: the xyz coreset of 31,360 x 1152 and the RGB coreset of
3,136 x 768, clustered rows (test patches near training patches, as with real features). Queries, per sample: the
56 x 56 xyz patches, 81 % of them empty (one constant row, searched once per bank by both: the search strategies
of ``m3dm.memory.defaults.default_search``), and the 28 x 28 RGB patches. "pass 2" samples are training rows with a
little noise (each patch has a bank row close by), "test" samples have more. Each case runs ``--samples`` samples
on each thread count; prints the seconds per sample of both searches, their ratio torch/faiss, and the largest
relative difference of faiss's distances from torch's (and of the rows found). ``--hnsw``: also the approximate
``--bank_search hnsw`` (seconds per sample, the seconds to build its graph once per bank, and its recall: the
share of the non-empty patches given their exact nearest row).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from m3dm.memory.defaults import default_search

EMPTY_SHARE = 0.81  # of the xyz patches of real parts (about 81 % have no point behind them)
# (name, bank rows, dim, query grid, share of empty queries)
CASES = (("xyz", 31_360, 1152, 56, EMPTY_SHARE), ("rgb", 3_136, 768, 28, 0.0))
NOISE = {"pass 2": 0.2, "test": 0.6}  # query = a bank row + this much noise (the rows' spread is about 1)


def clustered_rows(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    centres = 2 * torch.randn(64, dim, generator=generator)
    return centres[torch.randint(0, 64, (rows,), generator=generator)] + torch.randn(rows, dim, generator=generator)


def sample_queries(bank: torch.Tensor, grid: int, empty_share: float, noise: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's ``grid x grid`` query rows (empty ones all one constant row) and their empty flags."""
    count = grid * grid
    queries = bank[torch.randint(0, bank.shape[0], (count,), generator=generator)]
    queries = queries + noise * torch.randn(queries.shape, generator=generator)
    empty = torch.rand(count, generator=generator) < empty_share
    queries[empty] = -0.3
    return queries, empty


def timed_search(kind: str, bank: torch.Tensor, samples: list[tuple[torch.Tensor, torch.Tensor]]):
    """Seconds per sample of one search strategy (fitted once, as a bank's) and its results."""
    search = default_search("cpu", kind).fit(bank)
    search.search(*samples[0])  # warm-up: thread pools, the empty row's first search
    return timed_search_fitted(search, samples)


def timed_search_fitted(search, samples):
    start = time.perf_counter()
    results = [search.search(queries, empty) for queries, empty in samples]
    return (time.perf_counter() - start) / len(samples), results


def hnsw_columns(bank: torch.Tensor, samples, exact_results) -> str:
    """The HNSW search's seconds per sample, graph build seconds and recall at 1, as table cells."""
    search = default_search("cpu", "hnsw").fit(bank)
    start = time.perf_counter()
    search.search(*samples[0])  # builds the graph
    build = time.perf_counter() - start
    seconds, results = timed_search_fitted(search, samples)
    # over the patches that are not empty (the empty row is one query per bank, whatever the share of empty patches)
    pairs = [(idx[~empty], exact_idx[~empty]) for (_, idx), (_, exact_idx), (_, empty)
             in zip(results, exact_results, samples, strict=True)]
    found = sum(int((idx == exact_idx).sum()) for idx, exact_idx in pairs)
    total = sum(idx.numel() for idx, _ in pairs)
    return f" {seconds:.3f} | {build:.1f} | {found / total:.2%} |"


def compare(torch_results, faiss_results) -> tuple[float, float]:
    """Largest relative distance difference, and the share of queries whose rows differ."""
    worst, moved, total = 0.0, 0, 0
    for (dist_t, idx_t), (dist_f, idx_f) in zip(torch_results, faiss_results, strict=True):
        worst = max(worst, float(((dist_f - dist_t).abs() / dist_t.clamp_min(1e-12)).max()))
        moved += int((idx_f != idx_t).sum())
        total += idx_t.numel()
    return worst, moved / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=3, help="samples per case and thread count")
    parser.add_argument("--hnsw", action="store_true", help="also the approximate HNSW search")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    hnsw_head = " hnsw s/sample | hnsw build s | hnsw recall |" if args.hnsw else ""
    print("| bank | queries | stage | threads | torch s/sample | faiss s/sample | torch/faiss | max rel. distance "
          "diff. | rows differing |" + hnsw_head)
    print("|:--|:--|:--|--:|--:|--:|--:|--:|--:|" + "--:|" * (3 if args.hnsw else 0))
    for name, rows, dim, grid, empty_share in CASES:
        bank = clustered_rows(rows, dim, generator)
        for stage, noise in NOISE.items():
            samples = [sample_queries(bank, grid, empty_share, noise, generator) for _ in range(args.samples)]
            for threads in args.threads:
                torch.set_num_threads(threads)
                torch_seconds, torch_results = timed_search("torch", bank, samples)
                faiss_seconds, faiss_results = timed_search("faiss", bank, samples)
                worst, moved = compare(torch_results, faiss_results)
                hnsw = hnsw_columns(bank, samples, torch_results) if args.hnsw else ""
                print(f"| {name} {rows:,} x {dim} | {grid}x{grid} ({empty_share:.0%} empty) | {stage} | {threads} | "
                      f"{torch_seconds:.3f} | {faiss_seconds:.3f} | **{torch_seconds / faiss_seconds:.2f}x** | "
                      f"{worst:.1e} | {moved:.2%} |{hnsw}", flush=True)


if __name__ == "__main__":
    main()
