"""The detector on synthetic features: its state and its class-model file give bit-identical scores, the file
keeps format version 1's keys, and a file's missing keys read as their defaults."""

from __future__ import annotations

import pytest
import torch

from m3dm.config import DetectorSettings, Settings, recorded_defaults
from m3dm.detection.detector import MAP_SIZE, Detector, evenly_spaced
from m3dm.detection.persistence import (
    Setup,
    WeightRecord,
    load_class_model,
    make_setup,
    parameters_sha256,
    weight_record,
)
from m3dm.detection.thresholds import Thresholds
from m3dm.errors import ModelFileError
from m3dm.features.extractor import XYZ_PATCH_GRID, SampleFeatures

# the keys of format version 1 (before the settings were typed): files saved then must load now
V1_CONFIG_KEYS = {"method_name", "memory_bank", "f_coreset", "coreset_eps", "random_state", "asy_memory_bank",
                  "rm_zero_for_project", "ocsvm_nu", "ocsvm_maxiter", "lambdas", "fix_quirks", "coreset_fp16",
                  "coreset_shards"}
V1_SETTINGS_KEYS = {"img_size", "num_group", "group_size", "rgb_backbone_name", "xyz_backbone_name",
                    "backbone_eval", "fix_quirks", "seed", "precision", "use_uff", "max_sample", "dlf_reextract"}
# keys added since, which an older file lacks and reads as their defaults
ADDED_CONFIG_KEYS = {"cfm_epochs", "cfm_batch_size", "cfm_lr", "cfm_seed", "cfm_train_samples",
                     # G2SF's
                     "num_normal", "num_anomalies", "fusion_batch_size", "lr", "max_epoch", "emb_dim", "n_hidden",
                     "drop_out", "perc", "alpha", "anchor", "magnitude", "margin", "const", "perm", "scaling",
                     "scoring_mode", "l2", "l1",
                     # the bank search and the row cap
                     "bank_search", "bank_rows_per_sample",
                     # the approximate mode for large classes
                     "coreset_shard_rows", "fusion_samples"}
METHODS = [("DINO", "single"), ("Point_MAE", "single"), ("DINO+Point_MAE", "multiple"),
           ("DINO+Point_MAE+add", "single")]


def features(seed: int, rgb_dim: int = 8, xyz_dim: int = 16, grid: int = 28) -> SampleFeatures:
    """Random features of one sample, with some empty xyz patches as real clouds have."""
    generator = torch.Generator().manual_seed(seed)
    rgb_map = torch.rand(rgb_dim, grid, grid, generator=generator)
    xyz = torch.rand(XYZ_PATCH_GRID ** 2, xyz_dim, generator=generator)
    xyz[:200] = 0
    return SampleFeatures(rgb=rgb_map.flatten(1).T.contiguous(), rgb_map=rgb_map, xyz=xyz)


def fitted(settings: DetectorSettings, n_train: int = 3) -> Detector:
    detector = Detector(settings, progress=False)
    for index in range(n_train):
        detector.add(features(index))
    detector.finalize()
    if detector.uses_dlf:
        detector.fit_fusion([detector.modality_scores(detector.training_patches(i)) for i in range(n_train)])
    detector.release_training_samples()
    return detector


def predictions(detector: Detector, seeds=(10, 11)) -> list[tuple[float, torch.Tensor]]:
    return [detector.predict(detector.modality_patches(features(seed))) for seed in seeds]


def assert_same(a, b) -> None:
    for (score_a, map_a), (score_b, map_b) in zip(a, b, strict=True):
        assert score_a == score_b and torch.equal(map_a, map_b) and map_a.shape == (MAP_SIZE, MAP_SIZE)


def setup_of(settings: DetectorSettings, **recorded) -> Setup:
    return make_setup(settings.method_name, settings.to_record(), {**recorded_defaults(), **recorded}, {})


def small(method: str, bank: str, **changes) -> DetectorSettings:
    """Whole banks (no coreset): the state's layout is the same, and fitting takes a fraction of a second."""
    return DetectorSettings(method_name=method, memory_bank=bank, f_coreset=1.0, **changes)


@pytest.fixture(scope="module")
def detectors() -> dict[str, Detector]:
    return {method: fitted(small(method, bank)) for method, bank in METHODS}


@pytest.fixture(scope="module")
def expected(detectors) -> dict[str, list[tuple[float, torch.Tensor]]]:
    """Each fitted detector's predictions, computed once for the tests that compare a copy's with them."""
    return {method: predictions(detector) for method, detector in detectors.items()}


@pytest.mark.parametrize("method", [m for m, _ in METHODS])
def test_state_round_trip_scores_bit_identically(detectors, expected, method):
    detector = detectors[method]
    copy = Detector.from_state(detector.config, detector.to_state())
    assert_same(predictions(copy), expected[method])
    assert copy.n_train == detector.n_train == 3 and copy.rgb_grid == detector.rgb_grid == 28


@pytest.mark.parametrize("method", ["Point_MAE", "DINO+Point_MAE"])
def test_saved_file_loads_into_the_same_detector(detectors, expected, tmp_path, method):
    detector = detectors[method]
    setup = setup_of(detector.config)
    thresholds = Thresholds.from_good_parts([0.5, 0.7], torch.rand(2, 4, 4).numpy(), source="test")
    path = detector.save(tmp_path / "gadget.pt", class_name="gadget", setup=setup, thresholds=thresholds,
                         rng_state=torch.Generator().manual_seed(3).get_state())
    model = load_class_model(path, method, class_name="gadget", setup=setup)
    assert_same(predictions(Detector.from_model(model)), expected[method])
    assert set(model.record["config"]) == V1_CONFIG_KEYS | ADDED_CONFIG_KEYS
    assert set(model.record["settings"]) == V1_SETTINGS_KEYS
    assert model.record["config"]["lambdas"] == {"xyz": [1.0, 1.0], "rgb": [0.1, 0.1], "fusion": [1.0, 1.0]}
    assert model.thresholds == thresholds
    assert torch.equal(model.generator_state, torch.Generator().manual_seed(3).get_state())
    with pytest.raises(ModelFileError, match="holds a model of class 'gadget', not 'widget'"):
        load_class_model(path, method, class_name="widget")


def test_faiss_search_scores_like_the_torch_search_to_rounding(detectors):
    detector = detectors["DINO+Point_MAE"]
    faiss = Detector.from_state(small("DINO+Point_MAE", "multiple", bank_search="faiss"), detector.to_state())
    patches = detector.modality_patches(features(10))
    expected, got = detector.modality_scores(patches), faiss.modality_scores(patches)
    for modality, score in got.items():
        assert score.score == pytest.approx(expected[modality].score, rel=1e-5)
        # the reference's blur quantises the map to 8 bits of its peak (the largest patch distance) before
        # blurring: rounding may move a pixel one level
        peak = float(detector.banks[modality].score(patches[modality])[1].max())
        assert float((score.score_map - expected[modality].score_map).abs().max()) <= 1.01 * peak / 255


def test_approximate_options_fit_and_score(detectors):
    exact = detectors["Point_MAE"]
    approximate = fitted(small("Point_MAE", "single", bank_search="hnsw", bank_rows_per_sample=500))
    assert approximate.banks["xyz"].rows == 3 * 500 < exact.banks["xyz"].rows
    for score, score_map in predictions(approximate):
        assert score > 0 and score_map.shape == (MAP_SIZE, MAP_SIZE) and bool(torch.isfinite(score_map).all())
    # a subset of the rows, searched approximately: no patch nearer than its nearest row of the whole bank (to the
    # rounding of the exact search's |x|^2 + |y|^2 - 2 x.y)
    patches = approximate.banks["xyz"].normalise(features(10).xyz)
    got = approximate.banks["xyz"].score(features(10).xyz)[1].square()
    nearest = exact.banks["xyz"].score(features(10).xyz)[1].square()
    rounding = 1e-5 * (patches.square().sum(dim=1) + exact.banks["xyz"].bank.square().sum(dim=1).max())
    assert bool((got >= nearest - rounding).all()) and bool((got > nearest + rounding).any())


def test_pass_2_scores_every_training_sample_or_fusion_samples_of_them_evenly_spaced():
    assert evenly_spaced(7, None) == evenly_spaced(7, 7) == evenly_spaced(7, 9) == list(range(7))
    assert evenly_spaced(10, 4) == [0, 3, 6, 9] and evenly_spaced(10, 1) == [0]
    assert len(set(evenly_spaced(1000, 999))) == 999
    detector = Detector(small("DINO+Point_MAE", "multiple", fusion_samples=2), progress=False)
    detector.n_train = 5
    assert detector.fusion_samples() == [0, 4]


def test_record_layout_is_that_of_version_1():
    assert set(DetectorSettings().to_record()) == V1_CONFIG_KEYS | ADDED_CONFIG_KEYS
    assert set(Settings().recorded()) == V1_SETTINGS_KEYS == set(recorded_defaults())


def test_keys_missing_from_an_older_file_read_as_their_defaults(detectors, expected, tmp_path):
    detector = detectors["Point_MAE"]
    older = setup_of(detector.config)
    del older.config["coreset_shards"], older.settings["dlf_reextract"]
    path = detector.save(tmp_path / "gadget.pt", class_name="gadget", setup=older)
    model = load_class_model(path, setup=setup_of(detector.config))  # today's defaults: accepted
    assert model.detector_settings == detector.config and model.settings["dlf_reextract"] is False
    assert_same(predictions(Detector.from_model(model)), expected["Point_MAE"])
    with pytest.raises(ModelFileError, match=r"dlf_reextract: the model has False, this run True"):
        load_class_model(path, setup=setup_of(detector.config, dlf_reextract=True))
    other = setup_of(small("Point_MAE", "single", coreset_shards=2))
    with pytest.raises(ModelFileError, match=r"coreset_shards: the model has 1, this run 2"):
        load_class_model(path, setup=other)


def test_a_detector_of_another_method_is_refused(detectors, tmp_path):
    detector = detectors["DINO"]
    path = detector.save(tmp_path / "gadget.pt", class_name="gadget", setup=setup_of(detector.config))
    with pytest.raises(ModelFileError, match=r"holds a DINO model, but Point_MAE was asked for"):
        load_class_model(path, "Point_MAE")


def test_weight_records_are_saved_as_the_plain_dicts_of_version_1(detectors, tmp_path):
    detector = detectors["Point_MAE"]
    module = torch.nn.Linear(3, 2)
    checkpoint = tmp_path / "point.pth"
    checkpoint.write_bytes(b"weights")
    records = {"xyz": weight_record(module, "Point_MAE", 0, checkpoint),
               "rgb": weight_record(module, "vit_base_patch8_224_dino", 7, None)}
    setup = make_setup(detector.config.method_name, detector.config.to_record(), recorded_defaults(), records)
    path = detector.save(tmp_path / "gadget.pt", class_name="gadget", setup=setup)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    parameters = parameters_sha256(module)
    # the layout files had before the records were typed: they load as records, and compare equal
    assert raw["weights"] == {
        "xyz": {"name": "Point_MAE", "source": "file", "path": str(checkpoint.resolve()),
                "sha256": records["xyz"].sha256, "seed": None, "parameters_sha256": parameters},
        "rgb": {"name": "vit_base_patch8_224_dino", "source": "random", "path": None, "sha256": None, "seed": 7,
                "parameters_sha256": parameters}}
    model = load_class_model(path, setup=setup)
    assert model.weights == records and model.weights["xyz"].from_file and not model.weights["rgb"].from_file
    assert isinstance(model.setup.weights["rgb"], WeightRecord)
    other = make_setup(detector.config.method_name, detector.config.to_record(), recorded_defaults(),
                       {**records, "rgb": weight_record(torch.nn.Linear(3, 2), "vit_base_patch8_224_dino", 8, None)})
    with pytest.raises(ModelFileError, match="RGB backbone: the random weights rebuilt from seed 8"):
        load_class_model(path, setup=other)
