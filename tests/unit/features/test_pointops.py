"""Point operations (quirk 17) against straightforward NumPy / loop implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3dm.features.pointops import farthest_point_sample, gather_points, group_points, knn


def kernel_fps(points: np.ndarray, n_samples: int, dtype: type = np.float32) -> list[int]:
    """Single-thread transcription of pointnet2_ops' furthest_point_sampling_kernel for one cloud."""
    points = points.astype(dtype)
    temp = np.full(len(points), 1e10, dtype=dtype)
    old, chosen = 0, [0]
    for _ in range(1, n_samples):
        best, best_index = -1.0, 0
        x1, y1, z1 = points[old]
        for k, (x2, y2, z2) in enumerate(points):
            magnitude = x2 * x2 + y2 * y2 + z2 * z2
            if float(magnitude) <= 1e-3:
                continue
            d = (x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1) + (z2 - z1) * (z2 - z1)
            temp[k] = min(d, temp[k])
            if temp[k] > best:
                best, best_index = temp[k], k
        old = best_index
        chosen.append(old)
    return chosen


def cloud_with_points_near_origin(rng: np.random.Generator, n: int) -> np.ndarray:
    points = rng.normal(size=(n, 3)).astype(np.float32)
    near = rng.choice(n, size=n // 10, replace=False)
    points[near] = rng.uniform(-0.015, 0.015, size=(len(near), 3))  # squared norm <= 6.75e-4 < 1e-3
    points[0] = (0.01, 0.0, -0.01)  # the first centre is index 0 even near the origin
    return points


def test_fps_matches_kernel_and_never_picks_points_near_origin():
    rng = np.random.default_rng(0)
    clouds = np.stack([cloud_with_points_near_origin(rng, 240) for _ in range(2)])
    got = farthest_point_sample(torch.from_numpy(clouds), 40)
    assert got.dtype == torch.int64 and got.shape == (2, 40)
    for cloud, indices in zip(clouds, got.tolist()):
        assert indices == kernel_fps(cloud, 40)
        near_origin = set(np.flatnonzero((cloud.astype(np.float64) ** 2).sum(1) <= 1e-3).tolist())
        assert not near_origin & set(indices[1:])


def test_fps_ties_and_duplicates_take_the_lowest_index():
    grid = np.stack(np.meshgrid(np.arange(1, 5), np.arange(1, 5), np.arange(1, 3), indexing="ij"), -1)
    points = grid.reshape(-1, 3).astype(np.float32)
    points = np.concatenate([points, points[::3]])  # exact duplicates at higher indices
    got = farthest_point_sample(torch.from_numpy(points)[None], 30)[0].tolist()
    assert got == kernel_fps(points, 30)


def test_fps_when_selectable_points_run_out():
    rng = np.random.default_rng(1)
    points = rng.uniform(-0.01, 0.01, size=(50, 3)).astype(np.float32)
    points[[7, 20]] = ((1.0, 2.0, 3.0), (-1.0, 0.5, 2.0))
    got = farthest_point_sample(torch.from_numpy(points)[None], 6)[0].tolist()
    assert got == kernel_fps(points, 6)
    assert got[:3] == [0, 7, 20] or got[:3] == [0, 20, 7]
    none_selectable = farthest_point_sample(torch.zeros(1, 10, 3), 4)[0].tolist()
    assert none_selectable == [0, 0, 0, 0]


def brute_force_knn(query: np.ndarray, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    diff = query[:, None, :] - points[None, :, :]
    dist = (diff * diff).sum(-1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), order


def test_knn_matches_brute_force_and_chunking():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(2, 400, 3)).astype(np.float32)
    own = rng.choice(400, size=30, replace=False)
    query = np.concatenate([points[:, own], rng.normal(size=(2, 25, 3)).astype(np.float32)], axis=1)
    dist, idx = knn(torch.from_numpy(query), torch.from_numpy(points), 16)
    assert dist.shape == idx.shape == (2, 55, 16) and idx.dtype == torch.int64
    for b in range(2):
        want_dist, want_idx = brute_force_knn(query[b], points[b], 16)
        np.testing.assert_array_equal(idx[b].numpy(), want_idx)
        np.testing.assert_allclose(dist[b].numpy(), want_dist, rtol=1e-6, atol=1e-7)
    assert (idx[:, :30, 0].numpy() == own).all() and (dist[:, :30, 0] == 0).all()
    chunked = knn(torch.from_numpy(query), torch.from_numpy(points), 16, chunk_size=7)
    assert torch.equal(chunked[0], dist) and torch.equal(chunked[1], idx)


def test_knn_with_exact_ties_returns_true_nearest_distances():
    grid = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(np.float32)
    dist, idx = knn(torch.from_numpy(grid[None, ::7]), torch.from_numpy(grid[None]), 10)
    want_dist, _ = brute_force_knn(grid[::7], grid, 10)
    np.testing.assert_array_equal(dist[0].numpy(), want_dist)
    recomputed = ((grid[idx[0].numpy()] - grid[::7][:, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(recomputed, want_dist)
    assert (idx[0, :, 0].numpy() == np.arange(0, len(grid), 7)).all()
    assert all(len(set(row)) == 10 for row in idx[0].tolist())
    d, i = dist[0], idx[0]
    assert ((d[:, 1:] > d[:, :-1]) | ((d[:, 1:] == d[:, :-1]) & (i[:, 1:] > i[:, :-1]))).all()


def test_gather_points_matches_loop():
    points = torch.randn(2, 9, 4)
    idx = torch.randint(0, 9, (2, 3, 5))
    got = gather_points(points, idx)
    assert got.shape == (2, 3, 5, 4)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                assert torch.equal(got[b, i, j], points[b, idx[b, i, j]])


def test_group_points_shapes_and_self_first():
    torch.manual_seed(0)
    points = torch.randn(2, 300, 3) + 3.0
    neighbourhoods, centres = group_points(points, num_group=32, group_size=12)
    assert neighbourhoods.shape == (2, 32, 12, 3) and centres.shape == (2, 32, 3)
    assert torch.equal(centres, gather_points(points, farthest_point_sample(points, 32)))
    assert (neighbourhoods[:, :, 0] == 0).all()
    for b in range(2):
        for g in range(32):
            absolute = (neighbourhoods[b, g] + centres[b, g]).numpy()
            _, want = brute_force_knn(centres[b, g][None].numpy(), points[b].numpy(), 12)
            np.testing.assert_allclose(absolute, points[b].numpy()[want[0]], atol=1e-6)


def test_fps_float64_computes_in_float64():
    points = torch.randn(1, 64, 3, dtype=torch.float64)
    got = farthest_point_sample(points, 8)[0].tolist()
    assert got == kernel_fps(points[0].numpy(), 8, dtype=np.float64)


def test_padded_batch_groups_each_cloud_as_alone():
    """Clouds of different sizes grouped as one padded batch give, bit for bit, the groups each gets alone:
    duplicates of point 0, points too close to the origin (never FPS centres) and equal kNN distances included."""
    from m3dm.features.pointops import pad_clouds

    rng = np.random.default_rng(3)
    clouds = []
    for n in (97, 140, 61):
        cloud = rng.normal(size=(n, 3)).astype(np.float32)
        cloud[5] = cloud[0]  # a real duplicate of the first centre
        cloud[7] = 0.0  # unselectable by FPS
        cloud[10:14] = np.round(cloud[10:14])  # lattice points: ties in kNN distances
        clouds.append(torch.from_numpy(cloud))
    points, lengths = pad_clouds(clouds)
    assert points.shape == (3, 140, 3) and lengths.tolist() == [97, 140, 61]
    neighbourhoods, centres = group_points(points, num_group=24, group_size=9, lengths=lengths)
    for b, cloud in enumerate(clouds):
        alone_n, alone_c = group_points(cloud[None], num_group=24, group_size=9)
        assert torch.equal(centres[b], alone_c[0])
        assert torch.equal(neighbourhoods[b], alone_n[0])


def test_group_points_names_a_cloud_smaller_than_a_group():
    from m3dm.features.pointops import pad_clouds

    points, lengths = pad_clouds([torch.rand(50, 3), torch.rand(6, 3)])
    with pytest.raises(ValueError, match="a cloud of 6 points cannot form groups of 8 points"):
        group_points(points, num_group=4, group_size=8, lengths=lengths)
