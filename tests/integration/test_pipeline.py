"""End to end on synthetic data: every method localises the defects it can see and scores the same after saving
and reloading; reproducibility, pass-2 reuse, options, flag validation, outputs and clear errors.

Small configuration (a tiny timm ViT, 64 groups of 32 points, random weights). The runs that fit are ``slow``;
flag validation and the input errors are in the quick tier.
"""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import preprocessed_mvtec

import main as main_module
from m3dm.app.cli import build_parser
from m3dm.config import settings_from_flags
from m3dm.data.dataset import AnomalyDataset
from m3dm.detection.detector import Detector
from m3dm.evaluation.metrics import pixel_auroc

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "64", "--group_size", "32",
         "--random_init", "--device", "cpu", "--batch_size", "2", "-q"]
UFF = ["--use_uff"]  # with --fusion_module_path <the fixture's checkpoint>
METHODS = {"DINO": "single", "Point_MAE": "single", "DINO+Point_MAE": "multiple", "DINO+Point_MAE+add": "single",
           "Fusion": "single", "DINO+Point_MAE+Fusion": "multiple"}
GEOMETRIC, COLOUR = ("dent", "bump", "combined"), ("color", "combined")
# Pixel AUROC over the good parts and the defects a method can see (the RGB-only DINO sees no dent or bump, yet
# Point_MAE sees the colour defects: they come with a change of shape in m3dm.data.synthetic). Measured with this
# data and these random weights: DINO 0.94, Point_MAE 0.92, DINO+Point_MAE 0.91, DINO+Point_MAE+add 0.90,
# Fusion 0.87, DINO+Point_MAE+Fusion 0.89; chance is 0.5.
LOCALISATION = {"DINO": (COLOUR, 0.85), "Point_MAE": (GEOMETRIC, 0.85), "DINO+Point_MAE": (None, 0.85),
                "DINO+Point_MAE+add": (None, 0.85), "Fusion": (None, 0.8), "DINO+Point_MAE+Fusion": (None, 0.83)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return preprocessed_mvtec(tmp_path_factory.mktemp("pipeline"), n_train=5, n_val=1, n_test_good=3, n_test_defect=2)


def run_main(dataset: Path, out: Path, *extra: str) -> dict:
    argv = ["--dataset_path", str(dataset), "--output_dir", str(out), *SMALL, *extra]
    assert main_module.main(argv) == 0
    return json.loads((out / "results.json").read_text())


def method_flags(method: str, uff_checkpoint: Path) -> list[str]:
    flags = ["--method_name", method, "--memory_bank", METHODS[method]]
    return flags + (["--use_uff", "--fusion_module_path", str(uff_checkpoint)] if "Fusion" in method else [])


def saved_maps(out: Path) -> dict:
    with np.load(out / "maps" / "gadget.npz") as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture(scope="module")
def fitted(dataset, uff_checkpoint, tmp_path_factory):
    """``fitted(method)``: the output folder of one ``--save_model --save_maps --save_preds`` run (made once)."""
    folders = {}

    def fit(method: str) -> Path:
        if method not in folders:
            out = tmp_path_factory.mktemp(f"fit_{method.replace('+', '_')}")
            run_main(dataset, out, *method_flags(method, uff_checkpoint), "--save_model", "--save_maps",
                     "--save_preds")
            folders[method] = out
        return folders[method]

    return fit


@pytest.fixture(scope="module")
def test_masks(dataset) -> tuple[list[str], np.ndarray]:
    test = AnomalyDataset(dataset, "gadget", "test")
    items = [test[i] for i in range(len(test))]
    return [item["name"] for item in items], np.stack([item["gt"][0].numpy() for item in items])


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_localises_the_defects_it_sees(fitted, test_masks, method):
    out = fitted(method)
    metrics = json.loads((out / "results.json").read_text())["per_class"]["gadget"]
    assert set(metrics) >= {"image_rocauc", "pixel_rocauc", "au_pro", "au_pro_0.01"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("image_rocauc", "pixel_rocauc", "au_pro"))
    maps = saved_maps(out)
    names, masks = test_masks
    assert list(maps["names"]) == names and maps["maps"].shape == (len(names), 224, 224)
    kinds, minimum = LOCALISATION[method]
    seen = [i for i, name in enumerate(names) if name.split("/")[2] == "good" or kinds is None
            or name.split("/")[2] in kinds]
    assert pixel_auroc(masks[seen], maps["maps"][seen]) > minimum
    if kinds is None:
        assert metrics["pixel_rocauc"] > minimum
    assert metrics["au_pro"] > 0.3  # a map of random values reaches about 0.15 (the area under FPR / 0.3)
    for name in ("image_rocauc_results.md", "pixel_rocauc_results.md", "au_pro_results.md"):
        table = (out / name).read_text()
        assert "Gadget" in table and "Mean" in table and "nan" not in table.lower()
    pictures = sorted((out / "pred_maps" / "gadget").rglob("*.png"))
    assert len(pictures) == 3 + 2 * 4  # one per test sample
    assert {p.parent.name for p in pictures} == {"good", "dent", "bump", "color", "combined"}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_scores_the_same_after_saving_and_reloading(dataset, uff_checkpoint, fitted, tmp_path,
                                                                 method):
    out = fitted(method)
    reloaded = run_main(dataset, tmp_path, *method_flags(method, uff_checkpoint), "--save_maps", "--load_model",
                        str(out / "models"))
    assert reloaded["per_class"] == json.loads((out / "results.json").read_text())["per_class"]
    before, after = saved_maps(out), saved_maps(tmp_path)
    for key in ("names", "labels", "image_scores", "maps"):
        assert np.array_equal(after[key], before[key]), key
    assert not (tmp_path / "models").exists()  # --load_model fits nothing and saves nothing


@pytest.mark.slow
def test_runs_are_reproducible_with_the_banks_on_disk_or_in_memory(dataset, uff_checkpoint, fitted, tmp_path):
    # the fitted run spools the training patches to disk (default), this one keeps them in memory
    again = run_main(dataset, tmp_path, *method_flags("DINO+Point_MAE", uff_checkpoint), "--bank_storage",
                     "memory", "--save_maps")
    first = fitted("DINO+Point_MAE")
    assert again["per_class"] == json.loads((first / "results.json").read_text())["per_class"]
    assert np.array_equal(saved_maps(tmp_path)["maps"], saved_maps(first)["maps"])


@pytest.mark.slow
def test_pass2_reuse_equals_reextraction_in_eval_mode(dataset, tmp_path):
    reused = run_main(dataset, tmp_path / "a", "--method_name", "DINO+Point_MAE", "--backbone_eval", "--save_maps")
    again = run_main(dataset, tmp_path / "b", "--method_name", "DINO+Point_MAE", "--backbone_eval",
                     "--dlf_reextract", "--save_maps")
    assert reused["per_class"] == again["per_class"]
    assert np.array_equal(saved_maps(tmp_path / "a")["maps"], saved_maps(tmp_path / "b")["maps"])


@pytest.mark.slow
def test_fix_quirks_changes_the_scores_and_still_localises(dataset, tmp_path, uff_checkpoint, fitted):
    record = run_main(dataset, tmp_path, *method_flags("DINO+Point_MAE+Fusion", uff_checkpoint), "--fix_quirks")
    metrics = record["per_class"]["gadget"]
    assert metrics != json.loads((fitted("DINO+Point_MAE+Fusion") / "results.json").read_text())["per_class"]["gadget"]
    assert metrics["pixel_rocauc"] > 0.8  # measured 0.89


@pytest.mark.parametrize("argv, message", [
    (["--method_name", "DINO+Point_MAE+Fusion"], "--use_uff"),
    (["--method_name", "DINO", "--memory_bank", "multiple"], "--memory_bank single"),
    (["--method_name", "DINO+Point_MAE", "--memory_bank", "single"], "DINO+Point_MAE+add"),
    (["--method_name", "DINO", "--memory_bank", "single", "--save_feature"], "--method_name DINO+Point_MAE"),
    (["--method_name", "Point_MAE", "--memory_bank", "single", "--asy_memory_bank", "3"], "DINO+Point_MAE+Fusion"),
    (["--method_name", "DINO", "--memory_bank", "single", "--img_size", "256"], "224"),
    (["--method_name", "DINO", "--memory_bank", "single", "--coreset_shards", "0"], "at least 1"),
    (["--method_name", "DINO+Point_MAE", "--coreset_shards", "2", "--coreset_shard_rows", "9"], "give one"),
    (["--method_name", "DINO+Point_MAE+add", "--memory_bank", "single", "--fusion_samples", "5"],
     "--memory_bank multiple"),
    (["--method_name", "Point_MAE", "--memory_bank", "single", "--use_uff"], "drop --use_uff"),
    (["--method_name", "DINO", "--memory_bank", "single", "--save_model", "--load_model"], "use one of them"),
])
def test_invalid_flag_combinations_are_refused(argv, message, capsys):
    settings = settings_from_flags(build_parser().parse_args(argv))
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        settings.validate()
    with pytest.raises(SystemExit) as exit_status:  # main.py: the usage message and what to use instead
        main_module.main(argv)
    assert exit_status.value.code == 2 and message in capsys.readouterr().err


def test_missing_uff_checkpoint_is_a_clear_error(dataset, tmp_path, capsys):
    argv = ["--dataset_path", str(dataset), "--output_dir", str(tmp_path), *SMALL, "--method_name", "Fusion",
            "--memory_bank", "single", "--use_uff", "--fusion_module_path", str(tmp_path / "nothing.pth")]
    assert main_module.main(argv) == 2
    message = capsys.readouterr().err
    assert "nothing.pth" in message and "does not exist" in message and "Traceback" not in message


def test_missing_dataset_class_is_a_clear_error(dataset, tmp_path, capsys):
    argv = ["--dataset_path", str(dataset), "--output_dir", str(tmp_path), *SMALL, "--method_name", "DINO",
            "--memory_bank", "single", "--classes", "no_such_class"]
    assert main_module.main(argv) == 2
    assert "no_such_class" in capsys.readouterr().err


class PassOneDone(Exception):
    """Raised where a fit goes on after its first pass over the training samples (``main_through_pass_one``)."""


def main_through_pass_one(argv: list[str]) -> None:
    """``main.py argv`` in this process, stopped where the first pass over the training samples ends, which is
    where ``--save_feature`` has written every dump: the banks' coreset, pass 2 and the evaluation, which the dumps
    do not depend on, are skipped."""

    def stop(self):
        raise PassOneDone

    with pytest.MonkeyPatch.context() as patch, pytest.raises(PassOneDone):
        patch.setattr(Detector, "finalize", stop)
        main_module.main(argv)


@pytest.mark.slow
def test_save_feature_dumps_reference_layout_and_aligned_layout(dataset, tmp_path):
    """One (3136, 1152 + C) tensor per training sample; RGB rows scrambled as the reference (quirk 20) by default,
    spatially aligned (2x nearest of the 28 x 28 token map) with --fix_quirks. ViT-S/8 gives the real 28 grid.
    The dumps are written in the first pass over the training samples: each run stops there."""
    dumps = {}
    for fix in (False, True):
        folder = tmp_path / f"patch_lib_{fix}"
        main_through_pass_one(["--dataset_path", str(dataset), "--output_dir", str(tmp_path / f"out_{fix}"), *SMALL,
                               "--method_name", "DINO+Point_MAE", "--save_feature", "--save_feature_path",
                               str(folder), "--max_sample", "2", "--rgb_backbone_name", "vit_small_patch8_224",
                               *(["--fix_quirks"] if fix else [])])
        files = sorted(folder.glob("*.pt"))
        assert [f.name for f in files] == [f"gadget{i}.pt" for i in range(2 if fix else 3)]  # max_sample + 1
        dumps[fix] = torch.load(files[0], weights_only=True)
        assert dumps[fix].shape == (56 * 56, 1152 + 384) and dumps[fix].dtype == torch.float32
    aligned = dumps[True][:, 1152:].reshape(56, 56, 384)
    assert torch.equal(aligned[0::2, 0::2], aligned[1::2, 1::2])  # each token fills a 2 x 2 block
    tokens = aligned[0::2, 0::2].reshape(784, 384)
    t = torch.arange(3136)
    assert torch.equal(dumps[False][:, 1152:], tokens[(4 * (t % 784) + t // 784) % 784])


@pytest.mark.slow
def test_asymmetric_memory_bank_and_zero_row_options(dataset, tmp_path, uff_checkpoint, fitted):
    """--asy_memory_bank keeps xyz and fusion banks to the first samples; --rm_zero_for_project drops empty
    patches of the Point_MAE bank. Both run end to end and change the numbers."""
    full = json.loads((fitted("DINO+Point_MAE+Fusion") / "results.json").read_text())
    asy = run_main(dataset, tmp_path / "asy", *method_flags("DINO+Point_MAE+Fusion", uff_checkpoint),
                   "--asy_memory_bank", "2")
    assert asy["per_class"] != full["per_class"]
    plain = json.loads((fitted("Point_MAE") / "results.json").read_text())
    no_zero = run_main(dataset, tmp_path / "no_zero", "--method_name", "Point_MAE", "--memory_bank", "single",
                       "--rm_zero_for_project")
    assert no_zero["per_class"] != plain["per_class"]


@pytest.mark.slow
def test_sharded_coreset_option_runs(dataset, tmp_path):
    record = run_main(dataset, tmp_path, "--method_name", "DINO+Point_MAE", "--coreset_shards", "3",
                      "--spool_dir", str(tmp_path / "spool"))
    assert record["per_class"]["gadget"]["pixel_rocauc"] > 0.75
    assert list((tmp_path / "spool").iterdir()) == []  # the spool file is anonymous and gone


@pytest.mark.slow
@pytest.mark.parametrize("method", ["DINO+Point_MAE", "DINO+Point_MAE+add"])
def test_faiss_search_gives_the_torch_search_metrics(dataset, uff_checkpoint, fitted, tmp_path, method):
    """--bank_search faiss: the distances equal to float32 rounding, so the image scores to 1e-4 and every metric
    to a few 1e-4 (measured: AU-PRO 0.66855 -> 0.66844; the 8-bit blur of the maps turns rounding into one level of
    a pixel now and then)."""
    exact = json.loads((fitted(method) / "results.json").read_text())["per_class"]["gadget"]
    faiss = run_main(dataset, tmp_path, *method_flags(method, uff_checkpoint), "--bank_search", "faiss",
                     "--save_maps")["per_class"]["gadget"]
    compare_with_the_default_search(faiss, exact, tmp_path, fitted(method), metric_abs=2e-3, score_rtol=1e-4)


def compare_with_the_default_search(got: dict, exact: dict, run_dir, exact_dir, *, metric_abs: float | None = None,
                                    metric_rel: float | None = None, score_rtol: float) -> tuple[dict, dict]:
    """Assert that another bank search's metrics and image scores equal the default search's within the given
    tolerances; returns both runs' saved maps."""
    assert got.keys() == exact.keys()
    for metric, value in exact.items():
        if isinstance(value, float):
            assert got[metric] == pytest.approx(value, abs=metric_abs, rel=metric_rel), metric
    maps, expected = saved_maps(run_dir), saved_maps(exact_dir)
    np.testing.assert_allclose(maps["image_scores"], expected["image_scores"], rtol=score_rtol)
    return maps, expected


@pytest.mark.slow
def test_projected_search_gives_the_torch_search_scores(dataset, fitted, tmp_path):
    """--bank_search projected: exact, the default search's rows and float32 distances (its candidates are
    re-ranked with the same arithmetic), so the same scores, maps and metrics (measured: bit for bit)."""
    method = "DINO+Point_MAE"
    exact = json.loads((fitted(method) / "results.json").read_text())["per_class"]["gadget"]
    projected = run_main(dataset, tmp_path, "--method_name", method, "--memory_bank", METHODS[method],
                         "--bank_search", "projected", "--save_maps")["per_class"]["gadget"]
    maps, expected = compare_with_the_default_search(projected, exact, tmp_path, fitted(method), metric_rel=1e-6,
                                                     score_rtol=1e-6)
    np.testing.assert_allclose(maps["maps"], expected["maps"], rtol=1e-6)


@pytest.mark.slow
def test_approximate_options_run(dataset, tmp_path):
    record = run_main(dataset, tmp_path, "--method_name", "DINO+Point_MAE", "--memory_bank", "multiple",
                      "--bank_search", "hnsw", "--bank_rows_per_sample", "300", "--coreset_shards", "3")
    assert record["per_class"]["gadget"]["pixel_rocauc"] > 0.75


@pytest.mark.slow
def test_approximate_mode_for_large_classes_runs(dataset, tmp_path):
    record = run_main(dataset, tmp_path, "--method_name", "DINO+Point_MAE", "--memory_bank", "multiple",
                      "--bank_search", "ivf", "--coreset_shard_rows", "500", "--fusion_samples", "2")
    assert record["per_class"]["gadget"]["pixel_rocauc"] > 0.75


def test_demo_prepares_its_data_and_settings(tmp_path, monkeypatch):
    from m3dm.app import demo as demo_module
    from m3dm.app.demo import DEMO_CLASSES, prepare_demo
    from m3dm.data.layout import discover_samples

    # the demo's own data, made smaller and preprocessed in this process: this checks how the demo prepares and
    # wires its data, not the generator or the worker processes (starting those is most of the time otherwise).
    # Patched where the demo looks them up (its module imports them by name)
    monkeypatch.setattr(demo_module, "write_mvtec3d", functools.partial(
        demo_module.write_mvtec3d, size=64, n_train=1, n_val=0, n_test_good=1, n_test_defect=0))
    preprocess = demo_module.preprocess_dataset
    monkeypatch.setattr(demo_module, "preprocess_dataset", lambda raw, **options: preprocess(raw, **{**options,
                                                                                                    "workers": 1}))
    flags = build_parser().parse_args(["--demo", "--demo_root", str(tmp_path), "--max_sample", "3"])
    demo = prepare_demo(settings_from_flags(flags), progress=False)
    demo.validate()
    assert (demo.detector.method_name, demo.detector.memory_bank) == ("DINO+Point_MAE", "multiple")
    assert demo.run.classes == list(DEMO_CLASSES) and demo.run.save_preds and demo.run.output_dir == "results/demo"
    assert demo.run.max_sample == 3  # the flags the demo does not set are kept
    for class_name in DEMO_CLASSES:  # one good test part each: the smaller data above, preprocessed
        assert len(discover_samples(demo.run.dataset_path, class_name, "test")) == 1
