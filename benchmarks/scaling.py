"""Growth of M3DM's fitting stages with the number of training samples, beside each stage's flop floor.

    python benchmarks/scaling.py [--samples 25 50 100] [--threads 1] [--busy] [--baseline 5e17aef] [--no_baseline]
        [--bank_search ivf] [--coreset_shard_rows R] [--fusion_samples M]   # an approximate mode

DINO+Point_MAE with its default settings (two banks, shared statistics, 10 % coreset, decision layer fusion) is fitted
on synthetic features that look like real parts, with the pipeline's own code (``m3dm.detection.detector.Detector``,
pass 2 as ``m3dm.app.run`` runs it on the kept pass-1 features, the training patches spooled to disk as by
default). Each training sample has 56 x 56 point patches of 1152 dimensions, 81.5 % of them empty (all zero, hence
exact copies of one another, as on MVTec 3D-AD), and 28 x 28 RGB patches of 768 dimensions; both are the smooth
random feature fields of ``benchmarks/coreset_loop.py`` (neighbouring patches and samples resemble each other, so
the coreset's covering radius falls as it goes, as on real features). Every N runs in a process of its own, with
today's code and with the coreset of ``--baseline`` (loaded from git, as coreset_loop.py does; its coreset stages
only), one after the other.

For each stage: wall and CPU seconds (all threads of the process), the peak resident memory of the process during
the stage, the local exponent of the CPU seconds between consecutive N (log ratio of times over log ratio of N), and
the stage's flop floor, in multiply-adds (MACs) and in seconds at the rate this machine measured at the start of the
same process and thread count:

  * coreset (per bank): ``steps x distinct rows x projected dims`` MACs at the GEMV rate: every greedy step depends
    on the previous one's farthest row, so the plain loop is a matrix-vector sweep per step (``torch.mv`` of a
    float32 (65,536 x 256) matrix measures the rate). The pruned loop skips rows that provably cannot get closer,
    so it can run below this floor;
  * pass 2: ``searched patches x bank rows x dims`` MACs per bank at the GEMM rate (the nearest-neighbour search
    of all patches of a sample is a matrix product; the empty point patches are searched once per sample); the
    score maps' blur is not counted;
  * DLF fit: ``epochs x rows x modalities`` MACs of the two SGD one-class SVMs at the GEMV rate.

``--busy`` starts one CPU-bound process (a Python busy loop) beside the run for its whole duration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coreset_loop import baseline_module, burners, patch_images

from m3dm.config import BANK_SEARCHES

XYZ = (56, 1152, 0.815)  # patch grid side, dimension, share of empty patches (as coreset_loop's xyz bank)
RGB = (28, 768, 0.0)
METHOD = "DINO+Point_MAE"
PIXELS = 224 * 224
SHORT = {"coreset_shard_rows": "R", "fusion_samples": "M"}  # the approximate options in a run's label


class PeakMemory:
    """The process's peak resident memory since the last ``reset``, sampled every 20 ms by a daemon thread."""

    def __init__(self) -> None:
        self.peak = 0
        threading.Thread(target=self._watch, daemon=True).start()

    @staticmethod
    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while True:
            self.peak = max(self.peak, self.resident())
            time.sleep(0.02)

    def reset(self) -> None:
        self.peak = self.resident()


class Stages:
    """Wall and CPU seconds, peak memory and flop floor of every stage of one fit."""

    def __init__(self) -> None:
        self.memory = PeakMemory()
        self.rows: dict[str, dict] = {}

    def run(self, name: str, work, rate: str = "gemv"):
        self.memory.reset()
        wall, cpu = time.perf_counter(), time.process_time()
        result = work()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.rows[name] = {"wall": wall, "cpu": cpu, "peak_mb": max(self.memory.peak, self.memory.resident()) / 2**20,
                           "rate": rate}
        return result

    def floor(self, name: str, macs: float, **details) -> None:
        self.rows[name].update(macs=macs, **details)


class Recording:
    """A selection that records the shape of the projected bank it selects from (no effect on the indices)."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, {}

    def run(self, reduced, min_dist, n, progress):
        self.seen = {"rows": reduced.shape[0], "dims": reduced.shape[1], "steps": max(n, 1) - 1}
        return self.inner.run(reduced, min_dist, n, progress)


class TimedCoreset:
    """Stands in for a bank's coreset: the selection of each bank becomes a stage of its own. ``copies``: rows that
    are exact copies of earlier ones (the empty patches but the first), which the exact selection leaves out."""

    def __init__(self, name: str, coreset, stages: Stages, copies: int) -> None:
        self.name, self.coreset, self.stages, self.copies = name, coreset, stages, copies

    def select(self, features, n, **kwargs):
        chosen = self.stages.run(f"coreset {self.name}", lambda: self.coreset.select(features, n, **kwargs))
        seen = self.coreset.selection.seen
        distinct = seen["rows"] - self.copies
        self.stages.floor(f"coreset {self.name}", seen["steps"] * distinct * seen["dims"], rows=seen["rows"],
                          distinct=distinct, dims=seen["dims"], steps=seen["steps"])
        return chosen


def measured_rates() -> dict[str, float]:
    """MACs per second of a float32 matrix product (GEMM, 1024^3) and of a matrix-vector product (GEMV, 65,536 x
    256), best of several, on the current thread count."""
    def best(work, macs: float, repeats: int) -> float:
        work()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        return macs / min(times)

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    matrix, vector = torch.randn(65536, 256), torch.randn(256)
    return {"gemm": best(lambda: a @ b, 1024**3, 5), "gemv": best(lambda: torch.mv(matrix, vector), 65536 * 256, 20)}


def fit_detector(samples: int, baseline: str | None, spool: str, search: str = "torch",
                 approximate: dict | None = None) -> dict:
    """Fit DINO+Point_MAE on ``samples`` synthetic training samples, stage by stage (see the module docstring)."""
    from m3dm.config import DetectorSettings
    from m3dm.detection.detector import Detector
    from m3dm.features.extractor import SampleFeatures

    stages = Stages()
    settings = DetectorSettings(method_name=METHOD, random_state=0, bank_search=search, **(approximate or {}))
    detector = Detector(settings, device="cpu", progress=False,
                        spool_dir=spool)
    empty_xyz, searched_xyz = 0, 0
    for xyz, rgb in zip(patch_images(samples, *XYZ, seed=1), patch_images(samples, *RGB, seed=2)):
        empty = int((xyz == 0).all(dim=1).sum())
        empty_xyz += empty
        searched_xyz += xyz.shape[0] - empty + (empty > 0)  # the empty patches are one search
        side = RGB[0]
        detector.add(SampleFeatures(xyz=xyz, rgb=rgb, rgb_map=rgb.T.reshape(-1, side, side)))
    for name, bank in detector.banks.items():
        if baseline is None:
            selection = bank.coreset.selection
            coreset = dataclasses.replace(bank.coreset, selection=Recording(selection))
        else:
            module = baseline_module(baseline)
            coreset = module.GreedyCoreset(Recording(module.DropCopies(module.PrunedGreedy())), "cpu", True)
        bank.coreset = TimedCoreset(name, coreset, stages, max(0, empty_xyz - 1) if name == "xyz" else 0)
    stages.run("finalize", detector.finalize)  # statistics, normalisation and both coresets (timed above too)
    if baseline is not None:  # only the coreset differs: pass 2 and the DLF fit are today's code either way
        return stages.rows
    scored = detector.fusion_samples()
    scores = stages.run("pass 2", lambda: [detector.modality_scores(detector.training_patches(i))
                                           for i in scored], rate="gemm")
    share = len(scored) / samples  # the exact search's MACs of the samples scored (an approximate search does fewer)
    searched = {"xyz": share * searched_xyz, "rgb": len(scored) * RGB[0] ** 2}
    stages.floor("pass 2", sum(searched[m] * b.rows * b.dim for m, b in detector.banks.items()))
    stages.run("DLF fit", lambda: detector.fit_fusion(scores))
    dlf = detector.dlf
    modalities = len(detector.banks)
    stages.floor("DLF fit", modalities * (dlf.detect_fuser.n_iter_ * len(scored)
                                          + dlf.seg_fuser.n_iter_ * len(scored) * PIXELS))
    detector.release_training_samples()
    return stages.rows


def one_run(samples: int, threads: int, baseline: str | None, spool: str | None, search: str = "torch",
            approximate: dict | None = None) -> dict:
    torch.set_num_threads(threads)
    np.random.seed(0)
    rates = measured_rates()
    with tempfile.TemporaryDirectory(dir=spool, prefix="m3dm-scaling-") as folder:
        rows = fit_detector(samples, baseline, folder, search, approximate)
    for row in rows.values():
        row["floor_s"] = row["macs"] / rates[row["rate"]] if "macs" in row else math.nan
    code = baseline or label(search, approximate or {})
    return {"samples": samples, "code": code, "rates": rates, "stages": rows,
            "load": os.getloadavg()[0]}


def label(search: str, approximate: dict) -> str:
    """The name of a run's code in the table: today, or its search and approximate options."""
    parts = ([] if search == "torch" else [search]) + [f"{SHORT[k]}{v}" for k, v in approximate.items()]
    return "+".join(parts) or "today"


def exponent(previous: dict | None, current: dict, stage: str) -> str:
    if previous is None or stage not in previous["stages"]:
        return ""
    before, after = previous["stages"][stage]["cpu"], current["stages"][stage]["cpu"]
    return f"{math.log(after / before) / math.log(current['samples'] / previous['samples']):.2f}"


def print_table(results: list[dict]) -> None:
    print(f"\n{'code':>9}{'N':>6}  {'stage':<12}{'wall s':>9}{'CPU s':>9}{'peak MB':>9}{'exp':>6}{'MACs':>10}"
          f"{'floor s':>9}{'CPU/floor':>10}{'load':>6}")
    previous: dict[str, dict] = {}
    for result in results:
        code = result["code"]
        for stage, row in result["stages"].items():
            floor = (f"{row['macs']:>10.2e}{row['floor_s']:>9.1f}{row['cpu'] / row['floor_s']:>9.2f}x"
                     if "macs" in row else f"{'':>29}")  # finalize: no floor of its own
            print(f"{code:>9}{result['samples']:>6}  {stage:<12}{row['wall']:>9.1f}{row['cpu']:>9.1f}"
                  f"{row['peak_mb']:>9.0f}{exponent(previous.get(code), result, stage):>6}{floor}"
                  f"{result['load']:>6.1f}")
        previous[code] = result
    for result in results:
        rates = result["rates"]
        print(f"rates measured with {result['code']} at N = {result['samples']}: GEMM {rates['gemm'] / 1e9:.1f}, "
              f"GEMV {rates['gemv'] / 1e9:.2f} GMAC/s")


def approximate_options(args: argparse.Namespace) -> dict:
    """The approximate options given on the command line, as DetectorSettings fields."""
    return {name: getattr(args, name) for name in SHORT if getattr(args, name) is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[25, 50, 100], help="training samples (N)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--busy", action="store_true", help="one CPU-bound process beside the run")
    parser.add_argument("--baseline", default="5e17aef", help="commit whose coreset is also measured")
    parser.add_argument("--no_baseline", action="store_true", help="measure today's code only")
    parser.add_argument("--spool", default=None, help="folder for the spooled training patches (default: temp)")
    parser.add_argument("--bank_search", default="torch", choices=BANK_SEARCHES,
                        help="the banks' search (today's code only; its rows are labelled with its name)")
    parser.add_argument("--coreset_shard_rows", type=int, default=None, help="the approximate coreset's option")
    parser.add_argument("--fusion_samples", type=int, default=None, help="the approximate pass 2's option")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process: one N
    parser.add_argument("--code", default="today", help=argparse.SUPPRESS)
    parser.add_argument("--table", nargs="+", default=None, help="only print the table of these --json files")
    args = parser.parse_args()
    if args.table:
        results = [result for name in args.table for result in json.loads(Path(name).read_text())]
        print_table(sorted(results, key=lambda r: (r["code"] != "today", r["code"], r["samples"])))
        return
    if args.one is not None:
        baseline = None if args.code == "today" else args.code
        print(json.dumps(one_run(args.one, args.threads, baseline, args.spool, args.bank_search,
                                 approximate_options(args))))
        return
    codes = ["today"] + ([] if args.no_baseline else [args.baseline])
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s), "
          f"{'busy (one CPU-bound process beside)' if args.busy else 'no extra load'}; uptime: "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    procs = burners(1 if args.busy else 0)
    results = []
    try:
        for samples in args.samples:
            for code in codes:
                command = [sys.executable, __file__, "--one", str(samples), "--code", code,
                           "--threads", str(args.threads), "--bank_search", args.bank_search
                           ] + (["--spool", args.spool] if args.spool else []) + [
                           f"--{k}={v}" for k, v in approximate_options(args).items()]
                child = subprocess.run(command, check=True, capture_output=True, text=True)
                results.append(json.loads(child.stdout.strip().splitlines()[-1]))
                if args.json:  # written as each run ends: an interrupted run keeps what it measured
                    Path(args.json).write_text(json.dumps(results, indent=1))
                print(f"N = {samples}, {code}: " + ", ".join(
                    f"{stage} {row['cpu']:.1f} s CPU" for stage, row in results[-1]["stages"].items()), flush=True)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    print_table(sorted(results, key=lambda r: (r["code"] != "today", r["code"], r["samples"])))


if __name__ == "__main__":
    main()
