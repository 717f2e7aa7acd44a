"""Several methods' results on the same classes side by side: one table per metric (methods as rows, classes and
the mean as columns), seconds per test sample and peak memory per method, as Markdown and JSON.

Each method's results are a normal results folder (``results.json``, ``per_sample.csv``) and the resources its
process measured (``resources.json``, written by ``m3dm.app.measured``).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m3dm.data.io import write_text
from m3dm.evaluation.tables import aligned_table, mean_of_rounded

COMPARISON_METRICS = {
    "image_rocauc": "I-AUROC",
    "pixel_rocauc": "P-AUROC",
    "au_pro": "AU-PRO@30%",
    "au_pro_0.1": "AU-PRO@10%",
    "au_pro_0.05": "AU-PRO@5%",
    "au_pro_0.01": "AU-PRO@1%",
}
TEST_STAGES = ("test extract", "test scoring")  # the timings (results.json) of the test split's samples
RESOURCES_FILE = "resources.json"
GIB = 1024 ** 3


@dataclass
class MethodRun:
    """One method's run: where its results are, how it ended, its metrics by class and what it cost."""

    method: str
    folder: str
    exit_status: int
    wall_s: float | None = None
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None
    test_samples: int = 0
    test_seconds: float | None = None
    per_class: dict[str, dict] = field(default_factory=dict)

    @property
    def seconds_per_test_sample(self) -> float | None:
        if self.test_seconds is None or self.test_samples == 0:
            return None
        return self.test_seconds / self.test_samples


def read_method_run(method: str, folder: str | Path, exit_status: int) -> MethodRun:
    """A method's run from its results folder (whatever of it exists: a failed run may have written nothing)."""
    folder = Path(folder)
    run = MethodRun(method, str(folder), exit_status)
    resources = folder / RESOURCES_FILE
    if resources.is_file():
        measured = json.loads(resources.read_text())
        run.wall_s = measured.get("wall_s")
        run.peak_rss_bytes = measured.get("peak_rss_bytes")
        run.peak_cuda_bytes = measured.get("peak_cuda_bytes")
    results = folder / "results.json"
    if exit_status == 0 and results.is_file():
        record = json.loads(results.read_text())
        run.per_class = record.get("per_class", {})
        timings = record.get("timings_s", {})
        if any(stage in timings for stage in TEST_STAGES):
            run.test_seconds = sum(timings.get(stage, 0.0) for stage in TEST_STAGES)
    per_sample = folder / "per_sample.csv"
    if exit_status == 0 and per_sample.is_file():
        with per_sample.open(newline="") as rows:
            run.test_samples = sum(1 for _ in csv.DictReader(rows))
    return run


def metric_rows(runs: list[MethodRun], classes: list[str], metric: str) -> dict[str, dict]:
    """``{method: {class: value rounded to 3, ..., "mean": mean of the rounded values}}``: None where a class is
    missing (a failed run; then no mean) or its metric is not available (no masks, a single label: the mean is then
    over the classes that have it, as the results tables take it)."""
    rows = {}
    for run in runs:
        values, complete = {}, True
        for c in classes:
            value = run.per_class.get(c, {}).get(metric)
            complete &= metric in run.per_class.get(c, {})
            values[c] = None if value is None else round(value, 3)
        mean = mean_of_rounded(list(values.values())) if complete else None
        values["mean"] = None if mean is None else round(mean, 3)
        rows[run.method] = values
    return rows


def comparison_record(runs: list[MethodRun], classes: list[str]) -> dict:
    """The JSON record: the classes, one table per metric, and each run's resources and status."""
    return {"classes": list(classes),
            "metrics": {metric: metric_rows(runs, classes, metric) for metric in COMPARISON_METRICS},
            "titles": dict(COMPARISON_METRICS),
            "runs": {run.method: {**{k: v for k, v in asdict(run).items() if k != "per_class"},
                                  "seconds_per_test_sample": run.seconds_per_test_sample} for run in runs}}


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def comparison_markdown(record: dict) -> str:
    """One Markdown table per metric, then the resources table."""
    classes = record["classes"]
    parts = []
    for metric, title in record["titles"].items():
        rows = record["metrics"][metric]
        body = [[method] + [_cell(values[c]) for c in classes] + [_cell(values["mean"])]
                for method, values in rows.items()]
        parts.append(f"## {title}\n\n" + aligned_table(["Method"] + [c.title() for c in classes] + ["Mean"], body))
    body = []
    for method, run in record["runs"].items():
        gib = lambda n: None if n is None else n / GIB
        body.append([method, _cell(run["seconds_per_test_sample"], 3), str(run["test_samples"]),
                     _cell(run["wall_s"], 1), _cell(gib(run["peak_rss_bytes"]), 2),
                     _cell(gib(run["peak_cuda_bytes"]), 2),
                     "ok" if run["exit_status"] == 0 else f"failed (exit {run['exit_status']})"])
    parts.append("## Time and memory\n\n" + aligned_table(
        ["Method", "s / test sample", "test samples", "wall s", "peak RSS GiB", "peak CUDA GiB", "status"], body))
    return "\n\n".join(parts) + "\n"


def write_comparison(output_dir: str | Path, runs: list[MethodRun], classes: list[str]) -> dict[str, Path]:
    """``comparison.md`` and ``comparison.json`` in ``output_dir`` (each written whole, atomically)."""
    output_dir = Path(output_dir)
    record = comparison_record(runs, classes)
    paths = {"md": output_dir / "comparison.md", "json": output_dir / "comparison.json"}
    write_text(paths["md"], "# Comparison\n\n" + comparison_markdown(record))
    write_text(paths["json"], json.dumps(record, indent=2, sort_keys=False) + "\n")
    return paths
