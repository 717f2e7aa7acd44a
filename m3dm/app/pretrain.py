"""The ``m3dm-pretrain`` command (``fusion_pretrain.py``): UFF pretraining flags parsed once into settings.

The flags are the reference's (``m3dm.uff.pretrain.PretrainSettings``) plus -v/-q; a bad input (feature dumps,
a checkpoint to resume) is reported in one line with exit status 2, a non-finite loss with exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path

from m3dm.app.console import (
    EXIT_INTERRUPTED,
    Terminated,
    add_logging_flags,
    configure_logging,
    interrupted,
    is_main_process,
    raise_on_sigterm,
)
from m3dm.config import add_flags
from m3dm.errors import CheckpointError, DiskFullError, FeatureDumpError
from m3dm.uff import pretrain


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion_pretrain.py",
                                     description="UFF contrastive fusion pretraining on main.py --save_feature "
                                                 "dumps (single process, torchrun or torch.distributed.launch).")
    add_flags(parser, pretrain.PretrainSettings)
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="no pinned host memory")
    return add_logging_flags(parser, quiet_help="only warnings and errors")


def settings_from_argv(argv: list[str] | None = None) -> pretrain.PretrainSettings:
    """The settings of a command line (logging configured as its -v/-q ask)."""
    flags = build_parser().parse_args(argv)
    configure_logging(flags.verbose, flags.quiet)
    names = {f.name for f in dataclasses.fields(pretrain.PretrainSettings)}
    return pretrain.PretrainSettings(**{k: v for k, v in vars(flags).items() if k in names})


def train(argv: list[str] | None = None) -> Path | None:
    """Parse ``argv`` and train; returns the last checkpoint written (rank 0) or ``None``."""
    return pretrain.train(settings_from_argv(argv))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: clear one-line errors for bad inputs instead of tracebacks."""
    try:
        return _main(settings_from_argv(argv))
    finally:  # a SIGTERM while the interpreter shuts down just ends it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(settings: pretrain.PretrainSettings) -> int:
    kept = (f"the checkpoints written so far are kept in {settings.output_dir}; run the same command with --resume "
            f"{settings.output_dir}/checkpoint-<epoch>.pth to go on")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise_on_sigterm()  # torchrun stops the other processes with SIGTERM when one fails
    try:
        pretrain.train(settings)
    except (FeatureDumpError, CheckpointError, DiskFullError) as exc:
        print(f"fusion_pretrain.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted("fusion_pretrain.py", kept) if is_main_process() else EXIT_INTERRUPTED
    except (Terminated, RuntimeError) as exc:  # another process of the launch died: this one stops too
        if not isinstance(exc, Terminated) and not _lost_a_process(exc):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's SIGTERM may still come: this line is the last
        print(f"fusion_pretrain.py: process {os.environ.get('RANK', 0)} stopped: another process of the launch "
              f"ended (killed or failed); {kept}", file=sys.stderr)
        return 1
    except FloatingPointError as exc:  # the reference aborts on a non-finite loss as well
        print(f"fusion_pretrain.py: {exc}", file=sys.stderr)
        return 1
    return 0


def _lost_a_process(exc: RuntimeError) -> bool:
    """Whether ``exc`` came from a collective of the process group, as it does when another process of the launch
    died (NCCL: a DistBackendError; gloo: a RuntimeError naming its transport, 'Connection reset by peer', raised
    by a collective or by DDP's gradient hook inside the backward pass)."""
    import traceback

    from torch.distributed import DistError

    message = str(exc).lower()
    return isinstance(exc, DistError) or "gloo" in message or "nccl" in message or any(
        f"torch{os.sep}distributed{os.sep}" in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


if __name__ == "__main__":
    sys.exit(main())
