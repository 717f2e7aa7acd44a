"""G2SF's pseudo-anomalies against the reference's formulation written out here: Perlin noise, component filter,
masks, image blending, point displacement, shifted pastes; same seed, same sample."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from m3dm.data import pseudo_anomaly as pa
from m3dm.data.layout import Sample


def reference_perlin_value(i: int, j: int, shape, periods, angles) -> float:
    """One pixel of ``rand_perlin_2d_np``, computed on its own: the cell, its four corner gradients, the dot
    products with the offsets, the quintic fade and two linear interpolations."""
    x, y = i * periods[0] / shape[0], j * periods[1] / shape[1]
    cx, cy = int(x), int(y)
    fx, fy = x - cx, y - cy

    def dot(ci, cj, ox, oy):
        angle = angles[ci, cj]
        return ox * math.cos(angle) + oy * math.sin(angle)

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    n00, n10 = dot(cx, cy, fx, fy), dot(cx + 1, cy, fx - 1, fy)
    n01, n11 = dot(cx, cy + 1, fx, fy - 1), dot(cx + 1, cy + 1, fx - 1, fy - 1)
    top = n00 + fade(fx) * (n10 - n00)
    bottom = n01 + fade(fx) * (n11 - n01)
    return math.sqrt(2) * (top + fade(fy) * (bottom - top))


@pytest.mark.parametrize("periods", [(1, 1), (4, 2), (16, 8)])
def test_perlin_noise_is_the_reference_formula_and_seeded(periods):
    shape = (64, 64)
    noise = pa.perlin_noise(shape, periods, np.random.default_rng(3))
    angles = 2 * math.pi * np.random.default_rng(3).random((periods[0] + 1, periods[1] + 1))
    for i, j in [(0, 0), (5, 17), (31, 40), (63, 63), (17, 2)]:
        assert noise[i, j] == pytest.approx(reference_perlin_value(i, j, shape, periods, angles), abs=1e-12)
    assert np.array_equal(noise, pa.perlin_noise(shape, periods, np.random.default_rng(3)))
    assert not np.array_equal(noise, pa.perlin_noise(shape, periods, np.random.default_rng(4)))
    lattice = noise[:: shape[0] // periods[0], :: shape[1] // periods[1]]
    assert np.abs(lattice).max() < 1e-12  # Perlin noise vanishes at the lattice points


def test_keep_components_keeps_100_to_1600_pixels_and_skips_the_last():
    mask = np.zeros((120, 120), bool)
    mask[0:5, 0:10] = True  # 50 px: too small
    mask[10:20, 0:15] = True  # 150 px: kept
    mask[30:80, 0:40] = True  # 2000 px: too large
    mask[100:110, 100:120] = True  # 200 px, the last component: the reference never keeps it
    kept = pa.keep_components(mask, skip_last=True)
    assert kept.sum() == 150 and kept[10:20, 0:15].all()
    fixed = pa.keep_components(mask, skip_last=False)
    assert fixed.sum() == 350 and fixed[100:110, 100:120].all()


def test_resize_nearest_takes_the_floor_of_the_scaled_index():
    mask = np.arange(10 * 6).reshape(10, 6)
    out = pa.resize_nearest(mask, (4, 3))
    expected = np.array([[mask[(r * 10) // 4, (c * 6) // 3] for c in range(3)] for r in range(4)])
    assert np.array_equal(out, expected)


def disk(size: int, radius: float) -> np.ndarray:
    ys, xs = np.mgrid[:size, :size]
    return (ys - size / 2) ** 2 + (xs - size / 2) ** 2 < radius**2


def test_perlin_mask_lies_on_the_foreground_and_is_seeded():
    fg = disk(200, 80)
    first = pa.perlin_mask(fg, np.random.default_rng(0))
    assert first.any() and not (first & ~fg).any()
    assert np.array_equal(first, pa.perlin_mask(fg, np.random.default_rng(0)))
    # components of 100..1600 pixels on the 512 grid: at most 1600 / (512/200)^2 (+ rounding) pixels each here
    labels, _ = pa.ndimage.label(first)
    assert max(np.bincount(labels.ravel())[1:]) <= 1600 / (512 / 200) ** 2 + 40


def test_blend_is_the_reference_interpolation():
    rng = np.random.default_rng(1)
    image, source = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    target, where = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    target[1:3, 1:3], where[5:7, 4:6] = True, True
    out = pa.blend_pixels(image, target, source, where, 0.3)
    expected = image.copy()
    expected[target] = np.clip(image[target] * 0.3 + source[where] * 0.7, 0, 255).astype(np.uint8)
    assert np.array_equal(out, expected)


def test_pasted_points_take_the_source_shape_in_z_and_the_full_cloud_in_x_y():
    rng = np.random.default_rng(2)
    cloud = rng.uniform(0.1, 1, (10, 10, 3)).astype(np.float32)
    full = rng.uniform(0.1, 1, (10, 10, 3)).astype(np.float32)
    source = rng.uniform(0.1, 1, (10, 10, 3)).astype(np.float32)
    source[2, 2] = 0  # a source pixel without a point
    mask = np.zeros((10, 10), bool)
    mask[1:4, 1:4] = True
    out = pa.paste_points(cloud, full, mask, source, mask, 1e-3)
    z = source[mask][:, 2]
    valid = np.all(source[mask] != 0, axis=1)
    expected_z = z[valid] - z[valid].mean() + cloud[mask][:, 2].mean() + 1e-3
    assert np.allclose(out[mask][valid, 2], expected_z, atol=1e-6)
    assert np.array_equal(out[mask][valid, :2], full[mask][valid, :2])
    assert np.array_equal(out[~mask], cloud[~mask])
    assert not np.all(out[2, 2] != 0)  # still no point


def test_shifted_mask_is_a_translation_onto_the_foreground():
    fg = np.zeros((60, 60), bool)
    fg[30:60, 30:60] = True
    component = np.zeros((60, 60), bool)
    component[2:12, 3:15] = True
    shifted, kept = pa.shift_mask(fg, component, np.random.default_rng(0))
    assert shifted.sum() == kept.sum() == 9 * 11  # the bounding box's last row and column are left out
    ys, xs = np.nonzero(kept)
    ts, us = np.nonzero(shifted)
    assert len({int(a - b) for a, b in zip(ts, ys)}) == 1 and len({int(a - b) for a, b in zip(us, xs)}) == 1
    centre = (int(np.nonzero(component)[0].mean()), int(np.nonzero(component)[1].mean()))
    moved = (centre[0] + int(ts[0] - ys[0]), centre[1] + int(us[0] - xs[0]))
    assert fg[moved]


class InMemory(pa.PseudoAnomalySynthesiser):
    """The synthesiser on arrays instead of files."""

    def __init__(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]], dataset_type: str = "mvtec3d", **kw):
        samples = [Sample("thing", "train", "good", stem, Path(f"{stem}.png"), Path(f"{stem}.tiff"), None)
                   for stem in arrays]
        super().__init__(samples, [Path(f"{stem}.tiff") for stem in arrays], dataset_type, **kw)
        self.arrays = arrays

    def read_sample(self, sample):
        image, cloud = self.arrays[sample.stem]
        return image.copy(), cloud.copy()

    def read_source(self, path):
        return self.arrays[path.stem][1].copy()


def objects(n: int = 3, size: int = 128) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for i in range(n):
        rng = np.random.default_rng(10 + i)
        fg = disk(size, 45 + 4 * i)
        cloud = np.zeros((size, size, 3), np.float32)
        ys, xs = np.nonzero(fg)
        cloud[fg] = np.stack([xs * 1e-3 + 0.1, ys * 1e-3 + 0.1, 0.5 + rng.normal(0, 1e-4, len(xs))], 1)
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        out[f"{i:03d}"] = (image, cloud)
    return out


@pytest.fixture(scope="module")
def generated() -> dict:
    """Two pseudo-anomalies with seed 5 (the displacements of the first recorded) and one with seed 6."""
    synthesiser = InMemory(objects())
    moves = []
    paste = pa.paste_points

    def spy(cloud, full, target, source_cloud, source, move):
        moves.append(move)
        return paste(cloud, full, target, source_cloud, source, move)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pa, "paste_points", spy)
        first = synthesiser.anomaly(np.random.default_rng(5))
    return {"first": first, "again": synthesiser.anomaly(np.random.default_rng(5)), "moves": moves}


def test_same_seed_gives_the_same_pseudo_anomaly(generated):
    first, again = generated["first"], generated["again"]
    for name in ("image", "cloud", "mask"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert first.mask.any() and first.image.dtype == np.uint8 and first.cloud.dtype == np.float32


def test_pasted_depths_move_within_the_reference_range(generated):
    moves = generated["moves"]
    assert moves and all(2e-4 <= abs(m) <= 2e-3 for m in moves)


def test_eyecandies_pseudo_anomalies_stay_on_the_foreground():
    synth = InMemory(objects(), dataset_type="eyecandies")
    sample = synth.anomaly(np.random.default_rng(2))
    valid = np.all(sample.cloud != 0, axis=-1)
    # pixels off the object are zeroed; pasted pixels whose source pixel (in the 3 x 3 dilation of the mask) had
    # no point lose theirs, as in the reference
    assert sample.mask.any() and (sample.mask & valid).sum() >= 0.8 * sample.mask.sum()
    assert (sample.image[~(valid | sample.mask)] == 0).all()


def test_one_training_sample_is_refused():
    with pytest.raises(pa.DataError, match="at least 2 training samples"):
        InMemory(dict(list(objects(1).items())))


def test_paste_threshold_is_the_reference_one_from_512_pixels_on():
    assert pa.paste_threshold((800, 800)) == pa.paste_threshold((512, 512)) == 100  # MVTec 3D-AD, Eyecandies
    assert pa.paste_threshold((256, 256)) == 25 and pa.paste_threshold((100, 100)) == 4


def test_mask_rules_per_dataset_and_with_fix_quirks():
    mvtec = InMemory(objects(2, 32))._mask_rule(Path("x/CandyCane/train/good/xyz/000.tiff"))
    assert (mvtec.threshold, mvtec.decay, mvtec.skip_last) == (0.4, False, True)
    eyecandies = InMemory(objects(2, 32), dataset_type="eyecandies", fix_quirks=True)
    thin = eyecandies._mask_rule(Path("x/CandyCane/train/good/xyz/000.tiff"))
    assert (thin.threshold, thin.decay, thin.skip_last) == (0.3, True, False)
    assert eyecandies._mask_rule(Path("x/GummyBear/train/good/xyz/000.tiff")).threshold == 0.4
