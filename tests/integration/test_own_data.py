"""Own data end to end: test parts without masks give image metrics only, a class with only good test parts is
reported as such, and main.py refuses a broken tree before building any model, naming every problem."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import preprocessed_mvtec

import main as main_module
from m3dm.evaluation.metrics import METRIC_NAMES

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "64", "--group_size", "32",
         "--random_init", "--device", "cpu", "--batch_size", "2", "-q", "--method_name", "DINO+Point_MAE",
         "--memory_bank", "multiple"]


@pytest.fixture(scope="module")
def own_dataset(tmp_path_factory) -> Path:
    """``gadget`` (with masks), ``unmasked`` (the same parts, every gt/ folder removed) and ``only_good`` (the
    same training parts, only the good test parts)."""
    root = preprocessed_mvtec(tmp_path_factory.mktemp("own"), n_train=3, n_val=1, n_test_good=2, n_test_defect=1)
    shutil.copytree(root / "gadget", root / "unmasked")
    for gt in (root / "unmasked/test").glob("*/gt"):
        shutil.rmtree(gt)
    shutil.copytree(root / "gadget", root / "only_good")
    for defect in (root / "only_good/test").iterdir():
        if defect.name != "good":
            shutil.rmtree(defect)
    return root


@pytest.mark.slow
def test_without_masks_image_metrics_only_and_only_good_reported(own_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--dataset_path", str(own_dataset), "--output_dir", str(out), *SMALL,
            "--classes", "gadget", "unmasked", "only_good"]
    assert main_module.main(argv) == 0
    captured = capsys.readouterr()
    record = json.loads((out / "results.json").read_text())["per_class"]
    masked, unmasked, only_good = record["gadget"], record["unmasked"], record["only_good"]
    assert set(masked) == set(METRIC_NAMES) and all(0 <= masked[k] <= 1 for k in METRIC_NAMES)
    # the same parts and seed: the same image scores, so the same image AUROC; no pixel metric without masks
    assert unmasked == {**dict.fromkeys(METRIC_NAMES), "image_rocauc": masked["image_rocauc"]}
    assert only_good == dict.fromkeys(METRIC_NAMES)
    assert "only_good: every test part is good (2 parts): no image or pixel metric is available" in captured.err
    assert "unmasked/test/dent: no gt/ folder" in captured.err  # the up-front check's warning
    assert "Class: unmasked, DINO+Point_MAE Image ROCAUC: " in captured.out
    assert "Pixel ROCAUC: n/a, DINO+Point_MAE AU-PRO: n/a" in captured.out
    table = (out / "pixel_rocauc_results.md").read_text()
    assert table.count("n/a") == 2 and f"{round(masked['pixel_rocauc'], 3):.3f}" in table
    rows = json.loads((out / "per_sample.json").read_text())
    assert [r["class"] for r in rows].count("unmasked") == 6 and [r["class"] for r in rows].count("only_good") == 2


def test_a_broken_tree_is_refused_before_any_model_with_every_problem(own_dataset, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(own_dataset, root)
    (root / "gadget/train/good/xyz/001.tiff").unlink()
    shutil.copy(root / "gadget/test/dent/gt/000.png", root / "gadget/test/dent/gt/009.png")
    shutil.rmtree(root / "only_good/test")
    out = tmp_path / "out"
    argv = ["--dataset_path", str(root), "--output_dir", str(out), *SMALL,
            "--rgb_checkpoint", str(tmp_path / "no_such_weights.pth")]  # the check comes before the weights
    assert main_module.main(argv) == 2
    err = capsys.readouterr().err
    assert "3 problem(s) in the dataset" in err
    assert f"{root}/gadget/train/good: xyz/ lacks 1 file(s) present elsewhere: 001" in err
    assert f"{root}/gadget/test/dent: gt/ has 1 extra file(s) with no rgb/ or xyz/ file: 009" in err
    assert f"{root}/only_good/test: test split not found" in err
    assert "no_such_weights" not in err and "Traceback" not in err and not out.exists()
