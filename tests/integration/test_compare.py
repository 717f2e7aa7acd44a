"""``python -m m3dm.compare``: two cheap methods on a tiny synthetic dataset, each in its own process; the tables
are the methods' own results, and every method gets a normal results folder with its time and memory."""

import json

import pytest
from conftest import preprocessed_mvtec

from m3dm.app import compare
from m3dm.evaluation.comparison import COMPARISON_METRICS, MethodRun, comparison_markdown, comparison_record

SMALL = ["--num_group", "64", "--group_size", "32", "--random_init", "--device", "cpu", "-q"]


@pytest.mark.slow
def test_two_methods_side_by_side(tmp_path, capsys):
    dataset = preprocessed_mvtec(tmp_path / "data", n_train=2, n_val=1, n_test_good=1, n_test_defect=1)
    out = tmp_path / "cmp"
    methods = ["BTF_FPFH", "Point_MAE"]
    status = compare.main(["--methods", *methods, "--dataset_path", str(dataset), "--output_dir", str(out), *SMALL])
    assert status == 0
    printed = capsys.readouterr().out
    assert f"side-by-side report: {out / 'comparison.html'}" in printed
    assert f"python -m m3dm.report {out / 'BTF_FPFH'} {out / 'Point_MAE'}" in printed
    page = (out / "comparison.html").read_text()
    assert "BTF_FPFH" in page and "Point_MAE" in page
    record = json.loads((out / "comparison.json").read_text())
    assert record["classes"] == ["gadget"]
    for method in methods:
        results = json.loads((out / method / "results.json").read_text())
        assert results["method"] == method and results["config"]["memory_bank"] == "single"
        for metric in COMPARISON_METRICS:
            assert record["metrics"][metric][method]["gadget"] == round(results["per_class"]["gadget"][metric], 3)
        run = record["runs"][method]
        assert run["exit_status"] == 0 and run["test_samples"] == 5
        assert run["peak_rss_bytes"] > 100 * 2**20 and run["peak_cuda_bytes"] is None
        assert 0 < run["seconds_per_test_sample"] < run["wall_s"]
        assert (out / method / "per_sample.csv").is_file()
    markdown = (out / "comparison.md").read_text()
    for title in COMPARISON_METRICS.values():
        assert f"## {title}" in markdown
    assert markdown.count("| BTF_FPFH ") == len(COMPARISON_METRICS) + 1


def test_method_and_memory_bank_flags_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--methods", "BTF_FPFH", "--method_name", "DINO", "--output_dir", str(tmp_path)])


def test_failed_and_partial_runs_show_as_missing():
    runs = [MethodRun("A", "a", 0, wall_s=2.0, peak_rss_bytes=2**30, test_samples=4, test_seconds=2.0,
                      per_class={c: dict.fromkeys(COMPARISON_METRICS, 0.5) for c in ("x", "y")}),
            MethodRun("B", "b", 1)]
    record = comparison_record(runs, ["x", "y"])
    assert record["metrics"]["image_rocauc"] == {"A": {"x": 0.5, "y": 0.5, "mean": 0.5},
                                                 "B": {"x": None, "y": None, "mean": None}}
    assert record["runs"]["A"]["seconds_per_test_sample"] == 0.5
    assert record["runs"]["B"]["seconds_per_test_sample"] is None
    markdown = comparison_markdown(record)
    rows_of_b = [line for line in markdown.splitlines() if line.startswith("| B ")]
    assert len(rows_of_b) == len(COMPARISON_METRICS) + 1
    assert all(line.count("–") == 3 for line in rows_of_b[:-1])  # two classes and the mean
    assert "failed (exit 1)" in rows_of_b[-1]
    assert "| 0.500 " in markdown and "1.00" in markdown  # seconds per test sample, GiB


def test_metrics_not_available_are_left_out_of_the_mean():
    """A class without masks has no pixel metrics (None in its results.json): shown as missing, the mean taken
    over the classes that have them, as the results tables do."""
    pixel_free = dict.fromkeys(COMPARISON_METRICS, None) | {"image_rocauc": 0.7}
    runs = [MethodRun("A", "a", 0, per_class={"x": dict.fromkeys(COMPARISON_METRICS, 0.5), "y": pixel_free})]
    record = comparison_record(runs, ["x", "y"])
    assert record["metrics"]["image_rocauc"]["A"] == {"x": 0.5, "y": 0.7, "mean": 0.6}
    assert record["metrics"]["pixel_rocauc"]["A"] == {"x": 0.5, "y": None, "mean": 0.5}
    assert "| A " in comparison_markdown(record)
