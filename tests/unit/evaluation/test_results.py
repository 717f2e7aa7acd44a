"""The files written from a class's evaluation: the --save_maps archive and the --save_preds pictures."""

import numpy as np
from PIL import Image

from m3dm.data.io import write_png
from m3dm.evaluation.results import ClassResult, save_prediction_pictures, save_score_maps


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
