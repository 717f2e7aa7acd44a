import numpy as np
import pytest

from m3dm.data.synthetic import make_mvtec_scene, sample_rng
from m3dm.preprocess import mvtec3d as prep
from m3dm.preprocess.dbscan import dbscan_labels


def open3d_labels(points, eps, min_points):
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    return np.asarray(cloud.cluster_dbscan(eps=eps, min_points=min_points))


@pytest.mark.parametrize("seed", range(12))
def test_equals_open3d_on_random_blobs(seed):
    # sparse blobs with background scatter: many border points shared between clusters, many noise points
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 0.04, (rng.integers(2, 12), 3))
    blobs = [c + rng.normal(0, rng.uniform(0.002, 0.006), (rng.integers(20, 300), 3)) for c in centres]
    points = np.concatenate(blobs + [rng.uniform(0, 0.05, (rng.integers(0, 500), 3))])
    eps, min_points = rng.uniform(0.003, 0.008), int(rng.integers(3, 30))
    np.testing.assert_array_equal(dbscan_labels(points, eps, min_points), open3d_labels(points, eps, min_points))


def test_equals_open3d_on_a_scan():
    scene = make_mvtec_scene(sample_rng(1, "dbscan"), 300, 300, "gadget", "dent")
    plane = prep.fit_background_plane(prep.edge_band_points(scene.cloud))
    cloud, _ = prep.remove_plane(scene.cloud, scene.rgb, plane)
    points = cloud[prep.valid_mask(cloud)].astype(np.float64)
    labels = dbscan_labels(points, prep.DBSCAN_EPS, prep.DBSCAN_MIN_POINTS)
    assert len(np.unique(labels)) > 1
    np.testing.assert_array_equal(labels, open3d_labels(points, prep.DBSCAN_EPS, prep.DBSCAN_MIN_POINTS))


def test_edge_cases():
    assert dbscan_labels(np.zeros((0, 3)), 0.1, 3).shape == (0,)
    assert (dbscan_labels(np.eye(3), 0.1, 2) == -1).all()
