"""Pass 2 of a DINO+Point_MAE class with the default search and with ``--bank_search projected``, in one process.

    python benchmarks/pass2_search.py --samples 25 50

The class of ``benchmarks/scaling.py`` (synthetic features that look like real parts) is fitted once per N; then
every training sample is scored against the banks (pass 2, as ``Detector`` runs it) with the default search, the
projected screen alone (``ProjectedSearch``: every bank row bounded, the search of ``--bank_search projected``
before its cluster level), the cluster-then-row screen (``ClusteredSearch``, what ``--bank_search projected`` runs
now) and the default search again (the spread of the two default runs shows the machine's noise). Prints the CPU
and wall seconds of each, the candidates per query of the last search, the bank rows bounded per query by the
cluster screen, and whether every score and score map is bit-identical to the default's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coreset_loop import patch_images
from scaling import METHOD, RGB, XYZ

from m3dm.config import DetectorSettings
from m3dm.detection.detector import Detector
from m3dm.features.extractor import SampleFeatures
from m3dm.memory.clustered import ClusteredBank, ClusteredSearch
from m3dm.memory.defaults import default_search
from m3dm.memory.projected import ProjectedSearch
from m3dm.memory.search import SharedEmptyRows

SEARCHES = {"torch": None, "projected rows": ProjectedSearch, "clustered": ClusteredSearch, "torch again": None}


def pass2(detector: Detector, kind: str, samples: int) -> list:
    for bank in detector.banks.values():
        strategy = SEARCHES[kind]
        search = default_search("cpu") if strategy is None else SharedEmptyRows(strategy())
        bank.search = search.fit(bank._bank)
    cpu, wall = time.process_time(), time.perf_counter()
    scores = [detector.modality_scores(detector.training_patches(i)) for i in range(samples)]
    print(f"N={samples} {kind}: pass 2 CPU {time.process_time() - cpu:.1f} s, wall {time.perf_counter() - wall:.1f} s",
          flush=True)
    stats = {m: getattr(b.search.inner, "last_stats", None) for m, b in detector.banks.items()}
    print("  candidates per query (last search):", {m: round(s.candidates / max(s.screened_queries, 1), 2)
                                                     for m, s in stats.items() if s is not None})
    prepared = {m: getattr(b.search.inner, "_prepared", None) for m, b in detector.banks.items()}
    clustered = {m: p for m, p in prepared.items() if isinstance(p, ClusteredBank) and p.clustered}
    print("  clusters, bank rows bounded per query, blocks screened row by row:",
          {m: (p.sizes.numel(), round(p.rows_read / max(p.queries_screened, 1)), p.row_fallbacks)
           for m, p in clustered.items()})
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=list(SEARCHES),
                        help="the searches to run, in this order (the first is the reference of the comparison)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for samples in args.samples:
        with tempfile.TemporaryDirectory() as spool:
            detector = Detector(DetectorSettings(method_name=METHOD, random_state=0), device="cpu", progress=False,
                                spool_dir=spool)
            for xyz, rgb in zip(patch_images(samples, *XYZ, seed=1), patch_images(samples, *RGB, seed=2)):
                detector.add(SampleFeatures(xyz=xyz, rgb=rgb, rgb_map=rgb.T.reshape(-1, RGB[0], RGB[0])))
            detector.finalize()
            results = {kind: pass2(detector, kind, samples) for kind in args.searches}
        reference = results[args.searches[0]]
        for kind, scores in results.items():
            same = all(a[m].score == b[m].score and torch.equal(a[m].score_map, b[m].score_map)
                       for a, b in zip(reference, scores) for m in a)
            print(f"  {kind}: every score and map bit-identical to {args.searches[0]}'s: {same}")


if __name__ == "__main__":
    main()
