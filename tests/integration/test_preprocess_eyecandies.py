import shutil

import numpy as np
import pytest

from m3dm.data.dataset import AnomalyDataset
from m3dm.data.layout import discover_samples
from m3dm.data.synthetic import OBJECT, make_eyecandies_scene, sample_rng, write_eyecandies_sample
from m3dm.preprocess.eyecandies import back_project, convert_cloud, convert_dataset, read_depth


@pytest.mark.parametrize("seed, defect", [(0, "good"), (1, "dent"), (2, "bump"), (3, "color")])
def test_conversion_recovers_known_geometry(tmp_path, seed, defect):
    scene = make_eyecandies_scene(sample_rng(seed, "eye"), size=128, defect=defect)
    write_eyecandies_sample(tmp_path, "000", scene)
    depth = read_depth(tmp_path / "000_depth.png", tmp_path / "000_info_depth.yaml")
    world = back_project(depth, np.loadtxt(tmp_path / "000_pose.txt")).reshape(128, 128, 3)
    np.testing.assert_allclose(world, scene.world, atol=1e-5)

    cloud = convert_cloud(tmp_path / "000_depth.png", tmp_path / "000_info_depth.yaml", tmp_path / "000_pose.txt")
    assert cloud.shape == (128, 128, 3) and cloud.dtype == np.float64
    expected = scene.world[..., [0, 2, 1]] * np.array([0.1, -0.1, 0.1])
    valid = (cloud != 0).all(-1)
    on_object = scene.labels == OBJECT
    assert valid[on_object].mean() > 0.97  # the object is kept (bar its ground contact)
    assert not valid[~on_object].any()  # the ground is removed
    np.testing.assert_allclose(cloud[valid], expected[valid], atol=1e-6)
    assert (cloud[~valid][:, 0] == 0).all()  # reference background value: x = 0, y and z not
    zero = convert_cloud(tmp_path / "000_depth.png", tmp_path / "000_info_depth.yaml",
                         tmp_path / "000_pose.txt", exact_zero=True)
    np.testing.assert_array_equal(zero[valid], cloud[valid])
    assert (zero[~valid] == 0).all()


def test_dataset_conversion_layout_and_resume(raw_eyecandies, tmp_path):
    target = tmp_path / "converted"
    summary = convert_dataset(raw_eyecandies, target, workers=2)
    assert summary.processed == 6 and not summary.errors
    train = discover_samples(target, "CandyCane", "train")
    test = discover_samples(target, "CandyCane", "test")
    assert [s.stem for s in train] == ["000", "001"]
    assert [(s.defect, s.stem) for s in test] == [("bad", "001"), ("bad", "003"), ("good", "000"), ("good", "002")]
    assert (target / "CandyCane/test/good/gt/000.png").is_file()  # as the reference: gt for good too
    src_rgb = raw_eyecandies / "CandyCane/test_public/data/01_image_4.png"
    assert src_rgb.read_bytes() == (target / "CandyCane/test/bad/rgb/001.png").read_bytes()
    item = AnomalyDataset(target, "CandyCane", "test")[0]
    assert item["label"] == 1 and item["gt"].sum() > 0
    assert convert_dataset(raw_eyecandies, target, workers=1).skipped == 6


def test_missing_mask_is_an_error_not_good(raw_eyecandies, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(raw_eyecandies, source)
    (source / "CandyCane/test_public/data/02_mask.png").unlink()
    (source / "stray_file.txt").write_text("not a category")  # the reference crashes on this
    summary = convert_dataset(source, tmp_path / "out", workers=1)
    assert len(summary.errors) == 1 and "02_mask.png" in summary.errors[0]
    assert summary.processed == 5
