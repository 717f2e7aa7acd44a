"""The runner's NumPy FPFH (``m3dm_runner.fpfh``) against Open3D, which the pipeline calls: normals and histograms
bit-identical on a synthetic part (through both neighbour searches) and on degenerate clouds (collinear,
planar, repeated points; equal distances are avoided: the k-d tree
breaks such ties in its own order), and the pooled patches equal to the pipeline's ``FPFHFeatures``."""

import numpy as np
import pytest
import torch

from m3dm.data.synthetic import make_mvtec_scene, sample_rng
from m3dm.features.fpfh import FPFHFeatures, FPFHParams, pool_to_patches
from m3dm_runner import fpfh
from m3dm_runner.pointops import valid_points

pytestmark = pytest.mark.usefixtures("o3d")  # every test here needs Open3D (tests/conftest.py)


@pytest.fixture(scope="module")
def cloud() -> np.ndarray:
    """A synthetic organized cloud (3, 16, 16), background at zero, as preprocessing leaves it."""
    scene = make_mvtec_scene(sample_rng(5, "gadget", "test", "crack", 0), 16, 16, "gadget", "crack")
    return np.ascontiguousarray(scene.cloud.astype(np.float32).transpose(2, 0, 1))


def open3d_features(points: np.ndarray, o3d) -> tuple[np.ndarray, np.ndarray]:
    """Open3D's normals and FPFH as ``m3dm.features.fpfh.fpfh_of_points`` computes them."""
    params = FPFHParams()
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=params.normal_radius,
                                                                max_nn=params.normal_max_nn))
    feature = o3d.pipelines.registration.compute_fpfh_feature(cloud, o3d.geometry.KDTreeSearchParamHybrid(
        radius=params.feature_radius, max_nn=params.feature_max_nn))
    return np.asarray(cloud.normals), np.asarray(feature.data).T


def numpy_features(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    params = fpfh.FPFHParams()
    near = fpfh.hybrid_search(points, params.feature_radius, params.feature_max_nn)
    normals = fpfh.estimate_normals(points, near.narrowed(params.normal_radius, params.normal_max_nn))
    return normals, fpfh.fpfh_of_points(points)


@pytest.mark.parametrize("grid_search", [False, True])
def test_normals_and_histograms_are_open3ds(cloud, monkeypatch, grid_search, o3d):
    points = valid_points(cloud)[0].astype(np.float64)
    assert len(points) > 120
    monkeypatch.setattr(fpfh, "_GRID_MIN_POINTS", 0 if grid_search else len(points))
    expected_normals, expected = open3d_features(points, o3d)
    normals, histograms = numpy_features(points)
    assert np.array_equal(normals, expected_normals)
    assert np.array_equal(histograms, expected)


def degenerate_clouds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    line = np.stack([np.cumsum(rng.random(12)) * 0.003, np.zeros(12) + 0.2, np.zeros(12) + 0.3], axis=1)
    flat = np.concatenate([rng.random((25, 2)) * 0.02, np.full((25, 1), 0.3)], axis=1)
    repeated = rng.random((20, 3)) * 0.01
    return {"collinear": line, "plane": flat, "repeated points": np.concatenate([repeated,
                                                                                               repeated[:6]]),
            "two points": repeated[:2], "one point": repeated[:1]}


@pytest.mark.parametrize("name", list(degenerate_clouds()))
def test_degenerate_clouds_are_open3ds(name, o3d):
    points = degenerate_clouds()[name]
    expected_normals, expected = open3d_features(points, o3d)
    normals, histograms = numpy_features(points)
    assert np.array_equal(normals, expected_normals)
    assert np.array_equal(histograms, expected)


@pytest.mark.parametrize("aligned", [False, True])
def test_patches_are_the_pipelines(cloud, aligned):
    expected = FPFHFeatures(grid=8, aligned=aligned)(torch.from_numpy(cloud)).numpy()
    settings = {"grid": 8, "aligned": aligned, "normal_radius": 0.1, "normal_max_nn": 30, "feature_radius": 0.25,
                "feature_max_nn": 100}
    got = fpfh.fpfh_batch(cloud[None], settings)[0]
    assert got.shape == expected.shape == (64, 33)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize(("size", "grid", "aligned"), [(30, 8, False), (30, 8, True), (9, 8, False)])
def test_pooling_sums_as_pytorch(size, grid, aligned):
    """Windows of several sizes (and, from 9 pixels, 7 to 8: overlapping ones), summed in PyTorch's order."""
    rng = np.random.default_rng(size)
    feature_map = rng.random((4, size, size)) * 100 * (rng.random((1, size, size)) < 0.3)
    expected = pool_to_patches(torch.from_numpy(feature_map)[None], grid, aligned)[0].flatten(1).T
    assert np.array_equal(fpfh.pooled_patches(feature_map, grid, aligned), expected.to(torch.float32).numpy())


def test_threads_and_row_chunks_keep_the_bits(cloud, monkeypatch):
    points = valid_points(cloud)[0].astype(np.float64)
    whole = fpfh.fpfh_of_points(points, threads=1)
    # small chunks and cell groups, so that several run on the pool at once
    for name, value in {"_ROW_CHUNK": 16, "_PAIR_CHUNK_POINTS": 16, "_GRID_MIN_POINTS": 0, "_QUERY_ROWS": 8,
                        "_SEARCH_CHUNK_BYTES": 8 * 16 * len(points)}.items():
        monkeypatch.setattr(fpfh, name, value)
    assert np.array_equal(fpfh.fpfh_of_points(points, threads=1), whole)
    assert np.array_equal(fpfh.fpfh_of_points(points, threads=4), whole)
