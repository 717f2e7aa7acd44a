"""Per-sample results (``per_sample.csv`` and ``per_sample.json``) against the evaluation's own arrays, and the
run's report.html (every test part in its gallery; built again from the saved results alone).

The small configuration of test_pipeline.py; the rows are checked against the ``--save_maps`` archive of the same
run (names, labels, image scores exactly; map max and mean from the saved maps), the test split on disk (every
part once, in order, with its paths) and the saved model's thresholds (pass/fail).
"""

import csv
import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import preprocessed_mvtec

import main as main_module
from m3dm.data.dataset import AnomalyDataset
from m3dm.detection.persistence import load_class_model
from m3dm.evaluation.results import PER_SAMPLE_FIELDS
from m3dm.report.data import REPORT_DATA_DIR, load_class_data

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "64", "--group_size", "32",
         "--random_init", "--device", "cpu", "--batch_size", "2", "-q"]
METHOD = ["--method_name", "DINO+Point_MAE", "--memory_bank", "multiple"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return preprocessed_mvtec(tmp_path_factory.mktemp("per_sample"), n_train=5, n_val=1, n_test_good=3,
                              n_test_defect=2)


def run_main(dataset: Path, out: Path, *extra: str) -> Path:
    argv = ["--dataset_path", str(dataset), "--output_dir", str(out), *SMALL, *METHOD, "--save_maps", *extra]
    assert main_module.main(argv) == 0
    return out


def read_csv(out: Path) -> list[dict]:
    with open(out / "per_sample.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == PER_SAMPLE_FIELDS
        return list(reader)


def saved_maps(out: Path) -> dict:
    with np.load(out / "maps" / "gadget.npz") as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture(scope="module")
def fitted(dataset, tmp_path_factory) -> Path:
    return run_main(dataset, tmp_path_factory.mktemp("fitted"), "--save_model")


def check_rows_match_the_evaluation(dataset: Path, out: Path) -> tuple[list[dict], list[dict]]:
    rows, records = read_csv(out), json.loads((out / "per_sample.json").read_text())
    maps = saved_maps(out)
    n = len(maps["names"])
    assert len(rows) == len(records) == n
    assert ["/".join((r["class"], r["split"], r["defect_type"], r["stem"])) for r in rows] == list(maps["names"])
    assert [int(r["label"]) for r in rows] == [int(x) for x in maps["labels"]]
    assert [float(r["image_score"]) for r in rows] == [float(x) for x in maps["image_scores"]]  # exactly
    assert [float(r["map_max"]) for r in rows] == [float(m.max()) for m in maps["maps"]]
    assert [float(r["map_mean"]) for r in rows] == [float(m.mean(dtype=np.float64)) for m in maps["maps"]]
    # the JSON holds the same rows, with numbers as numbers
    for row, record in zip(rows, records):
        assert list(record) == list(PER_SAMPLE_FIELDS)
        assert record["label"] == int(row["label"]) and record["image_score"] == float(row["image_score"])
        assert record["map_max"] == float(row["map_max"]) and record["map_mean"] == float(row["map_mean"])
        text = {k: v for k, v in record.items() if k not in ("label", "image_score", "map_max", "map_mean")}
        assert {k: ("" if v is None else str(v)) for k, v in text.items()} == {k: row[k] for k in text}
    # every test part once, in the test split's order, with its files
    samples = AnomalyDataset(dataset, "gadget", "test").samples
    assert len({r["rgb_path"] for r in rows}) == len(samples) == n
    assert [(r["rgb_path"], r["xyz_path"]) for r in rows] == [(str(s.rgb_path), str(s.xyz_path)) for s in samples]
    assert all(Path(r["xyz_path"]).is_file() and Path(r["rgb_path"]).is_file() for r in rows)
    assert {r["defect_type"] for r in rows} == {"good", "dent", "bump", "color", "combined"}
    return rows, records


@pytest.mark.slow
def test_rows_equal_the_evaluation_and_fail_above_the_saved_threshold(dataset, fitted):
    rows, records = check_rows_match_the_evaluation(dataset, fitted)
    thresholds = load_class_model(fitted / "models" / "gadget.pt").thresholds
    assert thresholds is not None
    expected = ["fail" if float(r["image_score"]) > thresholds.image else "pass" for r in rows]
    assert [r["result"] for r in rows] == expected and [r["result"] for r in records] == expected
    assert {float(r["image_threshold"]) for r in rows} == {thresholds.image}
    assert "fail" in expected  # the defects of the synthetic data score above the good parts' threshold


@pytest.mark.slow
def test_a_loaded_model_gives_the_same_rows(dataset, fitted, tmp_path):
    out = run_main(dataset, tmp_path, "--load_model", str(fitted / "models"))
    check_rows_match_the_evaluation(dataset, out)
    assert (out / "per_sample.csv").read_text() == (fitted / "per_sample.csv").read_text()
    assert (out / "per_sample.json").read_text() == (fitted / "per_sample.json").read_text()


@pytest.mark.slow
def test_without_thresholds_the_pass_fail_cells_are_empty(dataset, tmp_path):
    out = run_main(dataset, tmp_path)
    rows, records = check_rows_match_the_evaluation(dataset, out)
    assert all(r["result"] == "" and r["image_threshold"] == "" for r in rows)
    assert all(r["result"] is None and r["image_threshold"] is None for r in records)


def gallery_names(page: str) -> list[str]:
    return re.findall(r'<figure class="part[^"]*" data-name="([^"]+)"', page)


@pytest.mark.slow
def test_the_run_writes_its_report_and_it_builds_again_without_the_dataset(dataset, fitted, tmp_path):
    """report.html written at the end of the run; ``python -m m3dm.report`` builds the same page again from a
    copy of the saved results, with the dataset moved away and no models."""
    from m3dm.app.report import main as report_main

    page = (fitted / "report.html").read_text()
    rows = json.loads((fitted / "per_sample.json").read_text())
    names = ["/".join((r["class"], r["split"], r["defect_type"], r["stem"])) for r in rows]
    assert sorted(gallery_names(page)) == sorted(names) and len(names) == 3 + 2 * 4
    record = json.loads((fitted / "results.json").read_text())
    assert {w["source"] for w in record["config"]["weights"].values()} == {"random"}
    assert set(record["config"]["versions"]) >= {"python", "torch", "timm", "m3dm"}
    assert "report data" in record["timings_s"]
    assert record["config"]["host"] and record["config"]["command"]  # where the run comes from (the process's)
    assert record["config"]["command"] in html.unescape(page) and record["config"]["host"] in page
    assert "RANDOM WEIGHTS" in page and 'alt="ROC curve"' in page and 'alt="PRO curve"' in page
    assert f"image threshold {rows[0]['image_threshold']:.5g}" in page  # the saved model's threshold
    assert load_class_data(fitted / REPORT_DATA_DIR / "gadget.npz").scores.tolist() == [r["image_score"]
                                                                                         for r in rows]
    copy = tmp_path / "saved"
    shutil.copytree(fitted, copy, ignore=shutil.ignore_patterns("models", "maps", "report.html"))
    away = tmp_path / "dataset_away"
    shutil.move(str(dataset), str(away))
    try:
        assert report_main([str(copy), "-q"]) == 0
    finally:
        shutil.move(str(away), str(dataset))
    generated = re.compile(r"Generated [^<]* UTC")
    rebuilt = (copy / "report.html").read_text().replace(str(copy.resolve()), str(fitted.resolve()))
    assert generated.sub("", rebuilt) == generated.sub("", page)
