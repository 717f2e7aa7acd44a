"""``main.py`` in this process, then what it cost written to ``<output_dir>/resources.json``: the run of one method
under ``m3dm.compare`` (one process per method, so each method's peak memory is its own)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from m3dm.app.cli import build_parser
from m3dm.app.cli import main as run_main
from m3dm.data.io import write_text
from m3dm.evaluation.comparison import RESOURCES_FILE


def peak_rss_bytes() -> int:
    """This process's peak resident memory, or its finished children's (data-loading workers) if larger."""
    peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return peak_kib * 1024  # Linux reports KiB


def peak_cuda_bytes() -> int | None:
    """The most CUDA memory torch allocated on any device here (None when CUDA was never used)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.argv[0] = "main.py"  # the name main.py's messages give themselves
    output_dir = Path(build_parser().parse_known_args(argv)[0].output_dir)
    start = time.perf_counter()
    try:
        status = run_main(argv)
    except SystemExit as exc:  # a parser error exits
        status = exc.code if isinstance(exc.code, int) else 2
    record = {"exit_status": status, "wall_s": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(),
              "peak_cuda_bytes": peak_cuda_bytes()}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text(output_dir / RESOURCES_FILE, json.dumps(record, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
