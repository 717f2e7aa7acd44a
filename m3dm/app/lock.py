"""One run at a time per output folder: ``<folder>/.m3dm.lock`` names the process that writes there.

A second run into the same folder is refused while the first one lives (two runs would each exit 0 and the last
would overwrite the other's results). A lock left by a process that no longer runs (killed, machine restarted) is
taken over, so a crash never blocks the folder.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from m3dm.errors import OutputInUseError

log = logging.getLogger(__name__)

LOCK_NAME = ".m3dm.lock"


@contextmanager
def output_lock(folder: str | Path, flag: str):
    """Hold ``folder``'s lock while the block runs (OutputInUseError naming the holder when another live process
    holds it). A folder that cannot be made is left to the command's own check, which names the problem."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if the run leaves them empty
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield
        return
    path = folder / LOCK_NAME
    _take(path, folder, flag)
    try:
        yield
    finally:
        if _holder(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        for empty in made:  # a run refused before it wrote anything leaves no folder behind
            try:
                empty.rmdir()
            except OSError:
                break


def _take(path: Path, folder: Path, flag: str) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    for _ in range(3):  # a stale lock is removed and the creation tried again
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if _alive(holder, path):
                raise OutputInUseError(
                    f"{flag} {folder} is in use by process {holder.get('pid')} on {holder.get('host')} (started "
                    f"{holder.get('started')}: {holder.get('command')}): wait for it to end, or give another "
                    f"{flag}") from None
            log.info("%s: taking over the lock of process %s, which no longer runs", folder, holder.get("pid"))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(record) + "\n")
        return
    raise OutputInUseError(f"{flag} {folder}: could not take its lock {path}: give another {flag}")


def _holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # being written this instant, or damaged: judged by its age below
    return holder if isinstance(holder, dict) else {}


def _alive(holder: dict, path: Path) -> bool:
    """Whether the process of a lock record still runs (on another host: assumed so). An unreadable record is
    one being written this instant, unless it is older than a few seconds (its writer was killed)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        try:
            return time.time() - path.stat().st_mtime < 5
        except OSError:
            return False
    if holder.get("host") not in (None, socket.gethostname()):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
