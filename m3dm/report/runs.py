"""A saved run as the report reads it: its record (results.json), per-sample rows and per-class report data."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from m3dm.errors import DataError
from m3dm.report.data import REPORT_DATA_DIR, ClassData, load_class_data

WEIGHT_KINDS = {"rgb": "RGB backbone", "xyz": "point backbone", "fusion": "UFF fusion block"}


@dataclass
class SavedRun:
    folder: Path
    record: dict  # results.json of main.py, or report_data/run.json of m3dm.predict
    samples: list[dict]  # per_sample.json rows (empty for predictions)
    data_files: dict[str, Path]  # class -> report_data/<class>.npz

    @property
    def method(self) -> str:
        return str(self.record.get("method", self.folder.name))

    @property
    def kind(self) -> str:
        return str(self.record.get("kind", "evaluation"))

    @property
    def config(self) -> dict:
        return {k: v for k, v in self.record.get("config", {}).items() if k not in ("versions", "weights")}

    def _field(self, key: str) -> dict:
        return self.record.get(key) or self.record.get("config", {}).get(key) or {}

    @property
    def versions(self) -> dict:
        return self._field("versions")

    @property
    def weights(self) -> dict:
        return self._field("weights")

    @property
    def random_weights(self) -> list[str]:
        """The kinds of weights that were random (``--random_init`` without a checkpoint), e.g. ``["rgb"]``;
        when the record has no weights, every backbone with ``random_init`` set."""
        if self.weights:
            return [kind for kind, w in self.weights.items() if w.get("source") == "random"]
        return ["rgb", "xyz"] if self.record.get("config", {}).get("random_init") else []

    @property
    def per_class(self) -> dict[str, dict]:
        return self.record.get("per_class", {})

    @property
    def timings(self) -> dict[str, float]:
        return self.record.get("timings_s", {})

    @cached_property
    def classes(self) -> list[str]:
        """The run's classes in its order (per-sample rows, then the record); a record without any (m3dm.predict's):
        the classes of its data files. Data files of other classes (an earlier run into the same folder) are left
        out."""
        order = list(dict.fromkeys([row["class"] for row in self.samples] + list(self.per_class)))
        return order or sorted(self.data_files)

    def class_data(self, class_name: str, spool: bool = False) -> ClassData | None:
        path = self.data_files.get(class_name)
        return None if path is None else load_class_data(path, spool)

    def sample_scores(self, class_name: str) -> dict[str, tuple[int, float]]:
        """``name -> (label, image score)`` of the class's test parts (per-sample rows, else the report data)."""
        rows = [r for r in self.samples if r["class"] == class_name]
        if rows:
            return {"/".join((r["class"], r["split"], r["defect_type"], r["stem"])): (int(r["label"]),
                                                                                     float(r["image_score"]))
                    for r in rows}
        data = self.class_data(class_name)
        if data is None:
            return {}
        return {name: (int(label), float(score)) for name, label, score in zip(data.names, data.labels, data.scores)}


def load_run(folder: str | Path) -> SavedRun:
    """The saved results under ``folder`` (written by main.py or m3dm.predict); DataError when there are none."""
    folder = Path(folder)
    results, run_json = folder / "results.json", folder / REPORT_DATA_DIR / "run.json"
    source = results if results.is_file() else run_json if run_json.is_file() else None
    if source is None:
        raise DataError(f"{folder}: no saved results (neither results.json nor {REPORT_DATA_DIR}/run.json)")
    record = _read_json(source)
    samples_path = folder / "per_sample.json"
    samples = _read_json(samples_path) if samples_path.is_file() else []
    data_dir = folder / REPORT_DATA_DIR
    data_files = {p.stem: p for p in sorted(data_dir.glob("*.npz"))} if data_dir.is_dir() else {}
    return SavedRun(folder, record, samples, data_files)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from exc


def metric_value(value) -> float | None:
    """A metric as a float, None when absent or not a number (NaN, a class without masks)."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
