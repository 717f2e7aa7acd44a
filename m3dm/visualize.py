"""Pictures of what the detector found: RGB | ground truth | heatmap overlay, with the image score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .constants import IMAGENET_MEAN, IMAGENET_STD
from .data.io import atomic_path


def jet(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to the 'jet' colour map -> uint8 RGB."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def denormalize_rgb(rgb: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` ImageNet-normalised float -> ``(H, W, 3)`` uint8."""
    pixels = rgb.transpose(1, 2, 0) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels on the inner boundary of a boolean mask."""
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def prediction_panel(rgb: np.ndarray, gt: np.ndarray | None, score_map: np.ndarray, score: float,
                     vmin: float, vmax: float, region: np.ndarray | None = None, title: str = "") -> Image.Image:
    """Side-by-side RGB, GT mask (blank when None) and heatmap blended over the RGB. ``region`` (a boolean
    map, e.g. the thresholded anomaly region) is drawn as a white outline on the overlay."""
    heat = jet((score_map - vmin) / max(vmax - vmin, 1e-12))
    overlay = (0.5 * rgb + 0.5 * heat).astype(np.uint8)
    if region is not None:
        overlay[outline(region)] = 255
    gt_panel = np.zeros_like(rgb) if gt is None else np.repeat((gt > 0)[..., None] * 255, 3, 2).astype(np.uint8)
    height, width = rgb.shape[:2]
    canvas = Image.new("RGB", (3 * width, height + 18), "white")
    for i, panel in enumerate((rgb, gt_panel, overlay)):
        canvas.paste(Image.fromarray(panel), (i * width, 18))
    ImageDraw.Draw(canvas).text((4, 3), f"{title}  image score {score:.5g}", fill="black")
    return canvas


def save_panel(path: str | Path, panel: Image.Image) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        panel.save(tmp, format="PNG")
    return path
