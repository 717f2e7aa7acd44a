"""Blur and segmentation maps against direct Pillow and SciPy calls and a NumPy bilinear resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter

from m3dm.memory.maps import blur_map, segmentation_map


def random_map(seed: int, size: int = 224) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = gaussian_filter(rng.random((size, size)), 6) * 10
    return (smooth + rng.random((size, size))).astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_pil_blur_equals_a_direct_pillow_call(seed):
    score_map = random_map(seed)
    peak = score_map.max()
    pixels = np.floor(score_map / peak * np.float32(255)).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(pixels, "L").filter(ImageFilter.GaussianBlur(4)), dtype=np.float32)
    got = blur_map(torch.from_numpy(score_map)[None])
    assert got.shape == (1, 224, 224) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].numpy(), blurred / 255 * peak, rtol=1e-6)
    levels = got[0].numpy() / (peak / 255)
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # quantised to multiples of max/255


def test_pil_blur_of_a_zero_map_is_zero():
    assert torch.equal(blur_map(torch.zeros(224, 224)), torch.zeros(1, 224, 224))


def test_float_blur_close_to_scipy():
    score_map = random_map(4, size=100)
    expected = gaussian_filter(score_map.astype(np.float64), sigma=4, mode="nearest")
    got = blur_map(torch.from_numpy(score_map), mode="float")
    assert got.shape == (1, 100, 100)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        blur_map(torch.zeros(4, 4), mode="box")


def numpy_bilinear(grid_map: np.ndarray, out: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize (align_corners=False), coordinates clamped at the borders."""
    size = grid_map.shape[0]
    src = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0)
    lo = np.minimum(np.floor(src).astype(int), size - 1)
    hi = np.minimum(lo + 1, size - 1)
    frac = src - lo
    rows = grid_map[lo] * (1 - frac)[:, None] + grid_map[hi] * frac[:, None]
    return rows[:, lo] * (1 - frac) + rows[:, hi] * frac


def test_segmentation_map_upsamples_row_major_then_blurs():
    rng = np.random.default_rng(5)
    minima = rng.random(28 * 28).astype(np.float32) * 3
    expected = numpy_bilinear(minima.reshape(28, 28).astype(np.float64), 224)
    plain = segmentation_map(torch.from_numpy(minima), 28, blur="none")
    assert plain.shape == (1, 224, 224)
    np.testing.assert_allclose(plain[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    blurred = segmentation_map(torch.from_numpy(minima), 28)
    assert torch.equal(blurred, blur_map(plain))
    with pytest.raises(ValueError):
        segmentation_map(torch.zeros(10), 3)
