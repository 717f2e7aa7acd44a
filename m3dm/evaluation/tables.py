"""Result tables (the reference's three Markdown tables, with a Mean column), the JSON record of a run and the
per-sample results (``per_sample.csv`` and ``per_sample.json``)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from m3dm.data.io import write_text
from m3dm.evaluation.results import PER_SAMPLE_FIELDS

METRIC_TABLES = {  # file stem of each table file -> the metrics it holds, each with its title
    "image_rocauc": {"image_rocauc": "Image ROCAUC"},
    "pixel_rocauc": {"pixel_rocauc": "Pixel ROCAUC"},
    "au_pro": {"au_pro": "AU-PRO@30%", "au_pro_0.1": "AU-PRO@10%", "au_pro_0.05": "AU-PRO@5%",
               "au_pro_0.01": "AU-PRO@1%"},
}


NOT_AVAILABLE = "n/a"  # a metric the test split cannot give (None in results.json)


def _cell(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.3f}"


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def class_line(class_name: str, method: str, metrics: dict) -> str:
    """The reference's per-class console line ("n/a" for a metric that is not available)."""
    return (f"Class: {class_name}, {method} Image ROCAUC: {_cell(metrics['image_rocauc'])}, "
            f"{method} Pixel ROCAUC: {_cell(metrics['pixel_rocauc'])}, {method} AU-PRO: {_cell(metrics['au_pro'])}")


def mean_of_rounded(values: list[float | None]) -> float | None:
    """Mean of the values rounded to 3 decimals, as the reference computes it, over the available ones (None
    when none is)."""
    available = [round(v, 3) for v in values if v is not None]
    return sum(available) / len(available) if available else None


def markdown_table(method: str, per_class: dict[str, dict], metric: str) -> str:
    """One row per method, one column per class (titled with ``str.title()`` as the reference) and a Mean of
    the values rounded to 3 decimals, as the reference computes it; a metric that is not available is "n/a"
    and left out of the Mean, as is one an older run did not compute."""
    classes = list(per_class)
    values = [per_class[c].get(metric) for c in classes]  # absent: a class resumed from an older run's file
    mean = mean_of_rounded(values) if values else math.nan
    header = ["Method"] + [c.title() for c in classes] + ["Mean"]
    row = [method] + [_cell(_rounded(v)) for v in values] + [_cell(_rounded(mean))]
    return aligned_table(header, [row])


def aligned_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with padded columns, the first left-aligned and the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    rule = "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows)])


def results_tables(method: str, per_class: dict[str, dict]) -> dict[str, str]:
    """The text of each table file (``METRIC_TABLES``): one titled table per metric it holds."""
    return {stem: "\n\n".join(f"# {title}\n\n{markdown_table(method, per_class, metric)}"
                               for metric, title in metrics.items())
            for stem, metrics in METRIC_TABLES.items()}


def write_results(output_dir: str | Path, method: str, per_class: dict[str, dict], config: dict,
                  timings: dict | None = None) -> dict[str, Path]:
    """Write the three table files (``<stem>_results.md``, the AU-PRO one with a table per FPR limit) and
    ``results.json``; returns the written paths.

    Files are written whole and atomically: nothing is appended to earlier runs' files.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stem, text in results_tables(method, per_class).items():
        paths[stem] = output_dir / f"{stem}_results.md"
        write_text(paths[stem], text + "\n")
    record = {"method": method, "config": config, "per_class": per_class, "timings_s": timings or {},
              "mean": {m: mean_of_rounded([v.get(m) for v in per_class.values()])
                       for m in sorted({k for v in per_class.values() for k in v})}}
    paths["json"] = output_dir / "results.json"
    write_text(paths["json"], json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return paths


def write_per_sample(output_dir: str | Path, rows: list[dict]) -> dict[str, Path]:
    """Write the per-sample rows (``results.per_sample_rows``, every class in order) to ``per_sample.csv`` and
    the same rows to ``per_sample.json``, atomically; returns the two paths.

    In the CSV a missing value (no thresholds) is an empty cell and floats are written exactly (``repr``).
    """
    output_dir = Path(output_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PER_SAMPLE_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else repr(row[k]) if isinstance(row[k], float) else row[k]
                         for k in PER_SAMPLE_FIELDS})
    paths = {"per_sample_csv": output_dir / "per_sample.csv", "per_sample_json": output_dir / "per_sample.json"}
    write_text(paths["per_sample_csv"], buffer.getvalue())
    write_text(paths["per_sample_json"], json.dumps([{k: row[k] for k in PER_SAMPLE_FIELDS} for row in rows],
                                                    indent=1) + "\n")
    return paths
