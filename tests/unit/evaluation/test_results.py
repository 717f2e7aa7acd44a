"""The files written from a class's evaluation: the --save_maps archive, the --save_preds pictures and the
per-sample rows."""

import csv
import json

import numpy as np
from PIL import Image

from m3dm.data.io import write_png
from m3dm.evaluation.results import (
    PER_SAMPLE_FIELDS,
    ClassResult,
    per_sample_rows,
    save_prediction_pictures,
    save_score_maps,
)
from m3dm.evaluation.tables import write_per_sample


def result(tmp_path) -> ClassResult:
    rng = np.random.default_rng(0)
    names = ["gadget/test/good/000", "gadget/test/dent/000", "gadget/test/dent/001"]
    paths = []
    for name in names:
        path = tmp_path / "rgb" / f"{name.replace('/', '_')}.png"
        write_png(path, rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
        paths.append(str(path))
    masks = np.zeros((3, 224, 224), np.uint8)
    masks[1:, 100:120, 100:120] = 1
    return ClassResult({"image_rocauc": 1.0}, np.array([0, 1, 1]), np.array([0.5, 2.0, 1.5]),
                       rng.random((3, 224, 224)).astype(np.float64), masks, names, paths)


def test_score_maps_archive_holds_names_labels_scores_and_float32_maps(tmp_path):
    evaluation = result(tmp_path)
    path = save_score_maps(evaluation, tmp_path / "maps" / "gadget.npz")
    with np.load(path) as archive:
        assert list(archive["names"]) == evaluation.names
        assert np.array_equal(archive["labels"], evaluation.labels)
        assert np.array_equal(archive["image_scores"], evaluation.image_scores)
        assert archive["maps"].dtype == np.float32
        assert np.array_equal(archive["maps"], evaluation.maps.astype(np.float32))
    assert [p.name for p in path.parent.iterdir()] == ["gadget.npz"]  # no temporary file left


def test_one_picture_per_sample_under_its_defect(tmp_path):
    folder = save_prediction_pictures(result(tmp_path), tmp_path / "pred_maps" / "gadget")
    pictures = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    assert pictures == ["dent/000.png", "dent/001.png", "good/000.png"]
    assert Image.open(folder / "dent" / "000.png").size == (3 * 224, 224 + 18)  # RGB | GT | heatmap, title


def test_per_sample_rows_and_their_files(tmp_path):
    evaluation = result(tmp_path)
    evaluation.xyz_paths = [p.replace(".png", ".tiff") for p in evaluation.rgb_paths]
    rows = per_sample_rows(evaluation, lambda score: score > 1.0, 1.0)
    assert [r["result"] for r in rows] == ["pass", "fail", "fail"]
    assert [(r["class"], r["split"], r["defect_type"], r["stem"]) for r in rows][1] == ("gadget", "test", "dent", "000")
    assert [r["map_max"] for r in rows] == [float(m.max()) for m in evaluation.maps]
    assert [r["xyz_path"] for r in rows] == evaluation.xyz_paths
    plain = per_sample_rows(evaluation)
    assert {r["result"] for r in plain} == {r["image_threshold"] for r in plain} == {None}
    paths = write_per_sample(tmp_path / "out", rows + plain)
    with open(paths["per_sample_csv"], newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["map_mean"]) for r in table] == [r["map_mean"] for r in rows + plain]  # floats written exactly
    assert [r["result"] for r in table] == ["pass", "fail", "fail", "", "", ""]
    assert json.loads(paths["per_sample_json"].read_text()) == [{k: r[k] for k in PER_SAMPLE_FIELDS}
                                                                for r in rows + plain]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["per_sample.csv", "per_sample.json"]
