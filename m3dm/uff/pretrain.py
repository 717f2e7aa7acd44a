"""UFF pretraining (spec §7.4–7.5, §10.2) on the feature dumps of ``main.py --save_feature``, on torch.distributed.

Runs as a plain single process, under ``torchrun --nproc_per_node=N`` or under
``python -m torch.distributed.launch --nproc_per_node=N`` (gloo on CPU, NCCL on CUDA), with DDP. The xyz keys are
gathered across processes (``m3dm.uff.block.contrastive_loss``), so the loss of a global batch is the same for any
number of processes; a ``DistributedSampler`` gives each process its share of a global order that does not
depend on the number of processes. Only rank 0 writes (checkpoints, ``log.txt``, progress bar).

Kept from the reference on purpose: AdamW's default weight decay 0.01 on every parameter unless
``--weight_decay`` is given (quirk 22), the lr set only at accumulation boundaries so the first window runs at
lr 0 and a trailing partial accumulation discarded (quirk 23), the ×2T loss factor (quirk 21).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from m3dm.constants import XYZ_FEATURE_DIM
from m3dm.data.io import atomic_path
from m3dm.uff.block import FeatureFusionBlock, load_block_state
from m3dm.errors import CheckpointError, FeatureDumpError

REFERENCE_WEIGHT_DECAY = 0.01  # AdamW's default, which the reference uses because it ignores --weight_decay
ADAMW_BETAS = (0.9, 0.95)




# ----------------------------------------------------------------------------------------------- data

class FeatureDumpDataset(Dataset):
    """Every ``*.pt`` file of a folder in name order, each a ``(patches, 1152 + C)`` float tensor: unnormalised
    xyz patch features, then RGB features of width ``C`` (768 for ViT-B). Every file is checked up front
    (memory-mapped, so only the headers are read) for one common shape."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FeatureDumpError(f"feature folder '{folder}' not found (write it with main.py --save_feature)")
        # dot files are the temporaries of interrupted atomic writes
        self.files = sorted(p for p in self.folder.iterdir()
                            if p.suffix == ".pt" and p.is_file() and not p.name.startswith("."))
        if not self.files:
            raise FeatureDumpError(f"feature folder '{self.folder}' holds no .pt feature files (write them with "
                                   f"main.py --method_name DINO+Point_MAE --save_feature --save_feature_path "
                                   f"{self.folder})")
        self.shape = self._check(self.files[0], self._read(self.files[0], mmap=True), None)
        for path in self.files[1:]:
            self._check(path, self._read(path, mmap=True), self.shape)

    @property
    def rgb_dim(self) -> int:
        return self.shape[1] - XYZ_FEATURE_DIM

    @staticmethod
    def _read(path: Path, mmap: bool) -> torch.Tensor:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:
            if mmap:  # legacy (non-zip) serialisation cannot be memory-mapped
                return FeatureDumpDataset._read(path, mmap=False)
            raise FeatureDumpError(f"{path}: not a readable feature tensor ({type(exc).__name__}: {exc})") from exc

    def _check(self, path: Path, features, expected: tuple[int, int] | None) -> tuple[int, int]:
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] <= XYZ_FEATURE_DIM:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise FeatureDumpError(f"{path}: expected a (patches, {XYZ_FEATURE_DIM} + C) feature tensor "
                                   f"(C = RGB width, 768 for ViT-B), got {got}")
        if expected is not None and tuple(features.shape) != expected:
            raise FeatureDumpError(f"{path}: shape {tuple(features.shape)} differs from {expected} of "
                                   f"{self.files[0]} (mixed backbones or layouts in '{self.folder}'?)")
        return tuple(features.shape)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        features = self._read(path, mmap=False)
        self._check(path, features, self.shape)  # the file may have changed since the scan
        return features.float()


# ------------------------------------------------------------------------------------------- distributed

def init_distributed(args) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``. Initialises the default process group (NCCL on CUDA, gloo on CPU)
    when a launcher set ``RANK``/``WORLD_SIZE`` (torchrun, torch.distributed.launch) or, with
    ``--dist_on_itp``, the OpenMPI variables; otherwise a plain single process without a group."""
    if args.dist_on_itp:
        for ours, theirs in (("RANK", "OMPI_COMM_WORLD_RANK"), ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
                             ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")):
            if theirs in os.environ:
                os.environ.setdefault(ours, os.environ[theirs])
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, max(args.local_rank, 0)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method=args.dist_url,
                            rank=rank, world_size=world)
    return rank, world, local_rank


def mean_over_processes(value: float, device: torch.device) -> float:
    """The mean of a per-process number over all processes (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


# -------------------------------------------------------------------------------------------- schedule

def learning_rate(epoch_fraction: float, args) -> float:
    """Linear warm-up over ``warmup_epochs`` then half-cycle cosine down to ``min_lr`` (spec §7.5)."""
    if epoch_fraction < args.warmup_epochs:
        return args.lr * epoch_fraction / args.warmup_epochs
    progress = (epoch_fraction - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    """The reference's flags and defaults (spec §10.2)."""
    p = argparse.ArgumentParser(description="UFF contrastive fusion pretraining on main.py --save_feature dumps "
                                            "(single process, torchrun or torch.distributed.launch).")
    p.add_argument("--batch_size", type=int, default=64, help="per-process batch (the README uses 16)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation steps (the README uses 16)")
    p.add_argument("--input_size", type=int, default=224, help="unused (kept for the reference's CLI)")
    p.add_argument("--weight_decay", type=float, default=None,
                   help=f"AdamW weight decay on every parameter; default: the reference's effective "
                        f"{REFERENCE_WEIGHT_DECAY} (its own default 1.5e-6 is parsed but never used)")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * effective batch / 256)")
    p.add_argument("--blr", type=float, default=0.002, help="base lr: lr = blr * effective batch / 256")
    p.add_argument("--min_lr", type=float, default=0.0, help="floor of the cosine schedule")
    p.add_argument("--warmup_epochs", type=float, default=1, help="linear warm-up length in (fractional) epochs")
    p.add_argument("--data_path", default="", help="folder of .pt features written by main.py --save_feature")
    p.add_argument("--output_dir", default="./output_dir", help="checkpoint-<epoch>.pth and log.txt")
    p.add_argument("--log_dir", default="./output_dir", help="unused (the reference's TensorBoard folder)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (cpu when CUDA is not available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default="", help="checkpoint to continue from (at its epoch + 1)")
    p.add_argument("--start_epoch", type=int, default=0, help="first epoch (replaced by --resume)")
    p.add_argument("--num_workers", type=int, default=10)
    p.add_argument("--pin_mem", action="store_true", default=True, help="pinned host memory (CUDA only)")
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    p.add_argument("--world_size", type=int, default=1, help="taken from the launcher's environment")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="passed by torch.distributed.launch (LOCAL_RANK from the environment wins)")
    p.add_argument("--dist_on_itp", action="store_true", help="take rank and world size from OpenMPI variables")
    p.add_argument("--dist_url", default="env://", help="process-group init method")
    return p


# ---------------------------------------------------------------------------------------------- training

def _load_resume_checkpoint(source: str) -> dict:
    if source.startswith(("http://", "https://")):  # the reference downloads; this project never does
        raise CheckpointError(f"--resume {source}: nothing is downloaded at run time; download the checkpoint "
                              f"yourself and pass its local path")
    try:
        return torch.load(source, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"--resume {source}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


def resume(args, block: FeatureFusionBlock, optimizer, scaler) -> None:
    """Load ``model`` strictly; with ``optimizer`` and ``epoch``, also the optimiser (and scaler) state and
    continue at ``epoch + 1`` (the reference's ``load_model``)."""
    checkpoint = _load_resume_checkpoint(args.resume)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"--resume {args.resume}: expected a fusion_pretrain.py checkpoint with a 'model'")
    load_block_state(block, checkpoint["model"], args.resume)
    if "optimizer" in checkpoint and "epoch" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        args.start_epoch = int(checkpoint["epoch"]) + 1
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])


def save_checkpoint(path: Path, block: FeatureFusionBlock, optimizer, epoch: int, scaler, args) -> None:
    """The reference's format; ``args`` as a plain dict (with ``rgb_dim``) so ``weights_only`` loading works."""
    state = {"model": block.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "scaler": scaler.state_dict() if scaler is not None else None, "args": dict(vars(args))}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _device(args) -> torch.device:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: training on the CPU", file=sys.stderr)
        args.device = "cpu"
    return torch.device(args.device)


def train(argv: list[str] | None = None) -> Path | None:
    """Parse ``argv`` and train; returns the last checkpoint written (rank 0) or ``None``."""
    args = build_parser().parse_args(argv)
    _device(args)
    rank, world, local_rank = init_distributed(args)
    try:
        return _train(args, rank, world, local_rank)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank: int, world: int, local_rank: int) -> Path | None:
    device = torch.device(f"cuda:{local_rank}") if args.device.startswith("cuda") else torch.device("cpu")
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    dataset = FeatureDumpDataset(args.data_path)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                        num_workers=min(args.num_workers, os.cpu_count() or 1),
                        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True)
    if len(loader) == 0:
        raise FeatureDumpError(f"'{args.data_path}': {len(dataset)} feature files are fewer than one batch "
                               f"({args.batch_size} per process x {world} process(es))")
    effective_batch = args.batch_size * args.accum_iter * world
    if args.lr is None:
        args.lr = args.blr * effective_batch / 256
    if args.weight_decay is None:
        args.weight_decay = REFERENCE_WEIGHT_DECAY
    args.world_size, args.rgb_dim, args.xyz_dim, args.patches = world, dataset.rgb_dim, XYZ_FEATURE_DIM, \
        dataset.shape[0]
    log(f"{len(dataset)} feature files of shape {dataset.shape} (RGB width {dataset.rgb_dim}) in {args.data_path}")
    log(f"base lr: {args.lr * 256 / effective_batch:.2e}, actual lr: {args.lr:.2e}, effective batch "
        f"{effective_batch} = {args.batch_size} x {args.accum_iter} accumulation x {world} process(es), "
        f"weight decay {args.weight_decay}")

    torch.manual_seed(args.seed)  # the same initial weights for any number of processes
    block = FeatureFusionBlock(rgb_dim=dataset.rgb_dim).to(device)
    optimizer = torch.optim.AdamW(block.parameters(), lr=args.lr, betas=ADAMW_BETAS,
                                  weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    if args.resume:
        resume(args, block, optimizer, scaler)
        log(f"resumed from {args.resume}: continuing at epoch {args.start_epoch}")
    model = block if world == 1 else DistributedDataParallel(
        block, device_ids=[local_rank] if device.type == "cuda" else None)

    output_dir = Path(args.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    if args.start_epoch >= args.epochs:
        log(f"nothing to train: the first epoch {args.start_epoch} is not below --epochs {args.epochs}")
    last = None
    for epoch in range(args.start_epoch, args.epochs):
        stats = train_one_epoch(model, loader, sampler, optimizer, scaler, epoch, args, device, is_main)
        if is_main:
            last = output_dir / f"checkpoint-{epoch}.pth"
            save_checkpoint(last, block, optimizer, epoch, scaler, args)
            with open(output_dir / "log.txt", "a") as f:
                f.write(json.dumps({**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}) + "\n")
            log(f"epoch {epoch}: loss {stats['loss']:.4f}, lr {stats['lr']:.2e}, saved {last}")
    if world > 1:
        dist.barrier()  # no process leaves while rank 0 is still writing
    return last


def train_one_epoch(model, loader, sampler, optimizer, scaler, epoch: int, args, device: torch.device,
                    is_main: bool) -> dict:
    """One epoch of the reference's engine (spec §7.4); returns the epoch means of the loss and lr (the
    reference's ``train_loss``/``train_lr``) and the first step's loss (for comparisons across world sizes)."""
    model.train()
    sampler.set_epoch(epoch)
    optimizer.zero_grad()  # a trailing partial accumulation of the previous epoch is discarded (quirk 23)
    steps = len(loader)
    losses, lrs = [], []
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not is_main, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        if step % args.accum_iter == 0:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch + step / steps, args) * group.get("lr_scale", 1.0)
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            loss = model(batch[..., :XYZ_FEATURE_DIM], batch[..., XYZ_FEATURE_DIM:])
        loss_value = mean_over_processes(loss.item(), device)  # every process sees the same value
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at epoch {epoch} step {step}: stopping training")
        scaled = loss / args.accum_iter
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if (step + 1) % args.accum_iter == 0:
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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: clear one-line errors for bad inputs instead of tracebacks."""
    try:
        train(argv)
    except (FeatureDumpError, CheckpointError) as exc:
        print(f"fusion_pretrain.py: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # the reference aborts on a non-finite loss as well
        print(f"fusion_pretrain.py: {exc}", file=sys.stderr)
        return 1
    return 0
