"""BTF's FPFH patches against Open3D called directly on the same points, placed and pooled pixel by pixel."""

import numpy as np
import pytest
import torch

from m3dm.data.synthetic import make_mvtec_scene, sample_rng
from m3dm.features.fpfh import FPFH_DIM, FPFHFeatures, FPFHParams, fpfh_map, pool_to_patches

pytestmark = pytest.mark.usefixtures("o3d")  # every test here needs Open3D (tests/conftest.py)


@pytest.fixture(scope="module")
def cloud() -> torch.Tensor:
    """A synthetic organized cloud (3, 48, 48) with its background at zero, as preprocessing leaves it."""
    scene = make_mvtec_scene(sample_rng(3, "gadget", "train", "good", 0), 48, 48, "gadget", "good")
    pc = torch.from_numpy(scene.cloud.astype(np.float32)).permute(2, 0, 1).contiguous()
    pc[:, :6, :] = 0  # an empty band
    pc[2, 20, 20] = 0  # a pixel with one zero coordinate is not a point
    return pc


def direct_fpfh(pc: torch.Tensor, o3d) -> np.ndarray:
    """The reference's recipe written out: the points with three non-zero coordinates, Open3D normals (radius
    0.1, 30 neighbours) and FPFH (radius 0.25, 100 neighbours), each histogram put back at its pixel."""
    h, w = pc.shape[1:]
    pixels = [(r, c) for r in range(h) for c in range(w) if all(float(pc[k, r, c]) != 0 for k in range(3))]
    points = np.array([[float(pc[k, r, c]) for k in range(3)] for r, c in pixels])
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=0.1, max_nn=30))
    fpfh = o3d.pipelines.registration.compute_fpfh_feature(cloud, o3d.geometry.KDTreeSearchParamHybrid(
        radius=0.25, max_nn=100))
    histograms = np.asarray(fpfh.data).T
    out = np.zeros((FPFH_DIM, h, w))
    for (r, c), histogram in zip(pixels, histograms):
        out[:, r, c] = histogram
    return out


def direct_pool(feature_map: np.ndarray, grid: int, aligned: bool) -> np.ndarray:
    """3 x 3 mean at every pixel (no padding; or, aligned, over the neighbours inside the map), then the mean of
    each adaptive window: rows floor(i·H/g) .. ceil((i+1)·H/g)."""
    c, h, w = feature_map.shape
    if aligned:
        local = np.zeros_like(feature_map)
        for r in range(h):
            for q in range(w):
                local[:, r, q] = feature_map[:, max(r - 1, 0):r + 2, max(q - 1, 0):q + 2].mean(axis=(1, 2))
    else:
        local = np.zeros((c, h - 2, w - 2))
        for r in range(h - 2):
            for q in range(w - 2):
                local[:, r, q] = feature_map[:, r:r + 3, q:q + 3].mean(axis=(1, 2))
    lh, lw = local.shape[1:]
    out = np.zeros((c, grid, grid))
    for i in range(grid):
        for j in range(grid):
            rows = slice(i * lh // grid, -(-(i + 1) * lh // grid))
            cols = slice(j * lw // grid, -(-(j + 1) * lw // grid))
            out[:, i, j] = local[:, rows, cols].mean(axis=(1, 2))
    return out


def test_fpfh_map_is_open3d_on_the_valid_points_placed_back(cloud, o3d):
    ours = fpfh_map(cloud)
    assert ours.dtype == torch.float64 and ours.shape == (FPFH_DIM, 48, 48)
    np.testing.assert_array_equal(ours.numpy(), direct_fpfh(cloud, o3d))
    assert not ours[:, :6].any() and not ours[:, 20, 20].any()


@pytest.mark.parametrize("aligned", [False, True])
def test_patches_are_the_pooled_map(cloud, aligned, o3d):
    grid = 7
    patches = FPFHFeatures(grid=grid, aligned=aligned)(cloud)
    assert patches.shape == (grid * grid, FPFH_DIM) and patches.dtype == torch.float32
    expected = direct_pool(direct_fpfh(cloud, o3d), grid, aligned)
    np.testing.assert_allclose(patches.numpy(), expected.reshape(FPFH_DIM, -1).T.astype(np.float32), rtol=1e-6,
                               atol=1e-5)


def test_pooling_matches_straightforward_on_random_maps():
    feature_map = torch.rand(2, 5, 30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for aligned in (False, True):
        ours = pool_to_patches(feature_map, 4, aligned)
        for b in range(2):
            np.testing.assert_allclose(ours[b].numpy(), direct_pool(feature_map[b].numpy(), 4, aligned), rtol=1e-12)


def test_empty_cloud_gives_zero_patches():
    patches = FPFHFeatures(grid=4)(torch.zeros(3, 16, 16))
    assert patches.shape == (16, FPFH_DIM) and not patches.any()


def test_reference_radii():
    params = FPFHParams()
    assert (params.normal_radius, params.normal_max_nn, params.feature_radius, params.feature_max_nn) == \
        pytest.approx((0.1, 30, 0.25, 100))
