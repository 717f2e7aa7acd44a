"""Segmentation maps from per-patch distances: bilinear upsampling and the reference's blur (quirk 34)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

BLUR_SIGMA = 4.0  # KNNGaussianBlur always uses radius 4, whatever its argument
BLUR_MODES = ("pil", "float", "none")


def _pil_blur(score_map: torch.Tensor) -> torch.Tensor:
    """KNNGaussianBlur: 8-bit quantisation as ToPILImage, Pillow GaussianBlur(4), back ×max (quirk 34)."""
    peak = score_map.max()
    if not peak > 0:  # the reference divides by zero here (NaN map); distance maps are never negative
        return torch.zeros_like(score_map)
    # ToPILImage of a float tensor: ×255 in float32, then a uint8 cast that truncates
    scaled = (score_map / peak).mul(255).cpu().numpy()
    pixels = np.clip(scaled, 0, 255).astype(np.uint8)
    blurred = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=BLUR_SIGMA))
    return torch.from_numpy(np.asarray(blurred).copy()).to(score_map.device, torch.float32).div(255) * peak


def gaussian_kernel(sigma: float = BLUR_SIGMA, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian on ``[-r, r]``, ``r = int(truncate·sigma + 0.5)`` (scipy.ndimage's support)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _float_blur(score_map: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Float Gaussian blur (σ = 4, edge pixels repeated, like scipy's ``gaussian_filter(mode='nearest')``)."""
    kernel = gaussian_kernel(sigma).to(score_map.device, torch.float32)
    radius = kernel.numel() // 2
    image = score_map.to(torch.float32)[None, None]
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    image = F.conv2d(F.pad(image, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return image[0, 0]


def blur_map(score_map: torch.Tensor, mode: str = "pil") -> torch.Tensor:
    """Blur a ``(H, W)`` or ``(1, H, W)`` map; returns ``(1, H, W)`` float32.

    ``"pil"`` (COMPAT): the reference's 8-bit Pillow blur, output quantised to multiples of ``max/255``; an
    all-zero map gives zeros. ``"float"`` (fix): float Gaussian, σ = 4, support ±16, edges repeated.
    ``"none"``: no blur.
    """
    if mode not in BLUR_MODES:
        raise ValueError(f"blur mode must be one of {BLUR_MODES}, got {mode!r}")
    image = score_map.reshape(score_map.shape[-2:]).to(torch.float32)
    if mode == "pil":
        image = _pil_blur(image)
    elif mode == "float":
        image = _float_blur(image)
    return image.unsqueeze(0)


def segmentation_map(min_dist: torch.Tensor, grid: int, out_size: int = 224, blur: str = "pil") -> torch.Tensor:
    """Patch minima → ``grid × grid`` (row-major) → bilinear (align_corners=False) to ``out_size`` → blur."""
    if min_dist.numel() != grid * grid:
        raise ValueError(f"{min_dist.numel()} patch scores do not fill a {grid}x{grid} grid")
    grid_map = min_dist.to(torch.float32).reshape(1, 1, grid, grid)
    upsampled = F.interpolate(grid_map, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return blur_map(upsampled[0, 0], blur)
