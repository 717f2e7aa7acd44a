"""UFF pretraining (docs/original.md) on the feature dumps of ``main.py --save_feature``, on torch.distributed.

Runs as a plain single process, under ``torchrun --nproc_per_node=N`` or under
``python -m torch.distributed.launch --nproc_per_node=N`` (gloo on CPU, NCCL on CUDA), with DDP. The xyz keys are
gathered across processes (``m3dm.uff.loss.contrastive_loss``), so the loss of a global batch is the same for any
number of processes; a ``DistributedSampler`` gives each process its share of a global order that does not
depend on the number of processes. Only rank 0 writes (checkpoints, ``log.txt``, progress bar, messages).

Kept from the reference on purpose: AdamW's default weight decay 0.01 on every parameter unless
``--weight_decay`` is given (quirk 22), the lr set only at accumulation boundaries so the first window runs at
lr 0 and a trailing partial accumulation discarded (quirk 23), the ×2T loss factor (quirk 21).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from m3dm.config import setting
from m3dm.constants import XYZ_FEATURE_DIM
from m3dm.data.dataset import error_forwarding_loader
from m3dm.data.io import atomic_path, disk_writes
from m3dm.errors import FeatureDumpError
from m3dm.features.weights import read_uff_checkpoint
from m3dm.runtime import Processes, resolve_device, start_processes, stop_processes, use_device
from m3dm.uff.block import FeatureFusionBlock, load_block_state
from m3dm.uff.dumps import FeatureDumpDataset

log = logging.getLogger(__name__)

REFERENCE_WEIGHT_DECAY = 0.01  # AdamW's default, which the reference uses because it ignores --weight_decay
ADAMW_BETAS = (0.9, 0.95)


# -------------------------------------------------------------------------------------------- settings

PRETRAIN_FLAGS = "reference flags (same names and defaults as the original fusion_pretrain.py)"


@dataclass(frozen=True)
class PretrainSettings:
    """Every flag of the reference's ``fusion_pretrain.py`` with its default; the command line
    (m3dm.app.pretrain) is derived from these fields."""

    batch_size: int = setting(64, "per-process batch (the README uses 16)", group=PRETRAIN_FLAGS)
    epochs: int = setting(3, group=PRETRAIN_FLAGS)
    accum_iter: int = setting(1, "gradient accumulation steps (the README uses 16)", group=PRETRAIN_FLAGS)
    weight_decay: float | None = setting(
        None, f"AdamW weight decay on every parameter; default: the reference's effective "
              f"{REFERENCE_WEIGHT_DECAY} (its own default 1.5e-6 is parsed but never used)", type=float,
        group=PRETRAIN_FLAGS)
    lr: float | None = setting(None, "absolute lr (default: blr * effective batch / 256)", type=float,
                               group=PRETRAIN_FLAGS)
    blr: float = setting(0.002, "base lr: lr = blr * effective batch / 256", group=PRETRAIN_FLAGS)
    min_lr: float = setting(0.0, "floor of the cosine schedule", group=PRETRAIN_FLAGS)
    warmup_epochs: float = setting(1.0, "linear warm-up length in (fractional) epochs", group=PRETRAIN_FLAGS)
    data_path: str = setting("", "folder of .pt features written by main.py --save_feature", group=PRETRAIN_FLAGS)
    output_dir: str = setting("./output_dir", "checkpoint-<epoch>.pth and log.txt", group=PRETRAIN_FLAGS)
    device: str = setting("cuda", "cuda, cpu or auto (cpu when CUDA is not available)", group=PRETRAIN_FLAGS)
    seed: int = setting(0, group=PRETRAIN_FLAGS)
    resume: str = setting("", "checkpoint to continue from (at its epoch + 1)", group=PRETRAIN_FLAGS)
    start_epoch: int = setting(0, "first epoch (replaced by --resume)", group=PRETRAIN_FLAGS)
    num_workers: int = setting(10, group=PRETRAIN_FLAGS)
    pin_mem: bool = setting(True, "pinned host memory (CUDA only; --no_pin_mem turns it off)", group=PRETRAIN_FLAGS)
    world_size: int = setting(1, "taken from the launcher's environment", group=PRETRAIN_FLAGS)
    local_rank: int = setting(-1, "passed by torch.distributed.launch (LOCAL_RANK from the environment wins)",
                              aliases=("--local-rank",), group=PRETRAIN_FLAGS)
    dist_on_itp: bool = setting(False, "take rank and world size from OpenMPI variables", group=PRETRAIN_FLAGS)
    dist_url: str = setting("env://", "process-group init method", group=PRETRAIN_FLAGS)


# ------------------------------------------------------------------------------------- derived settings

@dataclass(frozen=True)
class Schedule:
    """The learning rate: linear warm-up over ``warmup_epochs``, then a half-cycle cosine from ``lr``
    down to ``min_lr`` at ``epochs``; it changes at accumulation boundaries only (every ``accum_iter`` steps)."""

    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    accum_iter: int

    def lr_at(self, epoch_fraction: float) -> float:
        if epoch_fraction < self.warmup_epochs:
            return self.lr * epoch_fraction / self.warmup_epochs
        progress = (epoch_fraction - self.warmup_epochs) / (self.epochs - self.warmup_epochs)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainingRun:
    """What a run derives from its flags, its processes and its dumps (the parsed flags stay as they are)."""

    schedule: Schedule
    weight_decay: float
    effective_batch: int  # batch_size x accum_iter x processes
    processes: Processes
    device: torch.device
    rgb_dim: int
    patches: int

    @classmethod
    def plan(cls, args: PretrainSettings, processes: Processes, device: torch.device,
             dataset: FeatureDumpDataset) -> TrainingRun:
        effective_batch = args.batch_size * args.accum_iter * processes.world
        lr = args.blr * effective_batch / 256 if args.lr is None else args.lr
        weight_decay = REFERENCE_WEIGHT_DECAY if args.weight_decay is None else args.weight_decay
        return cls(Schedule(lr, args.min_lr, args.warmup_epochs, args.epochs, args.accum_iter), weight_decay,
                   effective_batch, processes, device, dataset.rgb_dim, dataset.shape[0])

    def checkpoint_args(self, args: PretrainSettings, start_epoch: int) -> dict:
        """A checkpoint's ``args``: every flag, with the values this run derived in place of the defaults, and
        the dumps' RGB width (read by ``load_fusion_block``), as a plain dict for ``weights_only`` loading."""
        return {**dataclasses.asdict(args), "device": args.device if self.device.type == "cuda" else "cpu",
                "lr": self.schedule.lr, "weight_decay": self.weight_decay, "start_epoch": start_epoch,
                "world_size": self.processes.world, "rgb_dim": self.rgb_dim, "xyz_dim": XYZ_FEATURE_DIM,
                "patches": self.patches}


# ---------------------------------------------------------------------------------------------- checkpoints

def resume(source: str, block: FeatureFusionBlock, optimizer, scaler) -> int | None:
    """Load ``model`` strictly; with ``optimizer`` and ``epoch``, also the optimiser (and scaler) state, and return
    the epoch to continue at, ``epoch + 1`` (the reference's ``load_model``); None without them."""
    checkpoint = read_uff_checkpoint(source, kind="--resume")
    load_block_state(block, checkpoint["model"], source)
    if "optimizer" not in checkpoint or "epoch" not in checkpoint:
        return None
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    return int(checkpoint["epoch"]) + 1


def save_checkpoint(path: Path, block: FeatureFusionBlock, optimizer, epoch: int, scaler, args: dict) -> None:
    """The reference's format, ``args`` as a plain dict (see ``TrainingRun.checkpoint_args``), written atomically."""
    state = {"model": block.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "scaler": scaler.state_dict() if scaler is not None else None, "args": args}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# ---------------------------------------------------------------------------------------------- training

def mean_over_processes(value: float, device: torch.device) -> float:
    """The mean of a per-process number over all processes (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


def train(args: PretrainSettings) -> Path | None:
    """Train on ``args.data_path``; returns the last checkpoint written (rank 0) or ``None``."""
    # a CUDA device without CUDA: the CPU, with a warning; "cuda" alone: the launcher's local GPU
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    requested = resolve_device(args.device, local_rank)
    cuda = requested.type == "cuda"
    processes = start_processes(cuda, init_method=args.dist_url, default_local_rank=max(args.local_rank, 0),
                                openmpi=args.dist_on_itp)
    # several processes: each its local GPU; one process: the device asked for (--device cuda:1 stays cuda:1)
    device = torch.device("cuda", processes.local_rank) if cuda and processes.world > 1 else requested
    use_device(device)  # this process's device is known only here, after the launcher's set-up
    try:
        last = _train(args, processes, device)
    except BaseException:
        # leave at once: a barrier could wait forever for processes still training
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    stop_processes()  # no process leaves while rank 0 is still writing
    return last


def _train(args: PretrainSettings, processes: Processes, device: torch.device) -> Path | None:
    info = log.info if processes.is_main else (lambda *_: None)
    torch.manual_seed(args.seed + processes.rank)
    np.random.seed(args.seed + processes.rank)

    dataset = FeatureDumpDataset(args.data_path)
    sampler: DistributedSampler = DistributedSampler(dataset, num_replicas=processes.world, rank=processes.rank,
                                                     shuffle=True, seed=args.seed)
    # a bad dump read by a worker process is raised here with its own one-line message
    loader = error_forwarding_loader(dataset, batch_size=args.batch_size, sampler=sampler,
                                     num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == "cuda",
                                     drop_last=True)
    if len(loader) == 0:
        raise FeatureDumpError(f"'{args.data_path}': {len(dataset)} feature files are fewer than one batch "
                               f"({args.batch_size} per process x {processes.world} process(es))")
    run = TrainingRun.plan(args, processes, device, dataset)
    info("%d feature files of shape %s (RGB width %d) in %s", len(dataset), dataset.shape, dataset.rgb_dim,
         args.data_path)
    info("base lr: %.2e, actual lr: %.2e, effective batch %d = %d x %d accumulation x %d process(es), weight "
         "decay %s", run.schedule.lr * 256 / run.effective_batch, run.schedule.lr, run.effective_batch,
         args.batch_size, args.accum_iter, processes.world, run.weight_decay)

    torch.manual_seed(args.seed)  # the same initial weights for any number of processes
    block = FeatureFusionBlock(rgb_dim=dataset.rgb_dim).to(device)
    optimizer = torch.optim.AdamW(block.parameters(), lr=run.schedule.lr, betas=ADAMW_BETAS,
                                  weight_decay=run.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    start_epoch = args.start_epoch
    if args.resume:
        resumed_at = resume(args.resume, block, optimizer, scaler)
        start_epoch = start_epoch if resumed_at is None else resumed_at
        info("resumed from %s: continuing at epoch %d", args.resume, start_epoch)
    model = block if processes.world == 1 else DistributedDataParallel(
        block, device_ids=[processes.local_rank] if device.type == "cuda" else None)

    output_dir = Path(args.output_dir)
    if processes.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    if start_epoch >= args.epochs:
        info("nothing to train: the first epoch %d is not below --epochs %d", start_epoch, args.epochs)
    last = None
    for epoch in range(start_epoch, args.epochs):
        stats = train_one_epoch(model, loader, sampler, optimizer, scaler, epoch, run.schedule, device,
                                processes.is_main)
        if processes.is_main:
            last = output_dir / f"checkpoint-{epoch}.pth"
            save_checkpoint(last, block, optimizer, epoch, scaler, run.checkpoint_args(args, start_epoch))
            with disk_writes(output_dir / "log.txt"), open(output_dir / "log.txt", "a") as f:
                f.write(json.dumps({**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}) + "\n")
            info("epoch %d: loss %.4f, lr %.2e, saved %s", epoch, stats["loss"], stats["lr"], last)
    return last


def train_one_epoch(model, loader, sampler, optimizer, scaler, epoch: int, schedule: Schedule,
                    device: torch.device, is_main: bool) -> dict:
    """One epoch of the reference's engine; returns the epoch means of the loss and lr (the
    reference's ``train_loss``/``train_lr``) and the first step's loss (for comparisons across world sizes)."""
    model.train()
    sampler.set_epoch(epoch)
    optimizer.zero_grad()  # a trailing partial accumulation of the previous epoch is discarded (quirk 23)
    steps = len(loader)
    losses, lrs = [], []
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not is_main, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        if step % schedule.accum_iter == 0:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(epoch + step / steps) * group.get("lr_scale", 1.0)
        batch = batch.to(device, non_blocking=True)
        boundary = (step + 1) % schedule.accum_iter == 0
        # between accumulation boundaries DDP keeps the gradients local: one all-reduce per optimiser step
        local = model.no_sync() if not boundary and hasattr(model, "no_sync") else contextlib.nullcontext()
        with local:
            with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
                loss = model(batch[..., :XYZ_FEATURE_DIM], batch[..., XYZ_FEATURE_DIM:])
            loss_value = mean_over_processes(loss.item(), device)  # every process sees the same value
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at epoch {epoch} step {step}: stopping training")
            scaled = loss / schedule.accum_iter
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if boundary:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()
        losses.append(loss_value)
        lrs.append(optimizer.param_groups[0]["lr"])
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lrs[-1]:.2e}")
    return {"loss": float(np.mean(losses)), "lr": float(np.mean(lrs)), "first_step_loss": losses[0],
            "steps": steps}
