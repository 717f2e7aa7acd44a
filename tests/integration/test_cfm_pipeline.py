"""CFM end to end through main.py on synthetic data (tiny timm ViT, random weights, 1 training epoch): fit with
the few-shot setting, --save_model and --save_preds; --load_model scores bit-identically; ``m3dm.predict`` on the
test parts with the saved model gives the in-process scores and maps. Every test here is ``slow`` (the mappings
run on every valid pixel of the 224 x 224 grid)."""

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import evaluate_in_process, preprocessed_mvtec

from m3dm.app import predict
from m3dm.detection.persistence import load_class_model

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "32", "--group_size", "16",
         "--random_init", "--device", "cpu", "--backbone_eval"]
CFM = ["--method_name", "CFM", "--cfm_epochs", "1", "--cfm_batch_size", "2", "--cfm_train_samples", "2"]

pytestmark = pytest.mark.slow


def run_main(dataset: Path, out: Path, *extra: str, forbid_fit: bool = False):
    """main.py in-process; returns the ClassResult of the evaluated class."""
    return evaluate_in_process(["--dataset_path", str(dataset), "--output_dir", str(out), *SMALL, *CFM, *extra],
                               forbid_fit=forbid_fit)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return preprocessed_mvtec(tmp_path_factory.mktemp("cfm"), n_train=3, n_val=1, n_test_good=1, n_test_defect=1)


@pytest.fixture(scope="module")
def fitted(dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cfm_fit")
    result = run_main(dataset, out, "--save_model", "--save_preds")
    return {"out": out, "model": out / "models" / "gadget.pt", "result": result}


def test_fit_trains_on_the_few_shot_samples_and_saves_the_mappings(fitted):
    result = fitted["result"]
    assert result.maps.shape == (len(result.names), 224, 224) and result.maps.dtype == np.float32
    assert np.isfinite(result.image_scores).all() and (result.maps >= 0).all()
    assert set(result.metrics) >= {"image_rocauc", "pixel_rocauc", "au_pro", "au_pro_0.1", "au_pro_0.05", "au_pro_0.01"}
    assert result.pro_curve[0].shape == (99 + 1,)  # CFM's reference's 99 thresholds, and the point (1, 1)
    model = load_class_model(fitted["model"], "CFM", class_name="gadget")
    state = model.detector_state
    assert state["n_train"] == 2 and len(state["losses"]) == 1
    assert state["rgb_to_xyz"]["input.weight"].shape == ((192 + 1152) // 2, 192)  # vit_tiny: 192-d features
    assert model.config["cfm_train_samples"] == 2 and model.config["cfm_epochs"] == 1
    pictures = sorted((fitted["out"] / "pred_maps" / "gadget").rglob("*.png"))
    assert len(pictures) == len(result.names)


def test_loaded_model_scores_bit_identically(dataset, fitted, tmp_path):
    loaded = run_main(dataset, fitted["out"], "--load_model", forbid_fit=True)
    expected = fitted["result"]
    assert np.array_equal(loaded.image_scores, expected.image_scores)
    assert np.array_equal(loaded.maps, expected.maps)
    assert loaded.metrics == expected.metrics


def test_predict_on_the_test_parts_gives_the_in_process_scores(dataset, fitted, tmp_path):
    out = tmp_path / "pred"
    argv = ["--model", str(fitted["model"]), str(dataset / "gadget" / "test"), "--output", str(out),
            "--batch_size", "2", "--save_maps", "--quiet"]
    assert predict.main(argv) == 0
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = fitted["result"]
    assert [r["name"] for r in rows] == ["test/" + n.split("/", 2)[2] for n in expected.names]
    assert np.array_equal(np.array([float(r["image_score"]) for r in rows]), expected.image_scores)
    assert np.array_equal(np.stack([np.load(r["map"]) for r in rows]), expected.maps)
