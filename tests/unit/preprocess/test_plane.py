"""The background-plane fit without Open3D (m3dm's RANSAC, for machines without open3d) against Open3D's
``segment_plane`` with the reference's parameters: the same plane, bit for bit, and so the same preprocessed
files."""

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from m3dm.data.synthetic import make_mvtec_scene, sample_rng
from m3dm.errors import DataError
from m3dm.preprocess import mvtec3d as prep

pytestmark = pytest.mark.usefixtures("o3d")  # the NumPy RANSAC is compared with Open3D's (tests/conftest.py)


def without_open3d(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open3d", None)  # `import open3d` raises ImportError


@pytest.mark.parametrize(("seed", "size", "defect"), [(0, 96, "good"), (1, 96, "dent"), (2, 128, "combined"),
                                                      (3, 160, "bump")])
def test_ransac_plane_is_open3d_plane_on_synthetic_scans(seed, size, defect):
    points = prep.edge_band_points(make_mvtec_scene(sample_rng(seed, "plane"), size, size, "gadget", defect).cloud)
    np.testing.assert_array_equal(prep.ransac_plane(points.astype(np.float64)), prep.fit_background_plane(points))


def test_ransac_plane_is_open3d_plane_on_real_scans(real_mvtec_subset):
    for path in sorted(Path(real_mvtec_subset).glob("cable_gland/*/*/xyz/*.tiff"))[:3]:
        points = prep.edge_band_points(tifffile.imread(path).astype(np.float32))
        np.testing.assert_array_equal(prep.ransac_plane(points.astype(np.float64)),
                                      prep.fit_background_plane(points), err_msg=str(path))


def test_preprocessing_without_open3d_gives_the_same_arrays(monkeypatch):
    scene = make_mvtec_scene(sample_rng(4, "plane"), 128, 128, "gadget", "color")
    expected = prep.preprocess_arrays(scene.cloud, scene.rgb, scene.gt)
    without_open3d(monkeypatch)
    got = prep.preprocess_arrays(scene.cloud, scene.rgb, scene.gt)
    for a, b in zip(expected[:3], got[:3]):
        np.testing.assert_array_equal(a, b)
    assert expected[3] == got[3]


def test_least_squares_plane_of_points_on_a_known_plane():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-1, 1, (200, 2))
    points = np.column_stack([xy, 0.65 + 0.1 * xy[:, 0] - 0.05 * xy[:, 1]])
    plane = prep.least_squares_plane(points)
    np.testing.assert_allclose(np.abs(points @ plane[:3] + plane[3]), 0, atol=1e-12)
    assert np.linalg.norm(plane[:3]) == pytest.approx(1)
    assert not prep.least_squares_plane(np.zeros((60, 3))).any()  # no plane through a single point


def test_too_few_border_points_refused_without_open3d(monkeypatch):
    without_open3d(monkeypatch)
    with pytest.raises(DataError, match="border band"):
        prep.fit_background_plane(np.ones((10, 3)))
