"""Where and how a run executes: device choice, seeding, and joining a torch.distributed process group."""

from __future__ import annotations

import datetime
import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from m3dm.errors import ConfigError

log = logging.getLogger(__name__)


PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=12)


def import_open3d(purpose: str):
    """The ``open3d`` module, imported only by the steps that need it (``purpose`` says which); when it is not
    installed, a ConfigError in one line instead of an ImportError's traceback."""
    try:
        import open3d
    except ImportError as exc:
        raise ConfigError(f"{purpose} cannot run: Open3D is not installed here (pip install open3d; the other "
                          f"methods on a preprocessed dataset, m3dm.predict and the report run without it)") from exc
    return open3d



@contextmanager
def cpu_threads(count: int, device: torch.device | None = None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block, restored after it (also on an exception),
    for work on ``device`` (None: the CPU; nothing changes for a GPU). For loops of many small steps (FPS, the
    greedy coreset): each step split across threads waits for a descheduled thread on a busy machine, so they run
    on one thread."""
    if device is not None and device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(requested: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto``/None: ``cuda:<local rank>`` when GPUs are present, else the CPU. ``cuda`` without an index is the
    local rank's GPU too (under torchrun every process would otherwise share GPU 0). A CUDA device asked for on a
    machine without CUDA falls back to the CPU with a warning; any other device is taken as given. Changes no
    global state: a command line then calls ``use_device`` once."""
    if requested is None or str(requested) == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA is not available: running on the CPU")
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def use_device(device: torch.device) -> None:
    """Once per process, by the command line that chose ``device``: a CUDA device becomes the current one, so
    that pinned memory and the optional CUDA extensions (pointnet2_ops, KNN_CUDA launch on the current device)
    use it rather than GPU 0, and its float32 products stay float32 (``exact_float32_on_cuda``)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        exact_float32_on_cuda()


def exact_float32_on_cuda() -> None:
    """float32 products in float32 on the GPU: cuDNN convolutions default to TF32 (the ViT's patch embedding would
    drift ~1e-3 from the CPU, and PFA's expansion-form distances break). The faster paths ask for reduced
    precision explicitly (``--precision bf16``, the bfloat16-screened search with its float32 re-check)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # bfloat16 products summed in float32: what the screened search's error bound assumes
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


def seed_everything(seed: int) -> None:
    """As the reference does once per class (docs/original.md: Seeds): Python, NumPy's global generator and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a launch (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_processes(default_local_rank: int = 0, openmpi: bool = False) -> Processes | None:
    """Rank, world size and local rank set by a launcher (torchrun, ``torch.distributed.launch``; with
    ``openmpi`` also the OpenMPI variables), or None when the process was started on its own."""
    if openmpi:
        for ours, theirs in (("RANK", "OMPI_COMM_WORLD_RANK"), ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
                             ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")):
            if theirs in os.environ:
                os.environ.setdefault(ours, os.environ[theirs])
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return Processes(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                     int(os.environ.get("LOCAL_RANK", default_local_rank)))


def start_processes(cuda: bool, init_method: str = "env://", default_local_rank: int = 0,
                    openmpi: bool = False) -> Processes:
    """Join the default process group when a launcher started several processes: NCCL with ``cuda`` (after
    selecting the local GPU), gloo otherwise. Started on its own, or as a world of one, nothing is joined."""
    launched = launched_processes(default_local_rank, openmpi)
    if launched is None or launched.world <= 1:
        return launched or Processes(local_rank=max(default_local_rank, 0))

    if cuda:
        torch.cuda.set_device(launched.local_rank)
    if not dist.is_initialized():
        # a long timeout: a process that finished its classes waits in the gather for the others' last class
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method=init_method,
                                rank=launched.rank, world_size=launched.world, timeout=PROCESS_GROUP_TIMEOUT)
    return launched


def stop_processes() -> None:
    """Wait for every process, then leave the process group (nothing without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
