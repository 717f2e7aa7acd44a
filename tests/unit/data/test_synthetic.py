import hashlib

import numpy as np
import pytest

from m3dm.data.synthetic import MISSING, OBJECT, make_eyecandies_scene, make_mvtec_scene, sample_rng, write_mvtec3d


def scene(defect, seed=5, size=128):
    return make_mvtec_scene(sample_rng(seed, "s"), size, size, "gadget", defect)


@pytest.mark.parametrize("defect, geometry, colour", [
    ("dent", True, False), ("bump", True, False), ("color", False, True), ("combined", True, True)])
def test_defects_are_localised_and_of_their_kind(defect, geometry, colour):
    good, bad = scene("good"), scene(defect)
    assert not good.gt.any() and bad.gt.any()
    assert np.isin(bad.labels[bad.gt > 0], [OBJECT, MISSING]).all()  # defects lie on the part
    cloud_diff = np.abs(bad.cloud - good.cloud).max(-1) > 1e-4
    rgb_diff = np.abs(bad.rgb.astype(int) - good.rgb).max(-1) > 10
    assert cloud_diff.any() == geometry and rgb_diff.any() == colour
    near_defect = np.zeros_like(cloud_diff)
    rows, cols = np.nonzero(bad.gt)
    near_defect[rows.min() - 3:rows.max() + 4, cols.min() - 3:cols.max() + 4] = True
    assert not (cloud_diff & ~near_defect).any() and not (rgb_diff & ~near_defect).any()
    if geometry:  # a few millimetres: visible to a 3D sensor, small against the part
        depth_change = np.abs(bad.cloud[..., 2] - good.cloud[..., 2])[bad.gt > 0].max()
        assert 0.001 < depth_change < 0.005


def test_formats_and_determinism(tmp_path):
    s = scene("good", size=160)
    assert s.cloud.dtype == np.float32 and s.cloud.shape == (160, 160, 3)
    assert s.rgb.dtype == np.uint8 and s.gt.dtype == np.uint8
    missing = (s.cloud == 0).all(-1)
    assert 0 < missing.mean() < 0.1 and ((s.cloud != 0).all(-1) | missing).all()
    digests = []
    for run, workers in (("a", 1), ("b", 2)):  # worker processes write the same files as one process
        root = write_mvtec3d(tmp_path / run, classes=("x",), size=64, n_train=1, n_val=0, n_test_good=0,
                             n_test_defect=1, seed=3, progress=False, workers=workers)
        digests.append({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in root.rglob("*") if p.is_file()})
    assert digests[0] == digests[1]
    other = write_mvtec3d(tmp_path / "c", classes=("x",), size=64, n_train=1, n_val=0, n_test_good=0,
                          n_test_defect=1, seed=4, progress=False)
    assert (other / "x/train/good/xyz/000.tiff").read_bytes() != (tmp_path / "a/x/train/good/xyz/000.tiff").read_bytes()


def test_eyecandies_scene_consistency():
    good = make_eyecandies_scene(sample_rng(1, "e"), 96, "good")
    bump = make_eyecandies_scene(sample_rng(1, "e"), 96, "bump")
    assert good.depth_png.dtype == np.uint16 and len(good.images) == 6 and good.pose.shape == (4, 4)
    assert not good.mask.any() and bump.mask.any()
    changed = good.depth_png != bump.depth_png
    assert changed.any() and (bump.labels[changed] == OBJECT).all()
