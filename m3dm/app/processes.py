"""Classes evaluated in parallel by several processes (``torchrun --nproc_per_node=N main.py ...``).

Each process fits and evaluates its share of the classes (class i goes to process i mod N) on its own device
(``cuda:<local rank>`` when GPUs are there), then the per-class results are gathered on process 0, which prints
and writes the same tables as a single process would. Without a launcher everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Workers:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, classes: list[str]) -> list[str]:
        return classes[self.rank::self.world]


def start() -> Workers:
    """Join the process group when a launcher set ``RANK``/``WORLD_SIZE`` (results travel over gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Workers()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return Workers(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(requested: str, workers: Workers) -> str:
    """``auto``: ``cuda:<local rank>`` with GPUs, else ``cpu``; an explicit device is taken as given."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return f"cuda:{workers.local_rank % torch.cuda.device_count()}"
    return "cpu"


def gather(value, workers: Workers) -> list:
    """Every process's ``value``, in rank order, on every process."""
    if workers.world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * workers.world
    dist.all_gather_object(values, value)
    return values


def finish(workers: Workers) -> None:
    if workers.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
