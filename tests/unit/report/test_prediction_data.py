"""The report data of predictions: thumbnails spooled to disk part by part hold what the same parts' arrays would
hold (``write_data`` from whole arrays), also across chunk boundaries, with and without ground truth, and after
``resume``; the spool file has no name, so nothing is left in the folder."""

import dataclasses

import numpy as np
import pytest

from m3dm.report.data import (
    CLOUD,
    DETAIL_KEYS,
    REPORT_DATA_DIR,
    SPOOL_CHUNK,
    UNKNOWN_LABEL,
    ClassData,
    PredictionData,
    depth_thumbnail,
    heat_levels,
    load_class_data,
    shrink_maps,
    shrink_rgb,
    write_data,
)

RANGE = (0.1, 2.5)


def parts(count: int, seed: int, masks_every: int | None = 3) -> list[tuple]:
    """``count`` made-up scored parts: (name, score, failed, rgb, cloud, gt or None, map)."""
    rng = np.random.default_rng(seed)
    made = []
    for i in range(count):
        cloud = rng.normal(size=(3, 224, 224)).astype(np.float32)
        cloud[:, rng.random((224, 224)) < 0.3] = 0  # no point there
        gt = None if masks_every is None or i % masks_every else rng.random((224, 224)) < 0.05
        made.append((f"s{seed}/{i:04d}", float(rng.normal()), bool(i % 2), rng.integers(0, 256, (224, 224, 3),
                     dtype=np.uint8), cloud, gt, rng.random((224, 224)).astype(np.float32) * 3))
    return made


def expected(made: list[tuple], folder, threshold: float = 0.5):
    """The file the parts' whole arrays give (what the data held in memory before it was spooled)."""
    has_masks = any(p[5] is not None for p in made)
    blank = np.zeros((224, 224), bool)
    data = ClassData(class_name="gadget", names=[p[0] for p in made],
                     labels=np.full(len(made), UNKNOWN_LABEL, dtype=np.int8),
                     scores=np.asarray([p[1] for p in made]), failed=np.asarray([p[2] for p in made]),
                     image_threshold=threshold, rgb=np.stack([shrink_rgb(p[3]) for p in made]),
                     depth=np.stack([depth_thumbnail(p[4]) for p in made]),
                     maps=shrink_maps(np.stack([p[6] for p in made])),
                     masks=np.stack([blank if p[5] is None else p[5] for p in made]) if has_masks else None,
                     map_range=RANGE, pro_curve=None, defect_metrics={})
    return load_class_data(write_data(folder / "expected.npz", data))


def assert_same(ours, theirs) -> None:
    for key in ("class_name", "names", "image_threshold", "map_range", "pro_curve", "defect_metrics"):
        assert getattr(ours, key) == getattr(theirs, key), key
    for key in ("labels", "scores", "failed", "rgb", "depth", "maps"):
        np.testing.assert_array_equal(getattr(ours, key), getattr(theirs, key), err_msg=key)
        assert getattr(ours, key).dtype == getattr(theirs, key).dtype, key
    assert (ours.masks is None) == (theirs.masks is None)
    if ours.masks is not None:
        np.testing.assert_array_equal(ours.masks, theirs.masks)


def assert_spooled_same(spooled_data, loaded) -> None:
    """What the report reads part by part from the spool (``load_class_data(spool=True)``) is the loaded arrays."""
    for key in ("rgb", "depth", "maps", "masks", *DETAIL_KEYS):
        ours, theirs = getattr(spooled_data, key), getattr(loaded, key)
        assert (ours is None) == (theirs is None), key
        if ours is not None:
            assert len(ours) == len(theirs), key
            for i in (0, SPOOL_CHUNK, len(theirs) - 1):
                np.testing.assert_array_equal(ours[i], theirs[i], err_msg=key)
                assert ours[i].dtype == theirs[i].dtype, key


def spooled(made: list[tuple], folder) -> PredictionData:
    data = PredictionData("gadget", 0.5, RANGE, spool_folder=folder / REPORT_DATA_DIR)
    for part in made:
        data.add(*part)
    return data


@pytest.mark.parametrize("masks_every", [3, None])
def test_spooled_thumbnails_make_the_file_the_whole_arrays_make(tmp_path, masks_every):
    made = parts(SPOOL_CHUNK + 5, seed=0, masks_every=masks_every)  # more than one chunk
    data = spooled(made, tmp_path)
    path = data.save(tmp_path, {"kind": "predict"})
    data.close()
    assert_same(load_class_data(path), expected(made, tmp_path))
    assert_spooled_same(load_class_data(path, spool=True), load_class_data(path))
    assert sorted(p.name for p in (tmp_path / REPORT_DATA_DIR).iterdir()) == ["gadget.npz", "run.json"]


def test_resume_keeps_the_earlier_parts_scored_and_adds_the_new(tmp_path):
    earlier, later = parts(SPOOL_CHUNK + 3, seed=1, masks_every=None), parts(4, seed=2)
    first = spooled(earlier, tmp_path)
    first.save(tmp_path, {"kind": "predict"})
    first.close()
    finished = [p for i, p in enumerate(earlier) if i != 7]  # e.g. an error row: not in the report
    data = PredictionData("gadget", 0.5, RANGE, spool_folder=tmp_path / REPORT_DATA_DIR)
    data.resume(tmp_path, [p[0] for p in finished] + ["never/saved"])
    for part in later:
        data.add(*part)
    path = data.save(tmp_path, {"kind": "predict"})
    data.close()
    assert_same(load_class_data(path), expected(finished + later, tmp_path))


def test_nothing_scored_saves_nothing(tmp_path):
    data = PredictionData("gadget", 0.5, RANGE, spool_folder=tmp_path / REPORT_DATA_DIR)
    assert data.save(tmp_path, {}) is None
    data.close()


def test_the_detail_view_keeps_the_pictures_and_the_cloud_on_a_grid_over_the_part(tmp_path):
    """A part in a corner of the frame: its cloud is sampled over the part alone (as many points as a part that
    fills the frame), with the score of the map and the RGB at each point; the pictures at full size."""
    name, score, failed, rgb, cloud, gt, score_map = parts(1, seed=3, masks_every=1)[0]
    cloud[:] = 0
    cloud[:, 150:214, 20:84] = np.random.default_rng(4).normal(size=(3, 64, 64))  # 64 x 64 pixels with a point
    cloud[:, 150:214, 20:84][:, cloud[2, 150:214, 20:84] == 0] = 1.0
    data = spooled([(name, score, failed, rgb, cloud, gt, score_map)], tmp_path)
    loaded = load_class_data(data.save(tmp_path, {"kind": "predict"}))
    data.close()
    detail = loaded.detail(0)
    np.testing.assert_array_equal(detail["rgb"], rgb)
    np.testing.assert_array_equal(detail["mask"], gt)
    np.testing.assert_array_equal(detail["heat"], heat_levels(score_map, RANGE))
    rows, cols = (np.floor(at * 224).astype(int) for at in detail["cloud_at"])
    assert rows.tolist() == list(range(150, 214)) and cols.tolist() == list(range(20, 84))  # the part, pixel by pixel
    assert detail["cloud"].shape == (CLOUD, CLOUD, 3) and np.isfinite(detail["cloud"]).all()
    np.testing.assert_array_equal(detail["cloud"], cloud.transpose(1, 2, 0)[150:214, 20:84])
    np.testing.assert_array_equal(detail["cloud_scores"], score_map[150:214, 20:84].astype(np.float16))


def test_the_normalised_scores_are_saved_with_the_raw_ones(tmp_path):
    made = parts(3, seed=5, masks_every=None)
    data = PredictionData("gadget", 0.5, RANGE, spool_folder=tmp_path / REPORT_DATA_DIR,
                          normalise=lambda score: 1 / (1 + np.exp(-score)))
    for part in made:
        data.add(*part)
    loaded = load_class_data(data.save(tmp_path, {"kind": "predict"}))
    data.close()
    np.testing.assert_array_equal(loaded.normalised_scores, [1 / (1 + np.exp(-p[1])) for p in made])
    plain = dataclasses.replace(loaded, normalised_scores=None)  # a main.py run's data: none
    assert load_class_data(write_data(tmp_path / "plain.npz", plain)).normalised_scores is None
