"""The exact CPU coreset's selection loop on a busy machine: today's code against an earlier commit's, same run.

    python benchmarks/coreset_loop.py [--banks btf xyz] [--samples 20] [--threads 1 2] [--busy 0 2]
                                      [--baseline 7ef5f2f] [--profile]

The greedy selection (the default ``DropCopies(PrunedGreedy())``, float16, 10 % of the rows) on synthetic patch
banks shaped like the methods' (after the random projection, which is not timed):

  * ``btf``: ``--samples`` x 784 patches (28 x 28) of 1569 dimensions (wide-ResNet 1536 + FPFH 33), none empty;
  * ``xyz``: ``--samples`` x 3136 patches (56 x 56) of 1152 dimensions, 81.5 % of them empty (all zero) as the
    point patches of MVTec 3D-AD, so most rows are exact copies and are left out before the loop.

Each image's patches are a smooth random field of 4 latent values over the patch grid mapped non-linearly to the
feature dimension, plus 5 % noise: neighbouring patches and images resemble each other, so the selection's
covering radius falls as it goes (the pruning works), as on real features.

For every bank, torch thread count (``--threads``) and number of CPU-burning processes started beside the run
(``--busy``, each a Python busy loop): wall and CPU seconds (CPU of all threads of this process) of the
selection with the code of ``--baseline`` (loaded from git into this process; needs a git checkout) and with
today's, their ratios, the load average, and whether both selected the same indices. The machine's own load
from other jobs adds to ``--busy``: the load average printed with each row says how busy it was.
``--profile``: the torch profiler's per-operator table of one selection of each kind instead (first bank,
first thread count).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch

from m3dm.memory.coreset import DropCopies, PrunedGreedy, _project_for_coreset
from m3dm.memory.projection import fit_sparse_random_projection

BANKS = {"btf": (28, 1569, 0.0), "xyz": (56, 1152, 0.815)}  # patch grid side, dimension, share of empty patches
LATENT, NOISE, SHARE = 4, 0.05, 0.1
REPO = Path(__file__).resolve().parents[1]


def patch_images(samples: int, grid: int, dim: int, empty: float, seed: int = 0) -> Iterator[torch.Tensor]:
    """Each image's ``grid**2`` float32 patch rows in turn (see the module docstring); its empty patches are drawn
    with it, so a bank of any size can be built one image at a time."""
    generator = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.linspace(0, 1, grid), torch.linspace(0, 1, grid), indexing="ij")
    freq = 12 * math.pi * torch.rand(LATENT, 2, 1, 1, generator=generator)
    hidden = torch.randn(LATENT, 64, generator=generator)
    out = torch.randn(64, dim, generator=generator) / 8
    for _ in range(samples):
        phase = 2 * math.pi * torch.rand(LATENT, 1, 1, generator=generator)
        latent = torch.sin(freq[:, 0] * u + freq[:, 1] * v + phase).reshape(LATENT, -1).T
        features = torch.tanh(latent @ hidden) @ out
        features += NOISE * torch.randn(features.shape, generator=generator)
        features[torch.rand(features.shape[0], generator=generator) < empty] = 0
        yield features


def patch_bank(samples: int, grid: int, dim: int, empty: float, seed: int = 0) -> torch.Tensor:
    """``samples * grid**2`` float32 patch rows (see the module docstring)."""
    return torch.cat(list(patch_images(samples, grid, dim, empty, seed)))


def baseline_module(commit: str) -> types.ModuleType:
    """m3dm/memory/coreset.py at ``commit``, loaded as a module of its own."""
    source = subprocess.run(["git", "show", f"{commit}:m3dm/memory/coreset.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"coreset_at_{commit}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"coreset.py@{commit}", "exec"), module.__dict__)
    return module


def baseline_selection(commit: str):
    """``PrunedGreedy`` of m3dm/memory/coreset.py at ``commit``."""
    return baseline_module(commit).PrunedGreedy()


def burners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def timed_selection(selection, reduced: torch.Tensor, min_dist: torch.Tensor, n: int, threads: int):
    torch.set_num_threads(threads)
    wall, cpu = time.perf_counter(), time.process_time()
    chosen = DropCopies(selection).run(reduced, min_dist.clone(), n, False)
    return chosen, time.perf_counter() - wall, time.process_time() - cpu


def projected(name: str, samples: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    grid, dim, empty = BANKS[name]
    bank = patch_bank(samples, grid, dim, empty)
    projector = fit_sparse_random_projection(bank.shape[0], dim, 0.9, 0)
    reduced, min_dist = _project_for_coreset(bank, projector, torch.float16, torch.device("cpu"))
    return reduced, min_dist, int(bank.shape[0] * SHARE)


def profile(old, reduced, min_dist, n, threads) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for label, selection in (("baseline", old), ("today", PrunedGreedy())):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            _, wall, cpu = timed_selection(selection, reduced, min_dist, n, threads)
        print(f"\n{label}: wall {wall:.2f} s, CPU {cpu:.2f} s, load {os.getloadavg()[0]:.1f}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--banks", nargs="+", choices=sorted(BANKS), default=["btf", "xyz"])
    parser.add_argument("--samples", type=int, default=20, help="images per bank")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2], help="CPU-burning processes beside the run")
    parser.add_argument("--baseline", default="7ef5f2f", help="commit whose PrunedGreedy is the baseline")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    old = baseline_selection(args.baseline)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, baseline {args.baseline}", flush=True)
    for name in args.banks:
        reduced, min_dist, n = projected(name, args.samples)
        print(f"\n{name}: {args.samples} images, {reduced.shape[0]:,} rows -> {n:,}, projected to "
              f"{reduced.shape[1]} dims", flush=True)
        if args.profile:
            profile(old, reduced, min_dist, n, args.threads[0])
            return
        print(f"{'threads':>7}{'busy':>5}{'load':>6}{'base wall':>11}{'base CPU':>10}{'wall':>8}{'CPU':>8}"
              f"{'wall ratio':>12}{'CPU ratio':>11}  same")
        for busy in args.busy:
            procs = burners(busy)
            try:
                for threads in args.threads:
                    base, base_wall, base_cpu = timed_selection(old, reduced, min_dist, n, threads)
                    new, wall, cpu = timed_selection(PrunedGreedy(), reduced, min_dist, n, threads)
                    print(f"{threads:>7}{busy:>5}{os.getloadavg()[0]:>6.1f}{base_wall:>11.2f}{base_cpu:>10.2f}"
                          f"{wall:>8.2f}{cpu:>8.2f}{base_wall / wall:>11.2f}x{base_cpu / cpu:>10.2f}x  "
                          f"{torch.equal(base, new)}", flush=True)
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    main()
