"""The fitted class-model file: format, checksums, versions, verification, and a model's setup against a run's.

An addition: the reference fits and evaluates in one process only.

The detector writes and reads its own state (``Detector.save`` / ``Detector.from_model``); this module knows
nothing of the detector beyond that state's being tensors and primitives. One file per class,
``<output_dir>/models/<class>.pt``: a ``torch.save`` of a dict holding only tensors and primitives (it loads with
``torch.load(..., weights_only=True)``), written atomically. It holds

- ``detector``: the final (coreset) banks with their normalisation scalars and, for decision
  layer fusion, the fitted arrays of both one-class SVMs (``coef_``, ``offset_``, ...; scikit-learn's
  own ``score_samples`` runs on them after loading, so scores are bit-identical), and the RGB patch grid;
- ``method_name``, ``config`` (``DetectorSettings.to_record()``) and ``settings`` (``Settings.recorded()``: image
  size, point grouping, backbone names and mode, ``--fix_quirks``, seed, precision, ...); a key missing from an
  older file had its default value (``m3dm.config.recorded_defaults``);
- ``weights``: per backbone (and UFF block) the weight file's path and SHA-256, or ``random`` with the seed, and a
  SHA-256 of the parameters actually built (so random weights are checked to be rebuilt identically);
- ``generator_state``: the DropPath generator after fitting (the reference's training-mode point backbone draws
  from it, quirk 13), so evaluating a loaded model continues exactly where the fitting process would have;
- ``thresholds`` (``m3dm.detection.thresholds``), versions (format, package, libraries) and provenance;
- ``content_sha256``: a SHA-256 over everything else, checked on loading (a modified or damaged file is refused).

Loading refuses, with a message naming the file: an unreadable or truncated file, another format version, a
content checksum mismatch, a model of another method than asked, and any difference between the model's setup
and the run's (settings, weight files, rebuilt parameters).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import sklearn
import timm
import torch

from m3dm import __version__
from m3dm.config import DetectorSettings, recorded_defaults
from m3dm.data.io import atomic_path
from m3dm.detection.thresholds import Thresholds
from m3dm.errors import ModelFileError

FORMAT = "m3dm-class-model"
FORMAT_VERSION = 1
MODELS_DIR = "models"
WEIGHT_KINDS = {"rgb": "RGB backbone", "xyz": "point backbone", "fusion": "UFF fusion block"}
REQUIRED_KEYS = ("class_name", "method_name", "config", "settings", "weights", "detector", "thresholds")

log = logging.getLogger(__name__)


def model_path(folder: str | Path, class_name: str) -> Path:
    return Path(folder) / f"{class_name}.pt"


# ---------------------------------------------------------------------------------------------- checksums

def file_sha256(path: str | Path, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    """Hash a nested value unambiguously (type tags, lengths, exact float bits)."""
    if value is None:
        digest.update(b"N")
    elif isinstance(value, bool):
        digest.update(b"B1" if value else b"B0")
    elif isinstance(value, int):
        digest.update(b"I%d;" % value)
    elif isinstance(value, float):
        digest.update(b"F" + value.hex().encode() + b";")
    elif isinstance(value, str):
        data = value.encode()
        digest.update(b"S%d;" % len(data) + data)
    elif isinstance(value, (list, tuple)):
        digest.update(b"L%d;" % len(value))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, dict):
        digest.update(b"D%d;" % len(value))
        for key in sorted(value, key=str):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    else:
        raise TypeError(f"a model file holds only tensors and primitives, not {type(value).__name__}")


def content_sha256(value: Any) -> str:
    """SHA-256 of a nested structure of tensors and primitives (independent of how it is serialised)."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def parameters_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (its state dict)."""
    return content_sha256(dict(module.state_dict()))


# ------------------------------------------------------------------------------------------------- setup

def _plain(value: Any) -> Any:
    """The form values take in a saved file, recursively: tuples become lists, subclasses of the built-in scalar
    types (``torch.__version__``, NumPy scalars) the built-ins, so that saving, hashing and comparing are exact."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):  # NumPy scalar
        value = value.item()
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


@dataclass(frozen=True)
class WeightRecord:
    """Where a module's weights came from: a file (``source`` ``"file"``: path and SHA-256) or ``"random"`` (and the
    seed), and a SHA-256 of the parameters built. Saved in a model file as a plain dict (``to_dict``)."""

    name: str
    source: str
    path: str | None
    sha256: str | None
    seed: int | None
    parameters_sha256: str

    @property
    def from_file(self) -> bool:
        return self.source == "file"

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, record: dict) -> WeightRecord:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})


def weight_record(module: torch.nn.Module, name: str, seed: int, path: str | Path | None) -> WeightRecord:
    """Where a module's weights came from: a file (path and SHA-256) or ``random`` (and the seed)."""
    return WeightRecord(name=name, source="random" if path is None else "file",
                        path=None if path is None else str(Path(path).resolve()),
                        sha256=None if path is None else file_sha256(path),
                        seed=seed if path is None else None, parameters_sha256=parameters_sha256(module))


@dataclass(frozen=True)
class Setup:
    """What a fitted model records and a run loading it must match: the detector's settings (``config``:
    ``DetectorSettings.to_record()``), the other recorded settings (``Settings.recorded()``) and the weight
    records by kind (``rgb``, ``xyz``, ``fusion``). Saved in a model file as plain values (``to_dict``)."""

    method_name: str
    config: dict
    settings: dict
    weights: dict[str, WeightRecord]

    def plain_weights(self) -> dict[str, dict]:
        return {kind: record.to_dict() for kind, record in self.weights.items()}

    def to_dict(self) -> dict:
        return _plain({"method_name": self.method_name, "config": self.config, "settings": self.settings,
                       "weights": self.plain_weights()})


def make_setup(method_name: str, config: dict, settings: dict, weights: dict[str, WeightRecord]) -> Setup:
    """The setup of a run or a model, its values in the form a saved file gives them (``_plain``)."""
    return Setup(str(method_name), _plain(config), _plain(settings), dict(weights))


def _short(sha: str | None) -> str:
    return "-" if sha is None else sha[:12] + "…"


def _weight_source(record: WeightRecord) -> str:
    if not record.from_file:
        return f"RANDOM weights (seed {record.seed})"
    return f"weight file {record.path}"


def _weight_differences(saved: dict[str, WeightRecord], current: dict[str, WeightRecord]) -> list[str]:
    lines = []
    for kind in sorted(set(saved) | set(current)):
        what = WEIGHT_KINDS.get(kind, kind)
        old, new = saved.get(kind), current.get(kind)
        if old is None or new is None:
            lines.append(f"{what}: {'used by this run but not by the model' if old is None else 'missing'}")
        elif old.source != new.source:
            lines.append(f"{what}: the model was fitted with {_weight_source(old)}, this run uses "
                         f"{_weight_source(new)}")
        elif old.sha256 != new.sha256:
            lines.append(f"{what}: weight file {new.path} has SHA-256 {_short(new.sha256)}, the model was "
                         f"fitted with {old.path} (SHA-256 {_short(old.sha256)}): other weights")
        elif old.parameters_sha256 != new.parameters_sha256:
            cause = (f"random weights rebuilt from seed {new.seed} (another seed, timm or torch version?)"
                     if not new.from_file else f"weights loaded from {new.path} (another loader?)")
            lines.append(f"{what}: the {cause} differ from those the model was fitted with")
    return lines


def setup_differences(saved: Setup, current: Setup) -> list[str]:
    """Human-readable differences between a model's setup and a run's (empty when they match)."""
    lines = []
    if saved.method_name != current.method_name:
        lines.append(f"--method_name: the model is {saved.method_name}, this run asks for "
                     f"{current.method_name}")
    reported = {"method_name"}
    for old, new in ((saved.config, current.config), (saved.settings, current.settings)):
        for key in sorted(set(old) | set(new)):
            if key not in reported and old.get(key) != new.get(key):
                lines.append(f"{key}: the model has {old.get(key)!r}, this run {new.get(key)!r}")
                reported.add(key)
    return lines + _weight_differences(saved.weights, current.weights)


# ----------------------------------------------------------------------------------------------- the file

def _compact(value: Any) -> Any:
    """CPU tensors that own exactly their data (torch.save writes a view's whole storage)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        return tensor if whole and tensor.is_contiguous() and tensor.storage_offset() == 0 else tensor.clone()
    if isinstance(value, (list, tuple)):
        return [_compact(v) for v in value]
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    return value


def _environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "scikit-learn": sklearn.__version__, "numpy": numpy.__version__}


def save_class_model(path: str | Path, *, class_name: str, setup: Setup, detector_state: dict,
                     generator_state=None, thresholds: Thresholds | None = None,
                     provenance: dict | None = None) -> Path:
    """Write a fitted detector's state and its setup (``make_setup``) to ``path``, atomically."""
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "m3dm_version": __version__,
              "class_name": class_name, **setup.to_dict(), "detector": detector_state,
              "generator_state": generator_state,
              "thresholds": None if thresholds is None else thresholds.to_dict(),
              "environment": _environment(),
              "provenance": {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(provenance or {})}}
    record = _compact(_plain(record))
    record["content_sha256"] = content_sha256(record)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(record, tmp)
    log.debug("%s: written (content SHA-256 %s)", path, _short(record["content_sha256"]))
    return path


@dataclass
class ClassModel:
    """A loaded and verified model file."""

    path: Path
    record: dict

    @property
    def class_name(self) -> str:
        return self.record["class_name"]

    @property
    def method_name(self) -> str:
        return self.record["method_name"]

    @property
    def config(self) -> dict:
        """The detector's recorded settings, with today's default for any key an older file lacks."""
        return {**_plain(DetectorSettings().to_record()), **self.record["config"]}

    @property
    def settings(self) -> dict:
        """The other recorded settings, with today's default for any key an older file lacks."""
        return {**_plain(recorded_defaults()), **self.record["settings"]}

    @property
    def weights(self) -> dict[str, WeightRecord]:
        try:
            return {kind: WeightRecord.from_dict(record) for kind, record in self.record["weights"].items()}
        except (AttributeError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{self.path}: unexpected weight records ({type(exc).__name__}: {exc})") from exc

    @property
    def detector_settings(self) -> DetectorSettings:
        try:
            return DetectorSettings.from_record(self.config)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{self.path}: unexpected detector settings ({type(exc).__name__}: {exc})") from exc

    @property
    def detector_state(self) -> dict:
        """What ``Detector.to_state`` gave when the model was saved."""
        return self.record["detector"]

    @property
    def setup(self) -> Setup:
        return make_setup(self.method_name, self.config, self.settings, self.weights)

    @property
    def thresholds(self) -> Thresholds | None:
        saved = self.record["thresholds"]
        return None if saved is None else Thresholds.from_dict(saved)

    @property
    def generator_state(self) -> torch.Tensor | None:
        """The feature extractor's random state right after fitting (``FeatureExtractor.rng_state``)."""
        return self.record.get("generator_state")

    def check_method(self, method_name: str) -> None:
        if method_name != self.method_name:
            raise ModelFileError(f"{self.path}: holds a {self.method_name} model, but {method_name} was asked for")

    def check_class(self, class_name: str) -> None:
        if class_name != self.class_name:
            raise ModelFileError(f"{self.path}: holds a model of class {self.class_name!r}, not {class_name!r}")

    def check_setup(self, current: Setup) -> None:
        """Refuse when the run's setup (``make_setup``) differs from the model's."""
        differences = setup_differences(self.setup, current)
        if differences:
            raise ModelFileError(f"{self.path}: the model does not match this run:\n  - " + "\n  - ".join(differences))


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def _read_archive(path: Path):
    """The object in a torch.save archive, loaded with ``weights_only``; any other file is a one-line
    ModelFileError (torch's own messages run over many lines and advise unsafe loading)."""
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        raise ModelFileError(f"{path} is not an M3DM model file: it is not a torch archive (main.py --save_model "
                             f"writes <output_dir>/models/<class>.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a whole archive holding objects a model file never holds
        raise ModelFileError(f"{path} is not an M3DM model file: it holds Python objects other than tensors and "
                             f"plain values (a checkpoint of another program?)") from exc
    except Exception as exc:  # truncated zip, damaged records, ...
        first_line = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]  # torch adds advice after it
        raise ModelFileError(f"{path}: not a readable m3dm model file (corrupt or truncated?): "
                             f"{type(exc).__name__}: {first_line}") from exc


def load_class_model(path: str | Path, method_name: str | None = None, *, class_name: str | None = None,
                     setup: Setup | None = None) -> ClassModel:
    """Read and verify a model file: format, version, content checksum and, when given, the method, the class
    and the run's setup (``make_setup``)."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder: give the model file <folder>/<class>.pt")
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found (fit with main.py --save_model)")
    record = _read_archive(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an m3dm class model file (fit one with main.py --save_model)")
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model file format version {version!r}, this m3dm ({__version__}) reads "
                             f"version {FORMAT_VERSION}: refit the model with this version")
    stored = record.pop("content_sha256", None)
    try:
        actual = content_sha256(record)
    except TypeError as exc:
        raise ModelFileError(f"{path}: unexpected content ({exc})") from exc
    if stored != actual:
        raise ModelFileError(f"{path}: content checksum mismatch: the file was modified or damaged after it was "
                             f"written (refit, or restore it from a backup)")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ModelFileError(f"{path}: incomplete model file (no {', '.join(missing)})")
    model = ClassModel(path, record)
    if method_name is not None:
        model.check_method(method_name)
    if class_name is not None:
        model.check_class(class_name)
    if setup is not None:
        model.check_setup(setup)
    return model
