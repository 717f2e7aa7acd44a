"""Reading and writing the on-disk formats, with validation that names the file and what is wrong.

Writes are atomic: the data goes to a temporary file in the destination folder, which is then renamed over
the destination, so an interrupted run never leaves a half-written file behind. Every writer of the package goes
through ``atomic_path`` (whole files) or ``disk_writes`` (files that grow: rows as parts finish, a spool file),
which turn a full disk into one ``DiskFullError`` naming the file, whatever the library that wrote it raised.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from m3dm.errors import DataError, DiskFullError

# a failed write with less free space than this in its folder failed because the disk is full (torch.save and
# tifffile report it without errno: 'unexpected pos', '30000 requested and 22456 written')
FULL_BELOW_BYTES = 1 << 20


def read_organized_pc(path: str | os.PathLike) -> np.ndarray:
    """Read an organized point cloud TIFF as an ``(H, W, 3)`` float32 array.

    Zero rows mean "no measurement". A float64 (or float16) file is converted to float32, the dtype of MVTec
    3D-AD's clouds, so that a point is valid exactly when it would be in a float32 file of the same values (a
    coordinate too small for float32 becomes 0 there too) and every later step computes as for that file.
    Raises DataError for unreadable files, wrong shape or dtype, and non-finite coordinates (also after the
    conversion: values beyond float32's range).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: point cloud file not found")
    try:
        cloud = tifffile.imread(path)
    except Exception as exc:  # tifffile raises several exception types for corrupt files
        raise DataError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {exc})") from exc
    if cloud.ndim != 3 or cloud.shape[2] != 3:
        raise DataError(f"{path}: expected an organized point cloud of shape (H, W, 3), got {cloud.shape}")
    if not np.issubdtype(cloud.dtype, np.floating):
        raise DataError(f"{path}: expected float coordinates, got dtype {cloud.dtype}")
    _check_finite(cloud, path, "hold NaN or infinite coordinates")
    if cloud.dtype != np.float32:
        with np.errstate(over="ignore"):
            cloud = cloud.astype(np.float32)
        _check_finite(cloud, path, "hold coordinates beyond the float32 range (about 3.4e38)")
    return cloud


def _check_finite(cloud: np.ndarray, path: Path, what: str) -> None:
    if not np.isfinite(cloud).all():
        bad = int((~np.isfinite(cloud)).any(axis=2).sum())
        raise DataError(f"{path}: {bad} pixels {what}")


def open_image(path: str | os.PathLike, kind: str = "image") -> Image.Image:
    """Open and fully decode an image file (its own mode kept); a missing, truncated or otherwise unreadable file
    is a DataError naming it (``kind`` says what the file is for)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {kind} file not found")
    try:
        image = Image.open(path)
        image.load()
    except Exception as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    return image


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an RGB image (any mode PIL understands) and convert it to 3-channel RGB."""
    return open_image(path, "RGB image").convert("RGB")


def read_mask(path: str | os.PathLike) -> Image.Image:
    """Open a ground-truth mask and convert it to 8-bit grey ('L'), as the reference does."""
    return open_image(path, "ground-truth mask").convert("L")


def check_same_size(cloud: np.ndarray, image: Image.Image, cloud_path, image_path) -> None:
    """Raise DataError when an organized cloud and its image do not have the same pixel grid."""
    if cloud.shape[:2] != (image.height, image.width):
        raise DataError(
            f"{image_path}: image is {image.width}x{image.height} (WxH) but its point cloud {cloud_path} "
            f"is {cloud.shape[1]}x{cloud.shape[0]}"
        )


@contextmanager
def atomic_path(destination: str | os.PathLike):
    """Yield a temporary path next to ``destination``; on success rename it over the destination.

    The file gets the permissions a plain ``open(..., "w")`` would give it (``0o666`` less the umask), not the
    private ``0o600`` of a temporary file, so other users of a shared dataset or results folder can read it.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp" + destination.suffix,
                               dir=destination.parent)
    os.close(fd)
    try:
        with disk_writes(destination):
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_current_umask())
            os.replace(tmp, destination)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def disk_writes(path: str | os.PathLike):
    """Writes to ``path`` (a file or the folder of an anonymous one): a failure because its disk or the user's
    quota is full becomes a ``DiskFullError`` naming ``path``; any other error passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not disk_is_full(exc, Path(path)):
            raise
        raise DiskFullError(f"{path}: cannot write, the disk is full (no space left on device): free some space "
                            f"and run again") from exc


def disk_is_full(exc: BaseException, path: Path) -> bool:
    """Whether ``exc``, raised while writing ``path``, means that there is no space left for it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    folder = path if path.is_dir() else path.parent
    try:  # measured before the temporary file is deleted: it holds what could be written
        return shutil.disk_usage(folder).free < FULL_BELOW_BYTES
    except OSError:
        return False


def append_text(handle, text: str, path: str | os.PathLike) -> None:
    """Append ``text`` to a file opened in binary append mode without buffering (``open(path, "ab",
    buffering=0)``), whole or not at all: a failed write is cut off again, so that the file ends at its last
    complete row. A full disk is a ``DiskFullError`` naming ``path``."""
    data = memoryview(text.encode())
    start = handle.seek(0, os.SEEK_END)
    with disk_writes(path):
        try:
            while data:
                data = data[handle.write(data):]
        except BaseException:
            os.ftruncate(handle.fileno(), start)
            raise


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def remove_stale_temporaries(root: str | os.PathLike) -> int:
    """Delete temporary files left by an interrupted atomic write under ``root``; returns how many."""
    stale = [p for p in Path(root).rglob(".*.tmp*") if p.is_file()] if Path(root).is_dir() else []
    for path in stale:
        path.unlink()
    return len(stale)


def write_tiff(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as an uncompressed TIFF, atomically. ``(H, W, 3)`` clouds are stored as MVTec 3D-AD
    stores them: one page, photometric RGB, contiguous samples."""
    rgb_like = getattr(array, "ndim", 0) == 3 and array.shape[2] == 3
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, photometric="rgb" if rgb_like else None)


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array, or a uint16 (H, W) array, as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def copy_file(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy a file byte for byte, atomically."""
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)
