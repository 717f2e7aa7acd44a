"""UFF pretraining (spec §7.4–7.5) on the feature dumps of ``main.py --save_feature``, on torch.distributed.

Runs as a plain single process, under ``torchrun --nproc_per_node=N`` or under
``python -m torch.distributed.launch --nproc_per_node=N`` (gloo on CPU, NCCL on CUDA). Keys are gathered
across processes, so the loss over a global batch is the same for any number of processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from .constants import XYZ_FEATURE_DIM
from .data.io import atomic_path
from .fusion import RGB_FEATURE_DIM, FeatureFusionBlock

REFERENCE_WEIGHT_DECAY = 0.01  # AdamW's default, which the reference uses because it ignores --weight_decay


# ----------------------------------------------------------------------------------------------- data

class FeatureDumpDataset(Dataset):
    """Every ``*.pt`` file of a folder, sorted, each a ``(patches, 1152 + 768)`` float tensor."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"feature folder {folder} not found (write it with main.py --save_feature)")
        self.files = sorted(p for p in folder.iterdir() if p.suffix == ".pt" and not p.name.startswith("."))
        if not self.files:
            raise ValueError(f"feature folder {folder} holds no .pt files (write them with main.py --save_feature)")
        self.shape = tuple(self._load(self.files[0]).shape)

    def _load(self, path: Path) -> torch.Tensor:
        try:
            features = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable feature tensor ({type(exc).__name__}: {exc})") from exc
        expected_dim = XYZ_FEATURE_DIM + RGB_FEATURE_DIM
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != expected_dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"{path}: expected a (patches, {expected_dim}) tensor, got {shape}")
        if hasattr(self, "shape") and tuple(features.shape) != self.shape:
            raise ValueError(f"{path}: shape {tuple(features.shape)} differs from {self.files[0].name}'s {self.shape}")
        return features.float()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._load(self.files[index])


# ------------------------------------------------------------------------------------------- distributed

def init_distributed(device: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group when a launcher set the environment."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, local_rank


def gather_keys(keys: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """All processes' keys in rank order (gradients flow back to their owners), this process's offset into
    them and the total count. Processes may hold different numbers of keys."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys, 0, len(keys)
    world, rank = dist.get_world_size(), dist.get_rank()
    counts = [torch.zeros(1, dtype=torch.long, device=keys.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(keys)], device=keys.device))
    counts = [int(c) for c in counts]
    padded = F.pad(keys, (0, 0, 0, max(counts) - len(keys)))
    from torch.distributed.nn.functional import all_gather  # autograd-aware

    gathered = all_gather(padded)
    all_keys = torch.cat([g[:n] for g, n in zip(gathered, counts)])
    return all_keys, sum(counts[:rank]), sum(counts)


def contrastive_loss(block: FeatureFusionBlock, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """The reference loss (cross-entropy of RGB queries against xyz keys, × 2T) over the global batch.

    Each process returns ``world · (its rows' summed cross-entropy) / (rows of all processes)``, so that the
    mean over processes (what DDP's gradient averaging and the logged loss use) is the global-batch mean.
    """
    q, k = block.projections(xyz, rgb)
    all_keys, offset, total = gather_keys(k)
    logits = q @ all_keys.T / block.temperature
    targets = torch.arange(len(q), device=q.device) + offset
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    summed = F.cross_entropy(logits, targets, reduction="sum")
    return summed * world / max(total, 1) * (2 * block.temperature)


def mean_over_processes(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


# -------------------------------------------------------------------------------------------- schedule

def learning_rate(epoch_fraction: float, args) -> float:
    """Linear warm-up then half-cycle cosine (spec §7.5)."""
    if epoch_fraction < args.warmup_epochs:
        return args.lr * epoch_fraction / args.warmup_epochs
    progress = (epoch_fraction - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-12)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- training

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="UFF pretraining (reference flags).")
    p.add_argument("--batch_size", type=int, default=64, help="per-process batch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--accum_iter", type=int, default=1)
    p.add_argument("--input_size", type=int, default=224, help="unused (kept for the reference's CLI)")
    p.add_argument("--weight_decay", type=float, default=None,
                   help=f"AdamW weight decay; default: the reference's effective {REFERENCE_WEIGHT_DECAY} "
                        f"(its own --weight_decay 1.5e-6 is parsed but never used)")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * effective batch / 256)")
    p.add_argument("--blr", type=float, default=0.002)
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--warmup_epochs", type=float, default=1)
    p.add_argument("--data_path", default="", help="folder of dumped .pt features")
    p.add_argument("--output_dir", default="./output_dir")
    p.add_argument("--log_dir", default="./output_dir", help="unused (no TensorBoard)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (cpu when CUDA is unavailable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default="")
    p.add_argument("--start_epoch", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=10)
    p.add_argument("--pin_mem", action="store_true", default=True)
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    p.add_argument("--world_size", type=int, default=1, help="taken from the launcher's environment")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by torch.distributed.launch")
    p.add_argument("--dist_on_itp", action="store_true", help="take rank/world size from OpenMPI variables")
    p.add_argument("--dist_url", default="env://")
    return p


def _itp_environment() -> None:
    for ours, theirs in (("RANK", "OMPI_COMM_WORLD_RANK"), ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
                         ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")):
        os.environ.setdefault(ours, os.environ[theirs])


def save_checkpoint(path: Path, block, optimizer, epoch: int, scaler, args) -> None:
    state = {"model": block.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "scaler": scaler.state_dict() if scaler is not None else None, "args": vars(args)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train(argv=None) -> Path | None:
    args = build_parser().parse_args(argv)
    if args.dist_on_itp:
        _itp_environment()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: training on the CPU")
        args.device = "cpu"
    rank, world, local_rank = init_distributed(args.device)
    device = torch.device(f"cuda:{local_rank}" if args.device.startswith("cuda") else "cpu")
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    dataset = FeatureDumpDataset(args.data_path)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    workers = min(args.num_workers, os.cpu_count() or 1)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"{args.data_path}: {len(dataset)} feature files are fewer than one batch of "
                         f"{args.batch_size} per process x {world} processes")
    effective_batch = args.batch_size * args.accum_iter * world
    if args.lr is None:
        args.lr = args.blr * effective_batch / 256
    log(f"base lr: {args.lr * 256 / effective_batch:.3e}, actual lr: {args.lr:.3e}, effective batch "
        f"{effective_batch} ({world} process(es)), {len(dataset)} samples of shape {dataset.shape}")

    torch.manual_seed(args.seed)  # identical initial weights for any number of processes
    block = FeatureFusionBlock().to(device)
    model = DistributedDataParallel(block, device_ids=[local_rank] if device.type == "cuda" else None) \
        if world > 1 else block
    weight_decay = REFERENCE_WEIGHT_DECAY if args.weight_decay is None else args.weight_decay
    optimizer = torch.optim.AdamW(block.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    if args.resume:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False)
        block.load_state_dict(checkpoint["model"], strict=True)
        if "optimizer" in checkpoint and "epoch" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
            args.start_epoch = checkpoint["epoch"] + 1
            if scaler is not None and checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
        log(f"resumed from {args.resume}: starting at epoch {args.start_epoch}")

    output_dir = Path(args.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    last = None
    for epoch in range(args.start_epoch, args.epochs):
        stats = train_one_epoch(model, block, loader, sampler, optimizer, scaler, epoch, args, device, is_main)
        if is_main:
            last = output_dir / f"checkpoint-{epoch}.pth"
            save_checkpoint(last, block, optimizer, epoch, scaler, args)
            with open(output_dir / "log.txt", "a") as f:
                f.write(json.dumps({**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}) + "\n")
            log(f"epoch {epoch}: loss {stats['loss']:.4f}, lr {stats['lr']:.3e} -> {last}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return last


def train_one_epoch(model, block, loader, sampler, optimizer, scaler, epoch, args, device, is_main) -> dict:
    model.train()
    sampler.set_epoch(epoch)
    optimizer.zero_grad()  # a trailing partial accumulation of the previous epoch is discarded
    steps = len(loader)
    losses, first_loss = [], None
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not is_main)
    for step, batch in enumerate(bar):
        if step % args.accum_iter == 0:
            lr = learning_rate(epoch + step / steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        batch = batch.to(device, non_blocking=True)
        xyz, rgb = batch[..., :XYZ_FEATURE_DIM], batch[..., XYZ_FEATURE_DIM:]
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            loss = contrastive_loss(block, xyz, rgb)
        # DDP synchronises gradients in backward; the loss itself is computed on the unwrapped block
        # (gather_keys already couples the processes), so model is used for its gradient hooks only.
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            sys.exit(f"loss is {loss_value} at epoch {epoch} step {step}: stopping")
        scaled = loss / args.accum_iter
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if (step + 1) % args.accum_iter == 0:
            if scaler is not None:
                scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()
        global_loss = mean_over_processes(loss_value, device)
        first_loss = global_loss if first_loss is None else first_loss
        losses.append(global_loss)
        bar.set_postfix(loss=f"{global_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return {"loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"], "first_step_loss": first_loss,
            "steps": steps}
