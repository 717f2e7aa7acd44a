"""One part's latency and throughput, PyTorch eager against the exported model on onnxruntime, same machine.

    python benchmarks/export.py [--part RGB.png XYZ.tiff] [--methods DINO+Point_MAE CFM BTF_FPFH] [--repeats 5]
                                [--precision fp32 int8]

Full configuration (ViT-B/8 DINO, Point-MAE with 1024 groups of 128 points, training-mode point backbone) with
random backbone weights in the official layout and random fitted state: banks of ``--bank_rows`` rows (a class of
about 64 training parts at --f_coreset 0.1 gives 20,000) and a random decision layer for DINO+Point_MAE, random
mappings for CFM; BTF_FPFH: an unnormalised bank of random 33-bin histograms (FPFH has no weights; eager computes
it with Open3D, the runner with ``m3dm_runner.fpfh``). The timings do not depend on the values. The part is a
preprocessed one (``--part``), or a plane seen by every pixel (the most points a part can have). Eager:
``FeatureExtractor`` + ``predict`` per part, as ``m3dm.predict`` scores; exported:
``m3dm_runner.ExportedModel.score_arrays`` (its NumPy FPS or FPFH included), once per ``--precision`` (int8:
``python -m m3dm.export --precision int8``'s artefact). Both use their library's default
threads. Each path's peak resident memory is the process's (both paths' models loaded), reset before its batch 1
and its batch 8 runs (Linux ``/proc/self/clear_refs``); the load average and the process's CPU seconds per path
are printed with the table, as the machine may be shared. Results are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m3dm.config import METHODS, BackboneSettings, DetectorSettings  # noqa: E402
from m3dm.detection.cfm import CFMDetector  # noqa: E402
from m3dm.detection.detector import Detector  # noqa: E402
from m3dm.detection.dlf import DecisionLayerFusion  # noqa: E402
from m3dm.export.onnx import export_onnx  # noqa: E402
from m3dm.features.extractor import build_extractor  # noqa: E402
from m3dm.memory.bank import MemoryBank  # noqa: E402
from m3dm_runner import ExportedModel  # noqa: E402
from m3dm_runner.inputs import PartFiles, read_part  # noqa: E402

DIMS = {"xyz": 1152, "rgb": 768}
BTF_DIMS = {"xyz": 33, "rgb": 1536, "rgb+xyz": 1569}


def random_detector(method: str, bank_rows: int):
    generator = torch.Generator().manual_seed(0)
    if method == "CFM":
        detector = CFMDetector(DetectorSettings(method_name=method))
        for mapping in detector._build_mappings(DIMS["rgb"], DIMS["xyz"]):
            mapping.reset_parameters(generator)
            mapping.eval()
        return detector
    detector = Detector(DetectorSettings(method_name=method, memory_bank=METHODS[method].memory_bank),
                        progress=False)
    btf = detector.spec.features == "btf"
    for modality in detector.spec.modalities:
        if btf:  # BTF's banks are unnormalised raw patches (FPFH histograms: non-negative, about 0-100)
            rows = torch.rand(bank_rows, BTF_DIMS[modality], generator=generator) * 20
            state = {"bank": rows, "mean": None, "std": None, "coreset_idx": None}
        else:
            rows = torch.randn(bank_rows, DIMS[modality], generator=generator)
            state = {"bank": rows, "mean": torch.tensor(0.1), "std": torch.tensor(1.5), "coreset_idx": None}
        detector.banks[modality] = MemoryBank.from_state(state)
    detector.rgb_grid = 28
    if detector.uses_dlf:
        from sklearn.linear_model import SGDOneClassSVM

        fuser = {"params": SGDOneClassSVM().get_params(), "coef": torch.tensor([[0.7, 0.3]], dtype=torch.float64),
                 "offset": torch.tensor([0.5], dtype=torch.float64), "t": 1.0, "n_iter": 1}
        detector.dlf = DecisionLayerFusion.from_state({"dtype": "float64", "n_modalities": 2,
                                                       "fusers": {"detect_fuser": fuser, "seg_fuser": fuser}})
    return detector


def stand_in_predictor(method: str, bank_rows: int) -> SimpleNamespace:
    """What ``export_onnx`` reads of a ``m3dm.app.predict.Predictor``, for a random full-configuration model."""
    backbones = BackboneSettings(random_init=True)
    spec = METHODS[method]
    extractor = build_extractor(backbones, needs_rgb=spec.needs_rgb, needs_xyz=spec.needs_xyz, device="cpu", seed=0,
                                clamp_pfa=False, method=spec)
    settings = {"img_size": 224, "num_group": backbones.num_group, "group_size": backbones.group_size}
    model = SimpleNamespace(settings=settings, method_name=method, class_name="random", path="(random)",
                            thresholds=None)
    return SimpleNamespace(detector=random_detector(method, bank_rows), extractor=extractor, model=model,
                           img_size=224)


def reset_peak_memory() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb() -> float:
    """The process's peak resident memory since the last :func:`reset_peak_memory` (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def timed_with_peak(function, repeats: int) -> tuple[list[float], float, float]:
    """:func:`timed` and the peak resident memory (GB) during it."""
    reset_peak_memory()
    times, cpu = timed(function, repeats)
    return times, cpu, peak_memory_gb()


def timed(function, repeats: int) -> tuple[list[float], float]:
    """Wall seconds of each of ``repeats`` calls after a warm-up, and their mean CPU seconds (the process's, all
    threads: on a loaded machine the CPU a path needs, whatever the other jobs take of the cores)."""
    function()  # warm-up (allocations, onnxruntime's first run)
    times = []
    cpu_start = time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times, (time.process_time() - cpu_start) / repeats


def measure(method: str, rgb: np.ndarray, cloud: np.ndarray, args) -> None:
    predictor = stand_in_predictor(method, args.bank_rows)
    detector, extractor = predictor.detector, predictor.extractor

    def eager(batch: int):
        with torch.no_grad():
            features = extractor(torch.from_numpy(np.repeat(rgb[None], batch, 0)),
                                 torch.from_numpy(np.repeat(cloud[None], batch, 0)))
            return [detector.predict(detector.modality_patches(f)) for f in features]

    paths = {"PyTorch eager": eager}
    with tempfile.TemporaryDirectory() as folder:
        sizes = {}
        for precision in args.precision:
            path = export_onnx(predictor, Path(folder) / f"{method}.{precision}.onnx", precision=precision)
            sizes[precision] = path.stat().st_size / 2**20
            paths[f"onnxruntime {precision}"] = exported_run(ExportedModel(path), rgb, cloud)
        rows, peaks = {}, {}
        for name, run in paths.items():
            single, single_cpu, peak1 = timed_with_peak(lambda run=run: run(1), args.repeats)
            batched, batched_cpu, peak8 = (timed_with_peak(lambda run=run: run(8), max(1, args.repeats // 4))
                                           if args.batch8 else ([float("nan")], float("nan"), float("nan")))
            rows[name] = (statistics.median(single), float(np.percentile(single, 95)), 1 / statistics.mean(single),
                          8 / statistics.mean(batched), single_cpu, batched_cpu / 8)
            peaks[name] = (peak1, peak8)
            print(f"{method}, {name}: load average {os.getloadavg()[0]:.1f}", flush=True)
    for name, (p50, p95, one, eight, cpu_one, cpu_eight) in rows.items():
        peak1, peak8 = peaks[name]
        print(f"| {method} | {name} | {p50:.2f} | {p95:.2f} | {one:.3f} | {eight:.3f} | {cpu_one:.2f} | "
              f"{cpu_eight:.2f} | {peak1:.2f} | {peak8:.2f} |", flush=True)
    names = list(rows)
    for slow, fast in [(names[0], name) for name in names[1:]] + [(names[1], name) for name in names[2:]]:
        a, b = rows[slow], rows[fast]
        print(f"| {method} | ratio {slow} / {fast} | {a[0] / b[0]:.2f} | {a[1] / b[1]:.2f} | {b[2] / a[2]:.2f} | "
              f"{b[3] / a[3]:.2f} | {a[4] / b[4]:.2f} | {a[5] / b[5]:.2f} |", flush=True)
    print(f"artefact sizes: {', '.join(f'{k} {v:.0f} MB' for k, v in sizes.items())}", flush=True)


def exported_run(exported: ExportedModel, rgb: np.ndarray, cloud: np.ndarray):
    def run(batch: int):
        return exported.score_arrays(np.repeat(rgb[None], batch, 0), np.repeat(cloud[None], batch, 0))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs=2, type=Path, metavar=("RGB", "XYZ"), default=None)
    parser.add_argument("--methods", nargs="+", default=["DINO+Point_MAE", "CFM", "BTF_FPFH"])
    parser.add_argument("--bank_rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_batch8", dest="batch8", action="store_false",
                        help="time batch 1 only")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "int8"],
                        help="the exported artefacts to time (m3dm.export --precision)")
    args = parser.parse_args()
    if args.part:
        rgb, cloud = read_part(PartFiles("part", *args.part))
    else:
        from m3dm.export.onnx import plane_cloud

        rgb, cloud = np.zeros((3, 224, 224), np.float32), plane_cloud(224)
    print(f"torch threads {torch.get_num_threads()}; part with {(cloud != 0).all(axis=0).sum()} valid points")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("| method | path | latency p50 (s) | p95 (s) | parts/s, batch 1 | parts/s, batch 8 | CPU s/part, batch 1 | "
          "CPU s/part, batch 8 | peak GB, batch 1 | peak GB, batch 8 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method in args.methods:
        measure(method, rgb, cloud, args)
    print(f"load average {os.getloadavg()[0]:.1f}; process CPU {time.process_time():.0f} s")


if __name__ == "__main__":
    main()
