"""Each class's results, written as the class ends (``<output_dir>/classes/<class>.json``), and ``--resume``.

An interrupted multi-class run keeps the classes it finished; ``--resume`` reads them back instead of running
them again, provided they were written with the same settings. Only the settings that change a number are
compared: the detector's, those declared ``recorded`` in ``m3dm.config`` (what a fitted-model file stores) and
``INPUTS`` (the data, weights, thresholds, batches and device); output flags (``--save_maps``, ``--save_preds``,
``--save_model``, ...) and the way the work is carried out (workers, storage) may differ.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from m3dm.config import Settings
from m3dm.data.io import write_text
from m3dm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CLASSES_DIR = "classes"
# settings that are not a detector's or recorded but change numbers too: the files and thresholds they come from,
# and the batches and device they are computed in (the reference's train-mode BatchNorm sees the whole batch)
INPUTS = ("dataset_type", "dataset_path", "rgb_checkpoint", "xyz_checkpoint", "random_init", "fusion_module_path",
          "load_model", "far", "pixel_far", "batch_size", "device")


@dataclass
class ClassOutput:
    """What one class's run gives the run of every class (plain Python values: it travels between processes)."""

    metrics: dict
    samples: list[dict]  # per test sample, in order (m3dm.evaluation.results.per_sample_rows)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of this class


def class_file(output_dir: str | Path, class_name: str) -> Path:
    return Path(output_dir) / CLASSES_DIR / f"{class_name}.json"


def compared_settings(settings: Settings) -> dict:
    """The settings a resumed class must have been run with, as JSON gives them back."""
    every = settings.flags()
    compared = {**settings.scoring(), **{name: every[name] for name in INPUTS}}
    return json.loads(json.dumps(compared, default=str))


def save_class_output(output_dir: str | Path, class_name: str, output: ClassOutput, settings: Settings) -> Path:
    """Write one finished class's metrics and per-sample rows with the settings it ran with, atomically."""
    path = class_file(output_dir, class_name)
    record = {"class": class_name, "settings": compared_settings(settings), "metrics": output.metrics,
              "samples": output.samples, "timings_s": output.timings}
    write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def finished_classes(output_dir: str | Path, classes: list[str], settings: Settings) -> dict[str, ClassOutput]:
    """``--resume``: the outputs of the classes an earlier run finished in ``output_dir``. A class file written
    with other settings is refused (ConfigError naming it and the differences); a damaged one is a DataError."""
    current = compared_settings(settings)
    done = {}
    for class_name in classes:
        path = class_file(output_dir, class_name)
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
            recorded = record["settings"]
            output = ClassOutput(record["metrics"], record["samples"], dict(record.get("timings_s", {})))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a readable per-class result ({type(exc).__name__}: {exc}); delete it to "
                            f"run {class_name} again") from exc
        differences = [f"--{name} {recorded.get(name)!r} there, {value!r} now" for name, value in current.items()
                       if recorded.get(name) != value]
        if differences:
            raise ConfigError(f"--resume: {path} was written with other settings ({'; '.join(differences)}): "
                              f"resume with the same flags, or give another --output_dir")
        done[class_name] = output
    return done
