"""A saved run as the report reads it: its record (results.json), per-sample rows and per-class report data."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from m3dm.config import FEATURE_DUMP_METHODS, METHODS, MODALITIES, Settings
from m3dm.errors import DataError
from m3dm.report.data import REPORT_DATA_DIR, ClassData, load_class_data

WEIGHT_KINDS = {"rgb": "RGB backbone", "xyz": "point backbone", "fusion": "UFF fusion block"}
PROVENANCE = ("command", "git_commit", "host")  # where a run comes from (``m3dm.report.data.provenance``)
# the stages a run times, in the order of the pipeline (stages not listed, e.g. of a newer method, come after)
STAGE_ORDER = ("extract", "memory", "coreset", "mapping training", "dlf fit", "pass 2 scoring", "load model",
               "threshold scoring", "thresholds and saving", "test extract", "test scoring", "metrics", "pictures",
               "report data", "predict")


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
        return {k: v for k, v in self.record.get("config", {}).items()
                if k not in ("versions", "weights", *PROVENANCE)}

    def _field(self, key: str) -> dict:
        return self.record.get(key) or self.record.get("config", {}).get(key) or {}

    @property
    def versions(self) -> dict:
        return self._field("versions")

    @property
    def weights(self) -> dict:
        return self._field("weights")

    @property
    def provenance(self) -> dict[str, str]:
        """Command line, git commit and host of the run (absent from the results of older runs)."""
        found = {key: self.record.get(key, self.record.get("config", {}).get(key)) for key in PROVENANCE}
        return {key: str(value) for key, value in found.items() if value is not None}

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
        """Seconds per stage, in the order of the pipeline."""
        timings = self.record.get("timings_s", {})
        rank = {stage: i for i, stage in enumerate(STAGE_ORDER)}
        return {stage: timings[stage] for stage in sorted(timings, key=lambda s: rank.get(s, len(rank)))}

    @cached_property
    def classes(self) -> list[str]:
        """The run's classes in its order (per-sample rows, then the record); a record without any (m3dm.predict's):
        the classes of its data files. Data files of other classes (an earlier run into the same folder) are left
        out."""
        order = list(dict.fromkeys([row["class"] for row in self.samples] + list(self.per_class)))
        return order or sorted(self.data_files)

    @cached_property
    def prediction_outcomes(self) -> list[tuple[str, str, str]]:
        """``(name, result, error)`` of every part of a predictions folder, as ``predictions.jsonl`` lists them
        (parts that could not be scored included, with their error); empty for an evaluation."""
        path = self.folder / "predictions.jsonl"
        if self.kind != "predict" or not path.is_file():
            return []
        outcomes = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                outcomes.append((str(row["name"]), str(row["result"]), str(row.get("error") or "")))
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}: not a predictions file of m3dm-predict ({exc})") from exc
        return outcomes

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


def applies(name: str, method: str) -> bool:
    """Whether the setting ``name`` (a flag) has an effect on a run of ``method`` (settings of other methods, of
    modalities and backbones it does not use, are left out of its report)."""
    spec = METHODS.get(method)
    if spec is None:
        return True
    m3dm_features = spec.features == "m3dm"
    rules = {"cfm_": spec.family == "cfm", "ocsvm_": spec.combine == "dlf",
             "rgb_backbone_name": spec.needs_rgb and m3dm_features, "rgb_checkpoint": spec.needs_rgb and m3dm_features,
             "xyz_": spec.needs_xyz and m3dm_features, "group_size": spec.needs_xyz and m3dm_features,
             "num_group": spec.needs_xyz and m3dm_features, "backbone_eval": spec.needs_xyz and m3dm_features,
             "asy_memory_bank": spec.needs_uff, "use_uff": spec.needs_uff, "fusion_module_path": spec.needs_uff,
             "rm_zero_for_project": method == "Point_MAE", "save_feature": method in FEATURE_DUMP_METHODS,
             "max_sample": spec.family != "cfm"}
    for modality in MODALITIES:
        rules[f"{modality}_s_lambda"] = rules[f"{modality}_smap_lambda"] = modality in spec.modalities and \
            spec.combine == "dlf"
    for prefix in ("f_coreset", "coreset_", "random_state"):
        rules[prefix] = spec.family != "cfm"
    return next((rule for prefix, rule in rules.items() if name.startswith(prefix)), True)


def method_settings(method: str, config: dict) -> list[tuple[str, object, bool]]:
    """``(name, value, changed from the default)`` of the settings of a run's record that apply to its ``method``,
    in the order of the command line's flags (what the record has besides, e.g. the device used, after them)."""
    defaults = {name: _plain(value) for name, value in Settings().flags().items()}
    names = [n for n in defaults if n in config] + sorted(n for n in config if n not in defaults)
    return [(name, config[name], name in defaults and _plain(config[name]) != defaults[name]) for name in names
            if applies(name, method)]


def _plain(value):
    """A setting as results.json holds it (tuples are lists there)."""
    return list(value) if isinstance(value, tuple) else value
