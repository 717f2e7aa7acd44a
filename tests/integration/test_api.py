"""The Python API end to end on synthetic data (tiny timm ViT, small point groups, random weights): every method
fits, evaluates, saves, loads and scores parts from files and arrays through the same calls; ``m3dm.fit`` gives
``main.py --save_model``'s scores bit for bit; a run's ``config.yaml`` repeats the run. All ``slow``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import evaluate_in_process, preprocessed_mvtec
from PIL import Image

import m3dm

pytestmark = pytest.mark.slow

SMALL = {"rgb_backbone_name": "vit_tiny_patch16_224", "num_group": 32, "group_size": 16, "random_init": True,
         "device": "cpu"}
METHOD_SETTINGS = {
    "DINO": {}, "Point_MAE": {}, "DINO+Point_MAE": {}, "DINO+Point_MAE+add": {}, "Fusion": {"use_uff": True},
    "DINO+Point_MAE+Fusion": {"use_uff": True}, "BTF_RGB": {}, "BTF_FPFH": {}, "BTF_RGB+FPFH": {},
    "CFM": {"cfm_epochs": 1, "cfm_batch_size": 2, "cfm_train_samples": 2},
    "G2SF": {"num_anomalies": 3, "max_epoch": 2, "n_hidden": "16", "emb_dim": 8},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return preprocessed_mvtec(tmp_path_factory.mktemp("api"), n_train=3, n_val=1, n_test_good=1, n_test_defect=1)


def first_test_part(dataset: Path) -> tuple[Path, Path]:
    good = dataset / "gadget" / "test" / "good"
    stem = sorted(p.stem for p in (good / "rgb").glob("*.png"))[0]
    return good / "rgb" / f"{stem}.png", good / "xyz" / f"{stem}.tiff"


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_every_method_fits_saves_loads_and_scores_through_the_api(dataset, uff_checkpoint, tmp_path, method):
    extra = dict(METHOD_SETTINGS[method])
    if extra.get("use_uff"):
        extra["fusion_module_path"] = str(uff_checkpoint)
    # eval-mode point backbone: a part's score is its own, whatever was scored before it
    model = m3dm.fit(dataset / "gadget", method=method, backbone_eval=True, **SMALL, **extra)
    assert (model.method, model.class_name) == (method, "gadget")
    rgb, xyz = first_test_part(dataset)
    fitted = model.predict(rgb, xyz)
    assert fitted.anomaly_map.shape == (224, 224) and np.isfinite(fitted.score)
    assert fitted.anomalous == model.thresholds.fails(fitted.score) and 0.0 <= fitted.normalised_score <= 1.0
    assert fitted.result == ("fail" if fitted.anomalous else "pass")

    loaded = m3dm.load(model.save(tmp_path / "models" / "gadget.pt"), device="cpu")
    assert loaded.settings.detector == model.settings.detector and loaded.thresholds == model.thresholds
    evaluation = loaded.evaluate()
    assert set(evaluation.metrics) >= {"image_rocauc", "pixel_rocauc", "au_pro"}
    assert evaluation.maps.shape == (len(evaluation.names), 224, 224) and np.isfinite(evaluation.scores).all()
    assert list(evaluation.anomalous) == [model.thresholds.fails(s) for s in evaluation.scores]
    index = evaluation.names.index(f"gadget/test/good/{rgb.stem}")
    # the fitted model's prediction is the saved and loaded one's evaluation of the same part
    assert fitted.score == evaluation.scores[index] and np.array_equal(fitted.anomaly_map, evaluation.maps[index])
    from_arrays = loaded.predict(np.asarray(Image.open(rgb).convert("RGB")), tifffile.imread(xyz))
    assert from_arrays.score == fitted.score and np.array_equal(from_arrays.anomaly_map, fitted.anomaly_map)


def test_fit_scores_as_main_py_and_a_run_config_repeats_the_run(dataset, tmp_path):
    """main.py --save_model writes config.yaml; main.py --config with it, and m3dm.fit with it, give the same
    per-part scores and maps, bit for bit (training-mode point backbone, decision layer fusion: two passes)."""
    out = tmp_path / "main"
    flags = [f"--{name}" if value is True else f"--{name}={value}" for name, value in SMALL.items()]
    by_main = evaluate_in_process(["--dataset_path", str(dataset), "--output_dir", str(out), *flags, "--method_name",
                                   "DINO+Point_MAE", "--memory_bank", "multiple", "--save_model", "-q"])
    config = out / "config.yaml"
    rerun = evaluate_in_process(["--config", str(config), "--output_dir", str(tmp_path / "again"), "-q"])
    assert rerun.names == by_main.names
    assert np.array_equal(rerun.image_scores, by_main.image_scores) and np.array_equal(rerun.maps, by_main.maps)
    assert (tmp_path / "again" / "config.yaml").read_text() == config.read_text().replace(
        f"output_dir: {out}", f"output_dir: {tmp_path / 'again'}")

    evaluation = m3dm.fit(dataset, class_name="gadget", config=config).evaluate()
    assert evaluation.names == by_main.names
    assert np.array_equal(evaluation.scores, by_main.image_scores) and np.array_equal(evaluation.maps, by_main.maps)
    assert evaluation.metrics == by_main.metrics
