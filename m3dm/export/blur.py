"""The reference's 8-bit Pillow blur as integer matrix products, so that an exported graph gives Pillow's pixels.

``PIL.ImageFilter.GaussianBlur(4)`` on an 8-bit image is three passes of an "extended" box blur along the rows,
then three along the columns (Pillow's ``ImagingGaussianBlur``). One pass replaces pixel ``x`` of a line with
``(ww · Σ_{|o| ≤ r} p[x+o] + fw · (p[x-r-1] + p[x+r+1]) + 2^23) >> 24``, indices clamped to the line (edge pixels
repeated), where ``r`` is the integer part of the box radius that gives the Gaussian's variance and ``ww``/``fw``
its 24-bit fixed-point weights. Every pass is linear in the line up to that rounding, so one pass over a whole
image is an int64 product with a banded ``(L, L)`` matrix; the values stay below 2^33, exact in int64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from m3dm.memory.maps import BLUR_SIGMA

PASSES = 3  # Pillow's GaussianBlur: three box passes per axis
FIXED_POINT_BITS = 24


def box_radius(sigma: float = BLUR_SIGMA, passes: int = PASSES) -> float:
    """Pillow's ``_gaussian_blur_radius``: the extended box radius whose ``passes`` repeats have variance σ²."""
    sigma2 = sigma * sigma / passes
    length = math.sqrt(12.0 * sigma2 + 1.0)
    whole = math.floor((length - 1.0) / 2.0)
    extra = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
    extra /= 6 * (sigma2 - (whole + 1) * (whole + 1))
    return whole + extra


def box_pass_matrix(length: int, sigma: float = BLUR_SIGMA) -> Tensor:
    """``(length, length)`` int64 matrix ``B`` of one pass: ``line @ B.T`` is the pass before its rounding shift."""
    radius = box_radius(sigma)
    whole = int(radius)
    # float32 arithmetic, as Pillow computes the weights from its float radius
    inner = int((1 << FIXED_POINT_BITS) / torch.tensor(radius * 2 + 1, dtype=torch.float32).item())
    far = ((1 << FIXED_POINT_BITS) - (whole * 2 + 1) * inner) // 2
    matrix = torch.zeros(length, length, dtype=torch.int64)
    rows = torch.arange(length)
    for offset in range(-whole - 1, whole + 2):
        weight = far if abs(offset) == whole + 1 else inner
        cols = (rows + offset).clamp(0, length - 1)
        matrix.index_put_((rows, cols), torch.full((length,), weight, dtype=torch.int64), accumulate=True)
    return matrix


def pillow_gaussian_blur(pixels: Tensor, row_pass: Tensor, col_pass: Tensor) -> Tensor:
    """``(..., H, W)`` int64 pixels in 0..255 -> Pillow's ``GaussianBlur(4)`` of them (int64), given the pass
    matrices of the row length (``box_pass_matrix(W)``) and of the column length (``box_pass_matrix(H)``)."""
    half = 1 << (FIXED_POINT_BITS - 1)
    for _ in range(PASSES):
        pixels = torch.div(torch.matmul(pixels, row_pass.T) + half, 1 << FIXED_POINT_BITS, rounding_mode="floor")
    for _ in range(PASSES):
        pixels = torch.div(torch.matmul(col_pass, pixels) + half, 1 << FIXED_POINT_BITS, rounding_mode="floor")
    return pixels


def quantised_blur(score_map: Tensor, row_pass: Tensor, col_pass: Tensor) -> Tensor:
    """``m3dm.memory.maps`` "pil" blur of ``(B, H, W)`` float32 maps: ×255/max, truncated to 8 bits, Pillow's blur,
    back ×max/255; a map whose maximum is not positive gives zeros (as there)."""
    peak = score_map.amax(dim=(-2, -1), keepdim=True)
    positive = peak > 0
    safe_peak = torch.where(positive, peak, torch.ones_like(peak))
    scaled = (score_map / safe_peak).mul(255).clamp(0, 255)
    blurred = pillow_gaussian_blur(scaled.to(torch.int64), row_pass, col_pass)
    out = blurred.to(torch.float32).div(255) * peak
    return torch.where(positive, out, torch.zeros_like(out))
