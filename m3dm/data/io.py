"""Reading and writing the on-disk formats, with validation that names the file and what is wrong.

Writes are atomic: the data goes to a temporary file in the destination folder, which is then renamed over
the destination, so an interrupted run never leaves a half-written file behind. Every writer of the package goes
through ``atomic_path`` (whole files) or ``disk_writes`` (files that grow: rows as parts finish, a spool file),
which turn a full disk into one ``DiskFullError`` naming the file, whatever the library that wrote it raised.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from m3dm.errors import DataError, DiskFullError

# a failed write with less free space than this in its folder failed because the disk is full (torch.save and
# tifffile report it without errno: 'unexpected pos', '30000 requested and 22456 written')
FULL_BELOW_BYTES = 1 << 20


class _TiffFileMessages(logging.Filter):
    """tifffile logs what it finds wrong in a file (e.g. "invalid offset to first page" in a truncated one) to
    stderr; while one of our readers reads a file, on its thread, the messages are kept for its error instead."""

    def __init__(self):
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        caught = getattr(self.local, "caught", None)
        if caught is None:
            return True
        caught.append(re.sub(r"^<[^>]*> ", "", record.getMessage()))  # without tifffile's "<TiffPages @...>"
        return False

    @contextmanager
    def caught(self):
        self.local.caught = []
        try:
            yield self.local.caught
        finally:
            self.local.caught = None


_TIFF_MESSAGES = _TiffFileMessages()
logging.getLogger("tifffile").addFilter(_TIFF_MESSAGES)


def read_tiff(path: Path, header_only: bool = False) -> tuple[np.ndarray | None, tuple[int, ...], np.dtype]:
    """``(array or None with header_only, shape, dtype)`` of a TIFF file's first image; a truncated or otherwise
    unreadable file is a DataError naming it (what tifffile says about it in the message, not on stderr)."""
    with _TIFF_MESSAGES.caught() as messages:
        try:
            with tifffile.TiffFile(path) as tiff:
                if not tiff.series:
                    said = f": {messages[0]}" if messages else ""
                    raise DataError(f"{path}: not a readable TIFF file (truncated? no image found{said})")
                array = None if header_only else tiff.series[0].asarray()
                return array, tuple(tiff.series[0].shape), tiff.series[0].dtype
        except DataError:
            raise
        except Exception as exc:  # tifffile raises several exception types for corrupt files
            raise DataError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {exc})") from exc


def read_organized_pc(path: str | os.PathLike) -> np.ndarray:
    """Read an organized point cloud TIFF as an ``(H, W, 3)`` float32 array.

    Zero rows mean "no measurement". A float64 (or float16) file is converted to float32, the dtype of MVTec
    3D-AD's clouds, so that a point is valid exactly when it would be in a float32 file of the same values (a
    coordinate too small for float32 becomes 0 there too) and every later step computes as for that file.
    Raises DataError for unreadable (e.g. truncated) files, wrong shape or dtype, and non-finite coordinates
    (also after the conversion: values beyond float32's range).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: point cloud file not found")
    cloud = read_tiff(path)[0]
    assert cloud is not None  # read_tiff returns the array unless asked for the header only
    if cloud.ndim != 3 or cloud.shape[2] != 3:
        raise DataError(f"{path}: expected an organized point cloud of shape (H, W, 3), got {cloud.shape}")
    if not np.issubdtype(cloud.dtype, np.floating):
        raise DataError(f"{path}: expected float coordinates, got dtype {cloud.dtype}")
    _check_finite(cloud, path, "hold NaN or infinite coordinates")
    if cloud.dtype != np.float32:
        with np.errstate(over="ignore"):
            cloud = cloud.astype(np.float32)
        _check_finite(cloud, path, "hold coordinates beyond the float32 range (about 3.4e38)")
    huge = huge_pixels(cloud)
    if huge:
        raise DataError(f"{path}: {huge} {HUGE_COORDINATES}")
    return cloud


# The largest coordinate magnitude whose squared point distances (three coordinates, differences up to twice the
# magnitude) stay below float32's maximum, 3.4e38.
MAX_COORDINATE = 1e18
HUGE_COORDINATES = (f"pixels hold coordinates beyond ±{MAX_COORDINATE:g}, whose squared distances overflow float32 "
                    f"(MVTec 3D-AD's are in metres)")


def huge_pixels(cloud: np.ndarray) -> int:
    """How many pixels of an ``(H, W, 3)`` cloud hold a finite coordinate beyond ±MAX_COORDINATE."""
    with np.errstate(invalid="ignore"):
        return int((np.abs(cloud) > MAX_COORDINATE).any(axis=2).sum())


# Raw MVTec 3D-AD scans still hold the table the part lies on: the preprocessing fits that background plane to the
# points of the outer BORDER_BAND rows and columns and removes it, so a preprocessed scan has (about) no point
# there. Real raw scans hold a point in 49-63 % of the band's pixels (the cable_gland samples), preprocessed ones
# in none.
BORDER_BAND = 10
RAW_BORDER_SHARE = 0.25
PREPROCESSED_BORDER_SHARE = 0.01
UNPREPROCESSED = ("looks unpreprocessed: {share:.0%} of its {band}-pixel border holds points (the background plane "
                  "the MVTec 3D-AD preprocessing removes; preprocessed scans hold about none there)")
PREPROCESS_HOW = "python utils/preprocessing.py <dataset root> writes a preprocessed copy (docs/original.md)"


def border_band_share(cloud: np.ndarray, band: int = BORDER_BAND) -> float:
    """Share of the pixels of an ``(H, W, 3)`` cloud's outer ``band`` rows and columns that hold a point (a point
    is a pixel without a zero coordinate)."""
    valid = (cloud != 0).all(axis=2)
    border = np.ones(valid.shape, bool)
    border[band:-band, band:-band] = False
    return float(valid[border].mean()) if border.any() else 0.0


def unpreprocessed_problem(cloud: np.ndarray) -> str | None:
    """What to say about a cloud that looks like a raw MVTec 3D-AD scan (None when it does not)."""
    share = border_band_share(cloud)
    return UNPREPROCESSED.format(share=share, band=BORDER_BAND) if share > RAW_BORDER_SHARE else None


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


SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")


def _sixteen_bit_grey(image: Image.Image) -> bool:
    """16-bit grey pixels: PIL's I;16 modes, or mode I read from a PNG (PNG has no 32-bit grey)."""
    return image.mode in SIXTEEN_BIT_GREY or (image.mode == "I" and image.format == "PNG")


def unsupported_image_mode(image: Image.Image) -> str | None:
    """Why an image's pixels cannot be read as an RGB image or a mask (None when they can): 32-bit integer or
    float pixels have no agreed 8-bit scale; 16-bit grey, 8-bit grey, palette, RGB and RGBA pixels are read."""
    if image.mode in ("I", "F") and not _sixteen_bit_grey(image):
        depth = "32-bit float" if image.mode == "F" else "32-bit integer"
        return (f"{depth} pixels (PIL mode {image.mode}) are not supported: save it as an 8- or 16-bit PNG "
                f"(grey, RGB or RGBA)")
    return None


def to_rgb(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """8-bit RGB pixels of an opened image: 16-bit grey is scaled to 8 bits (the high byte, as PIL reads a
    16-bit colour PNG), any other mode is converted by PIL as the reference does (an alpha channel dropped).
    An 8-bit RGB image is returned as it is. A mode that cannot be read is a DataError naming ``path``."""
    problem = unsupported_image_mode(image)
    if problem:
        raise DataError(f"{path}: {problem}")
    if _sixteen_bit_grey(image):
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), "L")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as exc:  # modes PIL cannot convert (LAB, HSV, ...)
        raise DataError(f"{path}: PIL mode {image.mode} cannot be read as RGB: save it as an 8- or 16-bit PNG "
                        f"(grey, RGB or RGBA)") from exc


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as 8-bit RGB (``to_rgb``: 8- or 16-bit grey, palette, RGB, RGBA, ...)."""
    return to_rgb(open_image(path, "RGB image"), path)


def defect_pixels(mask: Image.Image, path: str | os.PathLike) -> np.ndarray:
    """The (H, W) bool defect pixels of a ground-truth mask: a pixel is defective when it is non-zero (its grey
    value, 8 or 16 bit, or any of its colour channels; an alpha channel is ignored)."""
    problem = unsupported_image_mode(mask)
    if problem:
        raise DataError(f"{path}: {problem}")
    if mask.mode in ("1", "L", "I", "F", *SIXTEEN_BIT_GREY):
        return np.asarray(mask) != 0
    if mask.mode in ("LA", "La"):
        return np.asarray(mask.getchannel(0)) != 0
    return np.asarray(np.asarray(to_rgb(mask, path)).any(axis=2))


def read_mask(path: str | os.PathLike) -> Image.Image:
    """Open a ground-truth mask as 8-bit grey ('L') of 0 (good) and 255 (defect), defect where the file is
    non-zero (``defect_pixels``). On masks of 0 and 128..255 this is the reference's rule (grey value above 127)."""
    defects = defect_pixels(open_image(path, "ground-truth mask"), path)
    return Image.fromarray(np.where(defects, np.uint8(255), np.uint8(0)), "L")


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
