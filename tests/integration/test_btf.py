"""The BTF methods end to end through main.py on synthetic data: fit, evaluate, --save_model / --load_model
(bit-identical), --save_preds, and m3dm.predict rebuilding the extractor from the model (FPFH has no weights; the
wide-ResNet has random weights in timm's layout here)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import preprocessed_mvtec

from m3dm.app import predict
from m3dm.app.cli import build_parser
from m3dm.app.run import ClassRun, run_classes
from m3dm.config import settings_from_flags

pytestmark = pytest.mark.slow
FLAGS = ["--memory_bank", "single", "--device", "cpu", "--random_init", "--batch_size", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return preprocessed_mvtec(tmp_path_factory.mktemp("btf"), n_train=3, n_val=1, n_test_good=1, n_test_defect=1)


def run_main(dataset: Path, out: Path, *extra: str):
    """main.py's run in this process; returns the ClassResult of the class."""
    results = []
    evaluate = ClassRun.evaluate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClassRun, "evaluate", lambda self: results.append(evaluate(self)) or results[-1])
        argv = ["--dataset_path", str(dataset), "--output_dir", str(out), *FLAGS, *extra]
        settings = settings_from_flags(build_parser().parse_args(argv))
        settings.validate()
        run_classes(settings, progress=False)
    (result,) = results
    return result


@pytest.mark.parametrize("method", ["BTF_FPFH", "BTF_RGB", "BTF_RGB+FPFH"])
def test_fit_save_load_predict(dataset, tmp_path, method):
    fit_dir, load_dir = tmp_path / "fit", tmp_path / "load"
    fitted = run_main(dataset, fit_dir, "--method_name", method, "--save_model", "--save_preds")
    assert (fit_dir / "results.json").is_file() and (fit_dir / "per_sample.csv").is_file()
    record = json.loads((fit_dir / "results.json").read_text())
    assert set(record["per_class"]["gadget"]) >= {"image_rocauc", "pixel_rocauc", "au_pro", "au_pro_0.01"}
    assert len(list((fit_dir / "pred_maps" / "gadget").rglob("*.png"))) == len(fitted.names)
    assert np.isfinite(fitted.image_scores).all() and fitted.maps.shape[1:] == (224, 224)

    loaded = run_main(dataset, load_dir, "--method_name", method, "--load_model", str(fit_dir / "models"))
    assert loaded.names == fitted.names
    assert np.array_equal(loaded.image_scores, fitted.image_scores)
    assert np.array_equal(loaded.maps, fitted.maps)

    out = tmp_path / "predict"
    argv = ["--model", str(fit_dir / "models" / "gadget.pt"), str(dataset / "gadget" / "test"), "--output",
            str(out), "--device", "cpu", "--quiet", "--no_pictures"]
    assert predict.main(argv) == 0
    with (out / "predictions.csv").open(newline="") as rows:
        predicted = sorted(float(row["image_score"]) for row in csv.DictReader(rows))
    np.testing.assert_allclose(predicted, sorted(fitted.image_scores), rtol=1e-6)


def test_fpfh_needs_no_weights_and_finds_the_synthetic_defects(dataset, tmp_path):
    result = run_main(dataset, tmp_path, "--method_name", "BTF_FPFH")
    model_flags = json.loads((tmp_path / "results.json").read_text())["config"]
    assert model_flags["method_name"] == "BTF_FPFH"
    assert result.metrics["pixel_rocauc"] > 0.8  # hand-crafted geometry sees the dents and bumps
