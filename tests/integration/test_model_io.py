"""Saved class models: bit-identical scores after loading, and refusal of damaged or mismatched files.

Small configuration of test_pipeline.py (tiny timm ViT, 64 groups of 32 points) on synthetic data. Two models
are fitted once per module with ``main.py --save_model`` (the tests using them are ``slow``): DINO+Point_MAE
(decision layer fusion, random weights, the reference's training-mode point backbone) and Point_MAE (single
bank, point weights from a file).
"""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import preprocessed_mvtec

from m3dm.app.cli import build_parser
from m3dm.app.run import ClassRun, run_classes
from m3dm.config import settings_from_flags
from m3dm.data.synthetic import write_mvtec3d
from m3dm.detection.detector import Detector
from m3dm.detection.persistence import content_sha256, load_class_model
from m3dm.detection.thresholds import choose_threshold_samples, false_alarm_threshold
from m3dm.errors import ModelFileError
from m3dm.features.point_transformer import PointTransformer

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "64", "--group_size", "32",
         "--random_init", "--device", "cpu", "--batch_size", "2"]
DLF = ["--method_name", "DINO+Point_MAE", "--memory_bank", "multiple"]
POINT = ["--method_name", "Point_MAE", "--memory_bank", "single"]


def point_mae_file(path: Path, seed: int) -> Path:
    """Point-MAE weights in the official layout (``base_model`` / ``MAE_encoder.*``), freshly initialised."""
    torch.manual_seed(seed)
    state = PointTransformer("Point_MAE", num_group=64, group_size=32).state_dict()
    torch.save({"base_model": {f"MAE_encoder.{k}": v for k, v in state.items()}}, path)
    return path


def run_main(dataset: Path, out: Path, *extra: str, forbid_fit: bool = False):
    """main.py in-process; returns the ClassResult of each evaluated class (captured from ClassRun)."""
    results = []
    evaluate = ClassRun.evaluate

    def capture(self):
        results.append(evaluate(self))
        return results[-1]

    def no_fit(self):
        raise AssertionError("--load_model must not fit")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClassRun, "evaluate", capture)
        if forbid_fit:
            patch.setattr(ClassRun, "fit", no_fit)
        argv = ["--dataset_path", str(dataset), "--output_dir", str(out), *SMALL, *extra]
        settings = settings_from_flags(build_parser().parse_args(argv))
        settings.validate()
        run_classes(settings, progress=False)  # main.py's own flow, with errors raised (main.py exits 2 on them)
    return results


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return preprocessed_mvtec(tmp_path_factory.mktemp("model_io"), n_train=5, n_val=2, n_test_good=2, n_test_defect=1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return point_mae_file(tmp_path_factory.mktemp("weights") / "pointmae.pth", seed=11)


@pytest.fixture(scope="module")
def fitted(dataset, weights, tmp_path_factory) -> dict:
    """Both models fitted and saved, with their in-process evaluation."""
    cases = {"dlf": DLF, "point": [*POINT, "--xyz_checkpoint", str(weights)]}
    fitted = {}
    for name, flags in cases.items():
        out = tmp_path_factory.mktemp(f"fit_{name}")
        (result,) = run_main(dataset, out, *flags, "--save_model")
        fitted[name] = {"out": out, "flags": flags, "result": result, "model": out / "models" / "gadget.pt"}
    return fitted


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dlf", "point"])
def test_loaded_model_scores_are_bit_identical(dataset, fitted, tmp_path, case):
    saved = fitted[case]
    (loaded,) = run_main(dataset, tmp_path, *saved["flags"], "--load_model", str(saved["out"] / "models"),
                         forbid_fit=True)
    expected = saved["result"]
    assert loaded.names == expected.names
    assert np.array_equal(loaded.image_scores, expected.image_scores)
    assert np.array_equal(loaded.maps, expected.maps)
    assert loaded.metrics == expected.metrics


@pytest.mark.slow
def test_model_file_holds_plain_tensors_and_the_fitted_arrays(fitted):
    record = torch.load(fitted["dlf"]["model"], map_location="cpu", weights_only=True)
    assert record["format"] == "m3dm-class-model" and record["method_name"] == "DINO+Point_MAE"
    assert record["weights"]["rgb"]["source"] == "random" and record["weights"]["rgb"]["seed"] == 0
    banks = record["detector"]["banks"]
    assert set(banks) == {"xyz", "rgb"} and banks["xyz"]["bank"].dtype == torch.float32
    # DINO+Point_MAE normalises every bank with (mean of xyz, std of rgb): the same two scalars are stored
    assert torch.equal(banks["xyz"]["mean"], banks["rgb"]["mean"]) and torch.equal(banks["xyz"]["std"],
                                                                                  banks["rgb"]["std"])
    # the loaded DLF scores are the plain x . coef_ (score_samples of the rebuilt SVM)
    model = load_class_model(fitted["dlf"]["model"])
    detector = Detector.from_model(model)
    coef = record["detector"]["dlf"]["fusers"]["detect_fuser"]["coef"].numpy().ravel()
    vectors = np.abs(np.random.default_rng(0).normal(size=(7, 2)))
    assert np.allclose(detector.dlf.score_image(vectors), vectors @ coef, rtol=1e-12, atol=0)
    thresholds = model.thresholds
    assert thresholds.source.startswith("validation/good") and thresholds.n_parts == 2
    assert thresholds.image == max(thresholds.good_image_scores)  # 2 parts < 1 / far: their maximum


def records_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(records_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(records_equal, a, b))
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


@pytest.mark.slow
def test_changed_bytes_are_refused(fitted, tmp_path):
    source = fitted["point"]["model"]
    data = bytearray(source.read_bytes())
    original = torch.load(source, map_location="cpu", weights_only=True)
    bank = original["detector"]["banks"]["xyz"]["bank"]
    start = bytes(data).find(bank[0].numpy().tobytes())
    assert start > 0
    tampered = tmp_path / "gadget.pt"
    changed = bytearray(data)
    changed[start + 5] ^= 0x40
    tampered.write_bytes(changed)
    with pytest.raises(ModelFileError, match=f"{tampered}.*checksum"):
        load_class_model(tampered)
    # any single changed byte: refused, or (bytes the loader ignores, e.g. zip padding) the content is unchanged
    for position in np.linspace(0, len(data) - 1, 25).astype(int):
        changed = bytearray(data)
        changed[position] ^= 0xFF
        tampered.write_bytes(changed)
        try:
            loaded = load_class_model(tampered)
        except ModelFileError as error:
            assert str(tampered) in str(error)
            continue
        assert records_equal({**loaded.record, "content_sha256": original["content_sha256"]}, original), position


@pytest.mark.slow
def test_truncated_or_foreign_files_are_refused(fitted, tmp_path):
    data = fitted["point"]["model"].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=f"{truncated}.*corrupt or truncated"):
        load_class_model(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(ModelFileError, match="not an m3dm class model"):
        load_class_model(foreign)
    with pytest.raises(ModelFileError, match="not found"):
        load_class_model(tmp_path / "absent.pt")


@pytest.mark.slow
def test_other_format_version_is_refused(fitted, tmp_path):
    record = torch.load(fitted["point"]["model"], map_location="cpu", weights_only=True)
    record.pop("content_sha256")
    record["format_version"] = 99
    record["content_sha256"] = content_sha256(record)
    path = tmp_path / "future.pt"
    torch.save(record, path)
    with pytest.raises(ModelFileError, match=f"{path}.*format version 99"):
        load_class_model(path)


@pytest.mark.slow
def test_model_of_another_method_is_refused(dataset, fitted, tmp_path):
    folder = str(fitted["dlf"]["out"] / "models")
    with pytest.raises(ModelFileError, match=r"holds a DINO\+Point_MAE model, but Point_MAE was asked for"):
        run_main(dataset, tmp_path, *POINT, "--load_model", folder, forbid_fit=True)
    with pytest.raises(ModelFileError, match="holds a DINO"):
        load_class_model(fitted["dlf"]["model"], "DINO")


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--rgb_backbone_name", "vit_small_patch16_224"], "rgb_backbone_name: the model has 'vit_tiny_patch16_224'"),
    (["--group_size", "16"], "group_size"),
    (["--backbone_eval"], "backbone_eval"),
    (["--seed", "1"], "seed"),
])
def test_model_fitted_with_other_settings_is_refused(dataset, fitted, tmp_path, flags, message):
    with pytest.raises(ModelFileError, match=message):
        run_main(dataset, tmp_path, *DLF, *flags, "--load_model", str(fitted["dlf"]["out"] / "models"),
                 forbid_fit=True)


@pytest.mark.slow
def test_other_weight_file_is_refused(dataset, fitted, tmp_path):
    folder = str(fitted["point"]["out"] / "models")
    other = point_mae_file(tmp_path / "other.pth", seed=12)
    with pytest.raises(ModelFileError, match=f"weight file {other.resolve()} has SHA-256"):
        run_main(dataset, tmp_path, *POINT, "--xyz_checkpoint", str(other), "--load_model", folder, forbid_fit=True)
    with pytest.raises(ModelFileError, match=r"point backbone: the model was fitted with weight file .* this run "
                                             r"uses RANDOM weights"):
        run_main(dataset, tmp_path, *POINT, "--load_model", folder, forbid_fit=True)


@pytest.mark.slow
def test_same_weights_under_another_path_are_accepted(dataset, fitted, weights, tmp_path):
    moved = shutil.copy(weights, tmp_path / "moved.pth")
    (loaded,) = run_main(dataset, tmp_path, *POINT, "--xyz_checkpoint", str(moved), "--load_model",
                         str(fitted["point"]["out"] / "models"), forbid_fit=True)
    assert np.array_equal(loaded.image_scores, fitted["point"]["result"].image_scores)


def test_false_alarm_threshold_against_brute_force():
    rng = np.random.default_rng(3)
    for n, far in [(1, 0.01), (7, 0.01), (100, 0.01), (250, 0.05), (40, 0.0), (13, 0.2)]:
        values = np.round(rng.normal(size=n), 1)  # ties included
        threshold = false_alarm_threshold(values, far)
        # brute force: the smallest observed value with at most a fraction `far` of the values above it
        allowed = [v for v in sorted(set(values)) if np.sum(values > v) <= far * n + 1e-9]
        assert threshold == allowed[0]


def test_without_validation_split_the_last_training_samples_are_held_out(tmp_path):
    raw = write_mvtec3d(tmp_path / "raw", classes=("gadget",), size=96, n_train=12, n_val=0, n_test_good=1,
                        n_test_defect=0, progress=False)
    chosen = choose_threshold_samples(raw, "gadget", train_cap=401)
    assert chosen.split == "train" and chosen.indices == (10, 11) and chosen.train_limit == 10
    beyond_cap = choose_threshold_samples(raw, "gadget", train_cap=5)
    assert beyond_cap.indices == (10, 11) and beyond_cap.train_limit is None


@pytest.mark.slow
def test_save_model_without_validation_split_fits_on_the_rest(tmp_path):
    dataset = preprocessed_mvtec(tmp_path, n_train=4, n_val=0, n_test_good=1, n_test_defect=1)
    run_main(dataset, tmp_path / "out", "--method_name", "DINO", "--memory_bank", "single", "--save_model")
    model = load_class_model(tmp_path / "out" / "models" / "gadget.pt", "DINO")
    assert model.record["detector"]["n_train"] == 3  # the 4th training sample set the thresholds
    assert model.thresholds.n_parts == 1 and "held out" in model.thresholds.source
