"""G2SF against M3DM's DINO+Point_MAE on the same data in the same run: time per stage, peak memory, LSPN time per
epoch, and an extrapolation of the LSPN training to the reference's full configuration.

    python benchmarks/g2sf.py [--train 4] [--test 4] [--num_anomalies 8] [--max_epoch 3] [--size 256] [--small]

Full backbones by default (ViT-B/8 at 224 px; Point-MAE with each method's default groups of 128 points: 1024 for
M3DM, 512 for G2SF; random weights with the official key layout: timings do not depend on the weights) on
synthetic MVTec 3D-AD data generated and preprocessed into a temporary folder; ``--small`` uses the test suite's
tiny ViT and 64 groups of 32 points. The LSPN is the reference's (1920 -> 512 -> 128 branches), trained with the
reference's losses; its batch is ``min(--fusion_batch_size, 0.7 x rows / 20)``, so on a few pseudo-anomalies it is
smaller than the reference's 8192: one training step and one validation step at the full batch are timed apart
(``--full_batch``) and the full configuration's epoch (800 pseudo-anomalies, batch 8192) is extrapolated from them.

Stages of G2SF's fit (inside main.py's "coreset, pseudo-anomalies and LSPN"): the two banks' coresets, the
synthesis of the pseudo-anomalies, their feature extraction, the fusion rows (nearest coreset rows, labels), the
LSPN's training. Each stage in wall and CPU seconds (all threads of the process: on a machine shared with other
jobs, the figure to read). Peak memory is the process's resident set, sampled every 20 ms per stage; the fusion
dataset's and the fitted model's tensors are counted exactly (tracemalloc does not see torch's tensor memory).
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from functools import wraps
from pathlib import Path
from unittest.mock import patch

from cfm import state_bytes
from pipeline import MemoryTimer, rss_gb

FULL = {"num_anomalies": 800, "max_epoch": 80, "fusion_batch_size": 8192}


class CpuMemoryTimer(MemoryTimer):
    """MemoryTimer that also adds up the process's CPU seconds per stage (all threads: on a machine shared with
    other jobs, what the stage cost, where wall-clock seconds also count the waits)."""

    def __init__(self):
        super().__init__()
        self.cpu: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        start = time.process_time()
        with super().__call__(stage):
            yield
        self.cpu[stage] += time.process_time() - start


class Probes:
    """Wraps methods of G2SF's classes to time them (through the run's MemoryTimer, so each gets a peak RSS) and to
    keep what they return, without changing what they compute."""

    def __init__(self, timer: MemoryTimer):
        self.timer, self.stack = timer, ExitStack()
        self.calls: dict[str, int] = defaultdict(int)
        self.kept: dict[str, object] = {}

    def wrap(self, owner, name: str, stage: str, keep: str | None = None) -> None:
        original = getattr(owner, name)

        @wraps(original)
        def timed(*args, **kwargs):
            self.calls[stage] += 1
            with self.timer(stage):
                out = original(*args, **kwargs)
            if keep is not None:
                self.kept[keep] = args[0] if keep == "self" else out
            return out

        static = isinstance(inspect.getattr_static(owner, name), staticmethod)
        self.stack.enter_context(patch.object(owner, name, staticmethod(timed) if static else timed))


def balanced_draw(labels, batch: int, generator):
    """``batch`` positions drawn with replacement, both labels equally likely (the class-balanced sampler)."""
    import torch

    weights = torch.where(labels == 1, 1.0 / (labels == 1).sum(), 1.0 / (labels == -1).sum()).double()
    return torch.multinomial(weights, batch, replacement=True, generator=generator)


def full_batch_steps(trainer, batch: int, steps: int) -> dict[str, float]:
    """Median wall and CPU seconds of one training step (every loss, backward, both Adam steps) and of one
    validation step (the nearest rows' fused distance, separation and margin losses, no gradient) at ``batch``
    training rows drawn with replacement. Run after the class's fit and test (their numbers are taken already),
    on the trained LSPN with fresh optimisers."""
    import statistics

    import torch

    from m3dm.detection.lspn import margin_loss, separation_loss

    s = trainer.settings
    net_optimiser = torch.optim.Adam(trainer.net.parameters(), lr=s.lr, weight_decay=1e-4)
    global_optimiser = torch.optim.Adam([trainer.raw_global], lr=5e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(steps):
        idx = trainer.train_idx[balanced_draw(trainer.rows.labels[trainer.train_idx], batch, generator)]
        trainer.net.train()
        start, cpu = time.perf_counter(), time.process_time()
        terms = trainer.losses(idx)
        total = torch.stack([s.weights[k] * v for k, v in terms.items()]).sum()
        net_optimiser.zero_grad()
        global_optimiser.zero_grad()
        total.backward()
        net_optimiser.step()
        global_optimiser.step()
        times["step_s"].append(time.perf_counter() - start)
        times["step_cpu_s"].append(time.process_time() - cpu)
        trainer.net.eval()
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            features, labels, cores = trainer._batch(idx)
            nearest = trainer._distance(features, cores[0])
            separation_loss(nearest.value, labels, trainer.margin, s.alpha, weighted=False)
            margin_loss(nearest.value, labels, s.perc)
        times["val_step_s"].append(time.perf_counter() - start)
        times["val_step_cpu_s"].append(time.process_time() - cpu)
    return {key: statistics.median(values) for key, values in times.items()}


def probe_g2sf(probes: Probes) -> None:
    from m3dm.data.pseudo_anomaly import PseudoAnomalySynthesiser
    from m3dm.detection.g2sf import G2SFDetector
    from m3dm.detection.lspn import LSPNTraining

    probes.wrap(G2SFDetector, "_build_banks", "g2sf: banks (coreset)")
    probes.wrap(PseudoAnomalySynthesiser, "anomaly", "g2sf: pseudo-anomaly synthesis")
    probes.wrap(PseudoAnomalySynthesiser, "normal", "g2sf: pseudo-anomaly synthesis")
    probes.wrap(G2SFDetector, "_tensors", "g2sf: pseudo-anomalies to tensors")
    probes.wrap(G2SFDetector, "_collect", "g2sf: pseudo extract + rows")
    probes.wrap(G2SFDetector, "_rows", "g2sf: fusion rows")
    probes.wrap(G2SFDetector, "fusion_dataset", "g2sf: fusion dataset (all)", keep="out")
    probes.wrap(LSPNTraining, "__init__", "g2sf: LSPN set-up", keep="self")
    probes.wrap(LSPNTraining, "run", "g2sf: LSPN training")


def fit_and_test(method: str, data: Path, args, vit: str, groups: tuple[int, int], timer: CpuMemoryTimer,
                 tmp: str):
    """One method's fit and test on ``data`` with its own extractor; returns its row of the table."""
    from m3dm.app.run import ClassRun
    from m3dm.config import METHODS as SPECS
    from m3dm.config import Settings
    from m3dm.features.extractor import FeatureExtractor
    from m3dm.features.weights import build_point_backbone, build_rgb_backbone
    from m3dm.runtime import seed_everything

    detector = {"method_name": method, "memory_bank": SPECS[method].memory_bank}
    if method == "G2SF":
        detector.update(num_anomalies=args.num_anomalies, max_epoch=args.max_epoch,
                        fusion_batch_size=args.fusion_batch_size)
    settings = Settings().replace(
        detector=detector,
        backbones={"random_init": True, "rgb_backbone_name": vit, "num_group": groups[0], "group_size": groups[1]},
        run={"dataset_path": str(data), "batch_size": args.batch_size, "spool_dir": tmp, "device": "cpu"})
    settings.validate()
    seed_everything(0)
    rgb = build_rgb_backbone(vit, random_init=True, quiet=True).eval()
    point = build_point_backbone("Point_MAE", random_init=True, quiet=True, num_group=groups[0],
                                 group_size=groups[1])
    extractor = FeatureExtractor(rgb, point, device="cpu", seed=0)
    timer.seconds.clear()
    timer.peak.clear()
    timer.cpu.clear()
    probes = Probes(timer)
    if method == "G2SF":
        probe_g2sf(probes)
    with probes.stack:
        run = ClassRun(settings, "gadget", extractor, device="cpu", timer=timer, progress=False)
        start = time.perf_counter()
        run.fit()
        fit = time.perf_counter() - start
        start = time.perf_counter()
        result = run.evaluate()
        test = time.perf_counter() - start
    row = {"method": method, "groups": groups, "fit_s": fit, "test_s": test, "n_test": len(result.labels),
           "stages": dict(timer.seconds), "cpu": dict(timer.cpu), "peaks": dict(timer.peak),
           "calls": dict(probes.calls),
           "peak_rss_gb": max(timer.peak.values()), "model_mb": state_bytes(run.detector.to_state()) / 2**20,
           "metrics": result.metrics}
    if method == "G2SF":
        trainer, rows = probes.kept["self"], probes.kept["out"]
        row.update(lspn_batch=trainer.batch, rows=int(rows.labels.shape[0]),
                   anomalous=int((rows.labels == -1).sum()), rows_mb=state_bytes(vars(rows)) / 2**20,
                   train_batches=len(trainer.train_idx) // trainer.batch,
                   val_batches=len(trainer.val_idx) // trainer.batch)
        if args.full_batch:
            row.update(full_batch_steps(trainer, args.full_batch, args.full_batch_steps))
    return row


def print_rows(rows: list[dict], args) -> None:
    print(f"{'method':<16}{'groups':>8}{'fit s':>9}{'test s/sample':>15}{'peak RSS GB':>13}{'model MB':>10}")
    for row in rows:
        print(f"{row['method']:<16}{row['groups'][0]:>8}{row['fit_s']:>9.1f}{row['test_s'] / row['n_test']:>15.2f}"
              f"{row['peak_rss_gb']:>13.2f}{row['model_mb']:>10.1f}")
    m3dm, g2sf = rows
    print(f"G2SF / M3DM: fit {g2sf['fit_s'] / m3dm['fit_s']:.2f}x, test per sample "
          f"{g2sf['test_s'] / m3dm['test_s']:.2f}x, fit + test "
          f"{(g2sf['fit_s'] + g2sf['test_s']) / (m3dm['fit_s'] + m3dm['test_s']):.2f}x")
    for row in rows:
        print(f"\n{row['method']}: stage, wall s, CPU s, calls, peak RSS GB")
        for stage, seconds in row["stages"].items():
            print(f"  {stage:<44}{seconds:>9.2f}{row['cpu'].get(stage, 0):>9.2f}{row['calls'].get(stage, ''):>6}"
                  f"{row['peaks'].get(stage, 0):>8.2f}")
        print(f"  metrics (random weights): {row['metrics']}")


def extrapolate(g2sf: dict, args) -> None:
    """The stages that grow with the pseudo-anomalies and the LSPN's epoch at the reference's configuration, from
    this run's per-sample figures and the timed full-batch steps (an extrapolation, not a measurement); wall and
    CPU seconds (on a machine shared with other jobs the CPU seconds are what the work costs)."""
    n = FULL["num_anomalies"]
    per_anomaly = g2sf["rows"] / args.num_anomalies
    rows_full = per_anomaly * n
    for clock, stages in (("wall", g2sf["stages"]), ("CPU", g2sf["cpu"])):
        epoch_s = stages["g2sf: LSPN training"] / args.max_epoch
        synth = stages["g2sf: pseudo-anomaly synthesis"] / args.num_anomalies
        extract = (stages["g2sf: pseudo extract + rows"] - stages["g2sf: fusion rows"]) / args.num_anomalies
        print(f"\n[{clock}] LSPN: {g2sf['rows']} fusion rows ({g2sf['anomalous']} anomalous, {per_anomaly:.0f} per "
              f"pseudo sample, {g2sf['rows_mb']:.1f} MB), batch {g2sf['lspn_batch']}, {g2sf['train_batches']} "
              f"training + {g2sf['val_batches']} validation batches an epoch: {epoch_s:.2f} s an epoch (measured)")
        print(f"[{clock}] extrapolated to {n} pseudo-anomalies: synthesis {synth * n / 60:.1f} min ({synth:.2f} s "
              f"each), their extraction {extract * n / 60:.1f} min ({extract:.2f} s each), {rows_full / 1e6:.2f} M "
              f"fusion rows = {g2sf['rows_mb'] / g2sf['rows'] * rows_full / 1024:.1f} GB")
        suffix = "_s" if clock == "wall" else "_cpu_s"
        if "step" + suffix in g2sf:
            batch = args.full_batch
            train_batches, val_batches = int(rows_full - rows_full // 2) // batch, int(rows_full // 2) // batch
            step, val_step = g2sf["step" + suffix], g2sf["val_step" + suffix]
            epoch = train_batches * step + val_batches * val_step
            print(f"[{clock}] at batch {batch}: a training step {step:.2f} s, a validation step {val_step:.2f} s "
                  f"(measured, median of {args.full_batch_steps}); extrapolated epoch of {train_batches} + "
                  f"{val_batches} batches {epoch / 60:.1f} min, {FULL['max_epoch']} epochs "
                  f"{epoch * FULL['max_epoch'] / 3600:.1f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=4)
    parser.add_argument("--test", type=int, default=4,
                        help="test samples: max(1, n // 8) of each of the 4 defect types, the rest good")
    parser.add_argument("--size", type=int, default=256, help="side of the generated images")
    parser.add_argument("--num_anomalies", type=int, default=8)
    parser.add_argument("--max_epoch", type=int, default=3)
    parser.add_argument("--fusion_batch_size", type=int, default=8192)
    parser.add_argument("--full_batch", type=int, default=8192,
                        help="batch of the separately timed steps (0: none)")
    parser.add_argument("--full_batch_steps", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=2, help="extraction batch")
    parser.add_argument("--small", action="store_true", help="tiny ViT, 64 groups of 32 points")
    parser.add_argument("--json", help="also write the measured rows to this JSON file")
    args = parser.parse_args()

    import torch

    from m3dm.data.synthetic import write_mvtec3d
    from m3dm.preprocess.mvtec3d import preprocess_dataset

    vit = "vit_tiny_patch16_224" if args.small else "vit_base_patch8_224_dino"
    groups = {"DINO+Point_MAE": (64, 32) if args.small else (1024, 128), "G2SF": (64, 32) if args.small else (512, 128)}
    timer = CpuMemoryTimer()
    with tempfile.TemporaryDirectory() as tmp:
        n_defect = max(1, args.test // 8)
        raw = write_mvtec3d(Path(tmp) / "raw", classes=("gadget",), size=args.size, n_train=args.train, n_val=0,
                            n_test_good=args.test - 4 * n_defect, n_test_defect=n_defect, progress=False)
        data = preprocess_dataset(raw, workers=2).output
        rows = [fit_and_test(method, data, args, vit, groups[method], timer, tmp) for method in groups]
    timer._stop = True
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    print(f"\n{args.train} training and {args.test} test samples at {args.size} px, {vit}, Point-MAE groups of "
          f"{groups['G2SF'][1]}, G2SF {args.num_anomalies} pseudo-anomalies, {args.max_epoch} epochs, "
          f"{torch.get_num_threads()} threads, resident memory at the end {rss_gb():.2f} GB")
    print_rows(rows, args)
    extrapolate(rows[1], args)


if __name__ == "__main__":
    main()
