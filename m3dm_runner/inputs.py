"""Reading a preprocessed part (``rgb/<stem>.png`` with ``xyz/<stem>.tiff``) into the arrays an exported model
takes, as ``m3dm.data.transforms`` builds them: RGB bicubic to 224², ImageNet-normalised; the organized cloud
resized to ``img_size``² by PyTorch's legacy nearest rule (source index ``floor(i · in / out)``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

RGB_SIZE = 224
IMAGENET_MEAN = np.asarray((0.485, 0.456, 0.406), dtype=np.float32)
IMAGENET_STD = np.asarray((0.229, 0.224, 0.225), dtype=np.float32)


class PartError(ValueError):
    """A part that cannot be scored (unreadable, unpaired or empty files); the message names the file."""


@dataclass(frozen=True)
class PartFiles:
    name: str
    rgb: Path
    xyz: Path


def rgb_array(image: Image.Image) -> np.ndarray:
    """PIL image -> ``(3, 224, 224)`` float32, ImageNet-normalised (``m3dm.data.transforms.rgb_to_tensor``)."""
    resized = image.convert("RGB").resize((RGB_SIZE, RGB_SIZE), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) / np.float32(255)
    return np.ascontiguousarray(((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))


def cloud_array(cloud: np.ndarray, size: int) -> np.ndarray:
    """``(H, W, 3)`` cloud -> ``(3, size, size)`` float32 by the legacy nearest rule of ``F.interpolate``."""
    height, width = cloud.shape[:2]
    rows = np.minimum((np.arange(size) * (height / size)).astype(np.int64), height - 1)
    cols = np.minimum((np.arange(size) * (width / size)).astype(np.int64), width - 1)
    return np.ascontiguousarray(cloud[rows][:, cols].transpose(2, 0, 1), dtype=np.float32)


def read_cloud(path: Path) -> np.ndarray:
    try:
        cloud = tifffile.imread(path)
    except Exception as exc:  # tifffile raises several types for corrupt files
        raise PartError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {exc})") from exc
    if cloud.ndim != 3 or cloud.shape[2] != 3 or not np.issubdtype(cloud.dtype, np.floating):
        raise PartError(f"{path}: expected an organized point cloud (H, W, 3) of floats, got {cloud.shape} "
                        f"{cloud.dtype}")
    cloud = cloud.astype(np.float32)
    if not np.isfinite(cloud).all():
        raise PartError(f"{path}: holds NaN or infinite coordinates")
    return cloud


def read_part(part: PartFiles, img_size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb (3, 224, 224), cloud (3, img_size, img_size))`` of a preprocessed part."""
    try:
        image = Image.open(part.rgb)
        image.load()
    except (OSError, ValueError) as exc:
        raise PartError(f"{part.rgb}: not a readable image ({exc})") from exc
    cloud = read_cloud(part.xyz)
    if image.size != (cloud.shape[1], cloud.shape[0]):
        raise PartError(f"{part.rgb}: {image.size[0]}x{image.size[1]} pixels, but {part.xyz} is "
                        f"{cloud.shape[1]}x{cloud.shape[0]}")
    return rgb_array(image), cloud_array(cloud, img_size)


def find_parts(folder: Path) -> list[PartFiles]:
    """The parts under ``folder``: ``{rgb,xyz}`` or ``<defect>/{rgb,xyz}`` folders, paired by stem, sorted; named
    as ``m3dm.predict`` names them: ``<folder>/<stem>`` or ``<folder>/<defect>/<stem>``."""
    label = folder.resolve().name
    if (folder / "rgb").is_dir():
        groups = [(folder, label)]
    else:
        groups = [(sub, f"{label}/{sub.name}") for sub in sorted(folder.iterdir())
                  if not sub.name.startswith(".") and (sub / "rgb").is_dir()]
    if not groups:
        raise PartError(f"{folder}: no parts found (expected {folder}/rgb/*.png with {folder}/xyz/*.tiff, or "
                        f"<defect>/rgb + <defect>/xyz below it)")
    parts = []
    for group, prefix in groups:
        for rgb in sorted((group / "rgb").glob("*.png")):
            parts.append(PartFiles(f"{prefix}/{rgb.stem}", rgb, group / "xyz" / f"{rgb.stem}.tiff"))
    return parts
