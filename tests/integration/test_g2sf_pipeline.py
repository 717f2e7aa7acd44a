"""G2SF end to end through main.py on synthetic data (tiny timm ViT, random weights, a few pseudo-anomalies, two
LSPN epochs): fit with --save_model and --save_preds; the same seed fits the same detector; --load_model scores
bit-identically; ``m3dm.predict`` with the saved model gives the in-process scores and maps; a run interrupted
after its first class resumes to the scores of an uninterrupted run; the comparison report shows G2SF beside M3DM
on the same data. Every test here is ``slow`` (pseudo-anomalies,
their features and the LSPN training)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import evaluate_in_process, preprocessed_mvtec

from m3dm.app import predict
from m3dm.app.run import ClassRun
from m3dm.detection.persistence import load_class_model
from m3dm.report import build_report

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "32", "--group_size", "16",
         "--random_init", "--device", "cpu", "--backbone_eval"]
G2SF = ["--method_name", "G2SF", "--num_anomalies", "3", "--max_epoch", "2", "--n_hidden", "16", "--emb_dim", "8"]

pytestmark = pytest.mark.slow


def run_main(dataset: Path, out: Path, *extra: str, forbid_fit: bool = False):
    """main.py in-process; returns the ClassResult of the evaluated class."""
    return evaluate_in_process(["--dataset_path", str(dataset), "--output_dir", str(out), *SMALL, *G2SF, *extra],
                               forbid_fit=forbid_fit)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return preprocessed_mvtec(tmp_path_factory.mktemp("g2sf"), n_train=3, n_val=1, n_test_good=1, n_test_defect=1)


@pytest.fixture(scope="module")
def fitted(dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("g2sf_fit")
    result = run_main(dataset, out, "--save_model", "--save_preds")
    return {"out": out, "model": out / "models" / "gadget.pt", "result": result}


def test_fit_trains_the_lspn_on_pseudo_anomalies_and_saves_it(fitted):
    result = fitted["result"]
    assert result.maps.shape == (len(result.names), 224, 224) and result.maps.dtype == np.float32
    assert np.isfinite(result.image_scores).all() and (result.maps >= 0).all()
    assert set(result.metrics) >= {"image_rocauc", "pixel_rocauc", "au_pro", "au_pro_0.01"}
    model = load_class_model(fitted["model"], "G2SF", class_name="gadget")
    state = model.detector_state
    assert state["family"] == "g2sf" and len(state["losses"]) == 2 and state["best_epoch"] == 1
    assert state["net"]["encoding_branch.0.weight"].shape == (16, 192 + 1152)  # vit_tiny: 192-d features
    banks = state["banks"]
    assert banks["rgb"]["mean"] is not None and banks["xyz"]["mean"] is None  # RGB normalised, points as they are
    assert banks["rgb"]["bank"].shape[0] == int(0.1 * 3 * 14 * 14)  # 3 training parts, 14 x 14 RGB patches each
    assert model.config["num_anomalies"] == 3 and model.config["scoring_mode"] == "min"
    pictures = sorted((fitted["out"] / "pred_maps" / "gadget").rglob("*.png"))
    assert len(pictures) == len(result.names)


def test_the_same_seed_fits_the_same_detector(dataset, fitted, tmp_path):
    again = run_main(dataset, tmp_path / "again", "--save_model")
    expected = fitted["result"]
    assert np.array_equal(again.image_scores, expected.image_scores)
    assert np.array_equal(again.maps, expected.maps)
    first = load_class_model(fitted["model"], "G2SF", class_name="gadget").detector_state
    second = load_class_model(tmp_path / "again" / "models" / "gadget.pt", "G2SF", class_name="gadget").detector_state
    assert all(torch.equal(first["net"][k], second["net"][k]) for k in first["net"])


def test_loaded_model_scores_bit_identically(dataset, fitted):
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


def test_the_comparison_report_shows_g2sf_beside_m3dm_on_the_same_data(dataset, fitted, tmp_path):
    m3dm = tmp_path / "m3dm"
    evaluate_in_process(["--dataset_path", str(dataset), "--output_dir", str(m3dm), *SMALL, "--method_name",
                         "DINO+Point_MAE", "-q"])
    page = build_report([m3dm, fitted["out"]], tmp_path / "comparison.html").read_text()
    for metric in ("image_rocauc", "pixel_rocauc", "au_pro"):  # a delta cell of G2SF against M3DM per metric
        assert f'data-metric="{metric}" data-class="gadget" data-run="G2SF"' in page
    assert "<th>class</th><th>DINO+Point_MAE</th><th>G2SF</th>" in page  # M3DM the reference column


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    return preprocessed_mvtec(tmp_path_factory.mktemp("g2sf_two"), classes=("gadget", "widget"), n_train=3,
                              n_val=1, n_test_good=1, n_test_defect=1)


def test_a_run_interrupted_after_one_class_resumes_to_the_scores_of_an_uninterrupted_run(two_classes, tmp_path):
    import main as main_module

    def argv(out: Path) -> list[str]:
        return ["--dataset_path", str(two_classes), "--output_dir", str(out), *SMALL, *G2SF, "-q"]

    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main_module.main(argv(whole)) == 0
    fit = ClassRun.fit

    def ctrl_c_in_the_second_class(self):
        if self.class_name == "widget":
            raise KeyboardInterrupt
        fit(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClassRun, "fit", ctrl_c_in_the_second_class)
        assert main_module.main(argv(out)) == 130
    kept = (out / "classes" / "gadget.json").read_bytes()
    assert not (out / "classes" / "widget.json").exists() and not (out / "results.json").exists()
    assert main_module.main([*argv(out), "--resume"]) == 0
    assert (out / "classes" / "gadget.json").read_bytes() == kept  # skipped, not run again
    for name in ("gadget", "widget"):
        resumed = json.loads((out / "classes" / f"{name}.json").read_text())
        expected = json.loads((whole / "classes" / f"{name}.json").read_text())
        assert resumed["samples"] == expected["samples"] and resumed["metrics"] == expected["metrics"]
    per_class = json.loads((out / "results.json").read_text())["per_class"]
    assert per_class == json.loads((whole / "results.json").read_text())["per_class"]
