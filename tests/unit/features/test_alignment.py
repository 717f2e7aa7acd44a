"""Point Feature Alignment (quirk 18): fast path vs reference path vs brute-force loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m3dm.features.alignment import (
    interpolate_to_points,
    interpolation_weights,
    pfa_patches,
    pfa_patches_reference,
    pooling_matrix,
    project_to_patches,
    rgb_to_patch_grid,
    valid_points,
)


def sparse_organized_cloud(size: int, keep: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    """``(3, size, size)`` cloud with ~``keep`` valid pixels, an empty band, and pixels with one zero coordinate."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cloud = torch.stack([cols / size + 0.1, rows / size + 0.1, 0.5 + 0.1 * torch.rand(size, size, generator=gen)])
    cloud = cloud.to(dtype) * (torch.rand(size, size, generator=gen) < keep)
    cloud[:, : size // 4] = 0  # a fully invalid band -> empty pooling windows
    partial = torch.rand(size, size, generator=gen) < 0.05
    cloud[2][partial] = 0  # one zero coordinate is enough to invalidate a pixel
    return cloud


def sample_scene(size: int, keep: float, n_centres: int, channels: int, seed: int, dtype=torch.float32):
    points, flat_index = valid_points(sparse_organized_cloud(size, keep, seed, dtype))
    gen = torch.Generator().manual_seed(seed + 1)
    centres = points[torch.randperm(len(points), generator=gen)[:n_centres]]
    features = torch.randn(n_centres, channels, generator=gen, dtype=dtype)
    return points, flat_index, centres, features


def test_valid_points_matches_pixel_loop():
    cloud = sparse_organized_cloud(12, 0.6, seed=0)
    points, flat_index = valid_points(cloud)
    want = [(r * 12 + c, cloud[:, r, c]) for r in range(12) for c in range(12) if (cloud[:, r, c] != 0).all()]
    assert flat_index.tolist() == [i for i, _ in want]
    assert torch.equal(points, torch.stack([p for _, p in want]))


def brute_force_interpolation(points: np.ndarray, centres: np.ndarray, features: np.ndarray) -> np.ndarray:
    out = np.zeros((len(points), features.shape[1]))
    for n, point in enumerate(points):
        d2 = ((centres - point) ** 2).sum(1)
        nearest = np.argsort(d2, kind="stable")[:3]
        weights = 1.0 / (d2[nearest] + 1e-8)
        out[n] = (weights / weights.sum()) @ features[nearest]
    return out


@pytest.mark.parametrize("clamp", [False, True])
def test_interpolation_matches_brute_force(clamp):
    points, _, centres, features = sample_scene(24, 0.7, 40, 6, seed=3, dtype=torch.float64)
    got = interpolate_to_points(points, centres, features, clamp=clamp)
    want = brute_force_interpolation(points.numpy(), centres.numpy(), features.numpy())
    # points that are centres: the expansion formula gives ~1e-16 instead of 0 next to eps = 1e-8
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_interpolation_with_fewer_than_three_centres():
    points = torch.tensor([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [5.0, 1.0, 1.0]])
    one = interpolate_to_points(points, points[:1], torch.tensor([[3.0, -1.0]]))
    assert torch.equal(one, torch.tensor([[3.0, -1.0]] * 3))
    two = interpolate_to_points(points, points[:2], torch.tensor([[1.0], [0.0]]))
    want = brute_force_interpolation(points.double().numpy(), points[:2].double().numpy(), np.array([[1.0], [0.0]]))
    np.testing.assert_allclose(two.numpy(), want, rtol=1e-5)


def test_clamped_distances_keep_weights_in_unit_interval():
    points, _, centres, _ = sample_scene(48, 0.8, 64, 1, seed=4)
    points, centres = points * 300, centres * 300  # large coordinates: strong cancellation in |a|²+|b|²-2ab
    _, compat_weights = interpolation_weights(points, centres, clamp=False)
    assert ((compat_weights < 0) | (compat_weights > 1)).any()  # the reference's negative distances (COMPAT)
    _, weights = interpolation_weights(points, centres, clamp=True)
    assert ((weights >= 0) & (weights <= 1)).all()
    assert torch.allclose(weights.sum(1), torch.ones(len(points)))


def test_pooling_matrix_equals_torch_pooling():
    for size, out in [(224, 56), (32, 8), (48, 12), (10, 11)]:
        identity = torch.eye(size, dtype=torch.float64)[None]
        pooled = F.adaptive_avg_pool1d(F.avg_pool1d(identity, kernel_size=3, stride=1), out)[0].T  # row r = pooled e_r
        torch.testing.assert_close(pooling_matrix(size, out), pooled, rtol=0, atol=1e-15)


def test_projection_of_single_pixel_matches_pooling_windows():
    size, out = 20, 6
    flat_index = torch.tensor([7 * size + 11])
    patches = project_to_patches(torch.tensor([[2.0]]), flat_index, size, out)
    pooled_len = size - 2
    for i in range(out):
        for j in range(out):
            r0, r1 = (i * pooled_len) // out, -(-(i + 1) * pooled_len // out)
            c0, c1 = (j * pooled_len) // out, -(-(j + 1) * pooled_len // out)
            rows = sum(1 for u in range(r0, r1) if u <= 7 <= u + 2)
            cols = sum(1 for v in range(c0, c1) if v <= 11 <= v + 2)
            want = 2.0 * rows * cols / (9 * (r1 - r0) * (c1 - c0))
            assert patches[i * out + j, 0].item() == pytest.approx(want, rel=1e-6, abs=0)


@pytest.mark.parametrize("size,out", [(32, 8), (48, 12)])
@pytest.mark.parametrize("clamp", [False, True])
def test_fast_path_equals_reference_float32(size, out, clamp):
    points, flat_index, centres, features = sample_scene(size, 0.5, 30, 7, seed=size)
    fast = pfa_patches(points, flat_index, centres, features, size, out, clamp=clamp)
    reference = pfa_patches_reference(points, flat_index, centres, features, size, out, clamp=clamp)
    assert fast.shape == reference.shape == (out * out, 7)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("size,out", [(32, 8), (48, 12)])
def test_fast_path_equals_reference_float64(size, out):
    points, flat_index, centres, features = sample_scene(size, 0.5, 30, 5, seed=size + 1, dtype=torch.float64)
    fast = pfa_patches(points, flat_index, centres, features, size, out)
    reference = pfa_patches_reference(points, flat_index, centres, features, size, out)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)


def test_fast_path_equals_reference_real_config_and_empty_windows_are_zero():
    points, flat_index, centres, features = sample_scene(224, 0.06, 1024, 16, seed=9)
    assert 2000 < len(points) < 4000
    fast = pfa_patches(points, flat_index, centres, features, 224)
    reference = pfa_patches_reference(points, flat_index, centres, features, 224)
    assert fast.shape == (3136, 16)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())

    valid = torch.zeros(224 * 224)
    valid[flat_index] = 1
    coverage = F.adaptive_avg_pool2d(F.avg_pool2d(valid.view(1, 1, 224, 224), 3, 1), 56).flatten()
    empty = coverage == 0
    assert empty.sum() >= 56 * 13  # the invalid band covers at least 13 patch rows
    assert (reference[empty] == 0).all() and (fast[empty] == 0).all()
    assert (reference[~empty] != 0).any(dim=1).all()


def test_rgb_to_patch_grid_is_nearest_upsampling_for_28_to_56():
    rgb = torch.randn(2, 5, 28, 28)
    got = rgb_to_patch_grid(rgb)
    want = rgb.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).flatten(2).transpose(1, 2)
    assert got.shape == (2, 3136, 5)
    assert torch.equal(got, want)
    assert torch.equal(got[1, 3 * 56 + 5], rgb[1, :, 1, 2])  # patch row 3, col 5 <- map cell (1, 2)
