"""What both dataset converters share: output-root rules, a parallel resumable job runner, the summary."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from m3dm.data.io import copy_file
from m3dm.errors import DiskFullError, M3DMError

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    name: str  # the sample, relative to the source root
    skipped: bool = False  # already done by an earlier run
    valid_points: int | None = None  # valid points in the written cloud
    clusters: int | None = None
    error: str | None = None  # one line
    traceback: str | None = None  # of the error, for the debug log (-v)


@dataclass
class Summary:
    source: Path
    output: Path
    processed: int = 0
    skipped: int = 0
    copied: int = 0
    seconds: float = 0.0
    empty: list[str] = field(default_factory=list)
    multi_cluster: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, result: JobResult) -> None:
        if result.error is not None:
            self.errors.append(f"{result.name}: {result.error}")
            if result.traceback:
                log.debug("%s failed:\n%s", result.name, result.traceback)
        elif result.skipped:
            self.skipped += 1
        else:
            self.processed += 1
            if result.valid_points == 0:
                self.empty.append(result.name)
            if result.clusters is not None and result.clusters > 1:
                self.multi_cluster.append(result.name)

    def report(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else float("nan")
        lines = [f"{self.source} -> {self.output}",
                 f"  samples written: {self.processed}, already done (skipped): {self.skipped}, "
                 f"other files copied: {self.copied}, errors: {len(self.errors)}",
                 f"  time: {self.seconds:.1f} s ({rate:.2f} samples/s)"]
        if self.multi_cluster:
            lines.append(f"  {len(self.multi_cluster)} sample(s) had more than one DBSCAN cluster "
                         f"(only the largest was kept)")
        if self.empty:
            lines.append(f"  WARNING: {len(self.empty)} sample(s) have an EMPTY point cloud after processing:")
            lines += [f"    {name}" for name in self.empty]
        if self.errors:
            lines.append("  ERRORS (these samples were not written):")
            lines += [f"    {e}" for e in self.errors]
        return "\n".join(lines)


def resolve_roots(source: str | Path, output: str | Path | None, inplace: bool) -> tuple[Path, Path]:
    """Check the source exists and return (source, output) as absolute paths.

    The default output is the sibling ``<source>_preprocessed``. Writing inside the source (or the source
    inside the output) is refused unless ``inplace`` is asked for explicitly.
    """
    source = Path(source).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: dataset root not found")
    if inplace:
        if output is not None and Path(output).resolve() != source:
            raise ValueError("--inplace writes into the source root; do not also give an output root")
        return source, source
    output = Path(output).resolve() if output is not None else source.with_name(source.name + "_preprocessed")
    if output == source:
        raise ValueError(f"output root {output} is the source root; pass --inplace if you really want to "
                         f"overwrite the source")
    if source in output.parents:
        raise ValueError(f"output root {output} is inside the source root {source}; choose a folder outside it")
    if output in source.parents:
        raise ValueError(f"source root {source} is inside the output root {output}; choose another output root")
    return source, output


def _call(job_and_fn):
    fn, job = job_and_fn
    try:
        return fn(job)
    except DiskFullError:
        raise  # no other sample can be written either: the run stops
    except Exception as exc:  # one bad sample must not stop the others
        return JobResult(name=getattr(job, "name", str(job)), error=one_line_error(exc),
                         traceback=traceback.format_exc())


def one_line_error(exc: BaseException) -> str:
    """The one line a summary shows for a sample's error: our own errors already name the file and say what is
    wrong; anything else is its type and the first line of its message (the traceback goes to the debug log)."""
    message = str(exc).strip()
    if isinstance(exc, M3DMError):
        return " ".join(line.strip() for line in message.splitlines())
    first = message.splitlines()[0] if message else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _outcome(future, job) -> JobResult:
    try:
        return future.result()
    except BrokenProcessPool:
        return JobResult(name=getattr(job, "name", str(job)),
                         error="a worker process died (killed, or out of memory?) before this sample was written; "
                               "run again to resume")


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # Ctrl-C reaches every process of the terminal: the main process alone stops the run (no worker traceback),
    # letting the samples being written finish
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_jobs(jobs: Sequence, fn: Callable, workers: int, desc: str, progress: bool = True) -> list[JobResult]:
    """Run ``fn(job)`` for every job on ``workers`` processes with a progress bar (none without ``progress``);
    exceptions become per-job errors. ``fn`` must be a module-level function and jobs picklable."""
    workers = max(1, min(workers, len(jobs)))
    bar = tqdm(total=len(jobs), desc=desc, unit="sample", disable=not progress)
    results = []
    try:
        if workers == 1:
            for job in jobs:
                results.append(_call((fn, job)))
                bar.update()
        else:
            _run_in_pool(jobs, fn, workers, bar, results)
    finally:  # closed before the command prints why it stopped (Ctrl-C, a full disk)
        bar.close()
    return results


def _run_in_pool(jobs: Sequence, fn: Callable, workers: int, bar: tqdm, results: list) -> None:
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: Open3D's OpenMP thread pool does not survive a fork reliably. An executor, not a Pool:
    # when a worker dies (killed, out of memory) its pending jobs fail instead of being waited for forever
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,))
    try:
        futures = {pool.submit(_call, (fn, job)): job for job in jobs}
        for future in as_completed(futures):
            results.append(_outcome(future, futures[future]))
            bar.update()
    finally:  # after Ctrl-C or a full disk: no new sample starts, those being written finish
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def copy_other_files(source: Path, output: Path, sample_files: set[Path]) -> int:
    """Copy every file that is not a sample file (calibration, licence, readme...) so the copy is complete;
    returns how many were copied (files already there are kept).

    Symlinked folders are followed (a dataset root often links its class folders to where they are stored), each
    real folder once, so a link back up the tree cannot loop. A class (a folder of samples) with no other file is
    logged as a warning: the copy may be incomplete (a class of MVTec 3D-AD has calibration/ and readme.txt).
    """
    copied = 0
    others: set[str] = set()  # classes with at least one file besides their samples
    for path in _files_under(source):
        if path in sample_files or path.name.startswith("."):
            continue
        relative = path.relative_to(source)
        others.add(relative.parts[0])
        target = output / relative
        if not target.exists():
            copy_file(path, target)
            copied += 1
    classes = {path.relative_to(source).parts[0] for path in sample_files}
    for name in sorted(classes - others):
        log.warning("%s: no file besides the samples to copy (calibration/, readme.txt): the output class has "
                    "only the samples", source / name)
    return copied


def _files_under(root: Path) -> list[Path]:
    """Every file under ``root``, in sorted order, following symlinked folders (each real folder once)."""
    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # reached again through a link: already listed (or a loop)
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort()
        files += [Path(folder, name) for name in names if os.path.isfile(os.path.join(folder, name))]
    return sorted(files)


def timed(summary: Summary, start: float) -> Summary:
    summary.seconds = time.perf_counter() - start
    return summary
