"""A full disk is one DiskFullError naming the file, whatever library wrote it, and leaves nothing half-written:
``atomic_path`` and ``append_text`` on a real, small tmpfs."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from m3dm.data.io import append_text, atomic_path, write_text, write_tiff
from m3dm.errors import DiskFullError


@pytest.fixture
def disk(tmp_path):
    """A 64 KiB tmpfs (needs root on Linux; skipped, saying so, elsewhere)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small file system cannot be mounted here ({mounted.stderr.strip() or 'mount failed'})")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("writer", ["tiff", "torch", "text"])
def test_a_full_disk_is_one_error_naming_the_file_and_the_earlier_file_stays(disk, writer):
    path = disk / f"file.{writer}"
    path.write_text("earlier")
    big = np.ones((120, 120, 3), np.float32)  # 170 KB: more than the disk holds
    with pytest.raises(DiskFullError) as raised:
        if writer == "tiff":  # tifffile: OSError('30000 requested and 22456 written'), no errno
            write_tiff(path, big)
        elif writer == "torch":  # torch.save: RuntimeError('... unexpected pos ...'), no errno
            with atomic_path(path) as tmp:
                torch.save(torch.from_numpy(big), tmp)
        else:
            write_text(path, "x" * 200_000)
    assert str(raised.value) == (f"{path}: cannot write, the disk is full (no space left on device): free some "
                                 f"space and run again")
    assert isinstance(raised.value, OSError)
    assert sorted(p.name for p in disk.iterdir()) == [path.name]  # no temporary left
    assert path.read_text() == "earlier"


def test_an_appended_row_is_written_whole_or_not_at_all(disk):
    path = disk / "rows.csv"
    with open(path, "wb", buffering=0) as handle:
        append_text(handle, "a,b\n", path)
        with pytest.raises(DiskFullError, match=r"rows\.csv: cannot write, the disk is full"):
            append_text(handle, "x" * 100_000 + "\n", path)
        append_text(handle, "c,d\n", path)  # once space is back, rows go on after the last whole one
    assert path.read_text() == "a,b\nc,d\n"


def test_other_errors_pass_unchanged(tmp_path):
    with pytest.raises(ValueError, match="not about space"), atomic_path(tmp_path / "x") as tmp:
        tmp.write_text("partial")
        raise ValueError("not about space")
    assert list(tmp_path.iterdir()) == []
