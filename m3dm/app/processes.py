"""Classes evaluated in parallel by several processes (``torchrun --nproc_per_node=N main.py ...``).

Each process fits and evaluates its share of the classes (class i goes to process i mod N) on its own device
(``cuda:<local rank>`` when GPUs are there), then the per-class results are gathered on every process and process
0 prints and writes the same tables as a single process would. Joining the process group and choosing the device
are ``m3dm.runtime``'s (``start_processes``, ``resolve_device``); without a launcher everything runs in one process.
"""

from __future__ import annotations

import torch.distributed as dist

from m3dm.runtime import Processes


def share(classes: list[str], processes: Processes) -> list[str]:
    """This process's classes: every ``world``-th, starting at its rank."""
    return classes[processes.rank::processes.world]


def gather(value, processes: Processes) -> list:
    """Every process's ``value``, in rank order, on every process."""
    if processes.world == 1:
        return [value]

    values = [None] * processes.world
    dist.all_gather_object(values, value)
    return values
