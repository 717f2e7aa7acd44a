"""Pictures of what the detector found: RGB | ground truth | heatmap overlay, with the image score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from m3dm.constants import IMAGENET_MEAN, IMAGENET_STD
from m3dm.data.io import atomic_path


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


def heat_overlay(rgb: np.ndarray, score_map: np.ndarray, vmin: float, vmax: float,
                 region: np.ndarray | None = None) -> np.ndarray:
    """The heatmap blended half and half over the RGB; ``region`` (boolean map) outlined in white."""
    heat = jet((score_map - vmin) / max(vmax - vmin, 1e-12))
    overlay = (0.5 * rgb + 0.5 * heat).astype(np.uint8)
    if region is not None:
        overlay[outline(region)] = 255
    return overlay


def mask_panel(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean mask as a white-on-black RGB image (all black when None)."""
    if mask is None:
        return np.zeros(shape, dtype=np.uint8)
    return np.repeat((mask > 0)[..., None] * np.uint8(255), 3, axis=2)


def compose(panels: list[np.ndarray], title: str) -> Image.Image:
    """Equal-sized RGB panels side by side under a one-line title."""
    height, width = panels[0].shape[:2]
    canvas = Image.new("RGB", (len(panels) * width, height + 18), "white")
    for i, panel in enumerate(panels):
        canvas.paste(Image.fromarray(panel), (i * width, 18))
    ImageDraw.Draw(canvas).text((4, 3), title, fill="black")
    return canvas


def prediction_panel(rgb: np.ndarray, gt: np.ndarray | None, score_map: np.ndarray, score: float,
                     vmin: float, vmax: float, region: np.ndarray | None = None, title: str = "") -> Image.Image:
    """Side-by-side RGB, GT mask (blank when None) and heatmap overlay, with the image score."""
    panels = [rgb, mask_panel(gt, rgb.shape), heat_overlay(rgb, score_map, vmin, vmax, region)]
    return compose(panels, f"{title}  image score {score:.5g}")


def save_panel(path: str | Path, panel: Image.Image) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        panel.save(tmp, format="PNG")
    return path
