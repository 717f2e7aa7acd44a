"""Saving and loading fitted class models (an addition: the reference fits and evaluates in one process only).

One file per class, ``<output_dir>/models/<class>.pt``: a ``torch.save`` of a dict holding only tensors and
primitives (it loads with ``torch.load(..., weights_only=True)``), written atomically. It holds

- ``detector``: the final (coreset) banks with their normalisation scalars (spec §8.1–8.7) and, for decision
  layer fusion, the fitted arrays of both one-class SVMs (``coef_``, ``offset_``, ..., spec §8.8; scikit-learn's
  own ``score_samples`` runs on them after loading, so scores are bit-identical), and the RGB patch grid;
- ``method_name``, ``config`` (every field of ``DetectorConfig``) and ``settings`` (image size, point grouping,
  backbone names and mode, ``--fix_quirks``, seed, precision, ...);
- ``weights``: per backbone (and UFF block) the weight file's path and SHA-256, or ``random`` with the seed, and a
  SHA-256 of the parameters actually built (so random weights are checked to be rebuilt identically);
- ``generator_state``: the DropPath generator after fitting (the reference's training-mode point backbone draws
  from it, spec §5.4), so evaluating a loaded model continues exactly where the fitting process would have;
- ``thresholds`` (``m3dm.detection.thresholds``), versions (format, package, libraries) and provenance;
- ``content_sha256``: a SHA-256 over everything else, checked on loading (a modified or damaged file is refused).

Loading refuses, with a message naming the file: an unreadable or truncated file, another format version, a
content checksum mismatch, a model of another method than asked, and any difference between the model's setup
and the run's (settings, weight files, rebuilt parameters).
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m3dm import __version__
from m3dm.data.io import atomic_path
from m3dm.detection.thresholds import Thresholds
from m3dm.errors import ModelFileError

FORMAT = "m3dm-class-model"
FORMAT_VERSION = 1
MODELS_DIR = "models"

# main.py flags besides DetectorConfig's that change scores (or the fit that a --load_model run replaces)
SETTING_DEFAULTS = {"img_size": 224, "num_group": 1024, "group_size": 128,
                    "rgb_backbone_name": "vit_base_patch8_224_dino", "xyz_backbone_name": "Point_MAE",
                    "backbone_eval": False, "fix_quirks": False, "seed": 0, "precision": "fp32", "use_uff": False,
                    "max_sample": 400, "dlf_reextract": False}
WEIGHT_KINDS = {"rgb": "RGB backbone", "xyz": "point backbone", "fusion": "UFF fusion block"}
REQUIRED_KEYS = ("class_name", "method_name", "config", "settings", "weights", "detector", "thresholds")




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


def weight_record(module: torch.nn.Module, name: str, seed: int, path: str | Path | None) -> dict:
    """Where a module's weights came from: a file (path and SHA-256) or ``random`` (and the seed)."""
    return {"name": name, "source": "random" if path is None else "file",
            "path": None if path is None else str(Path(path).resolve()),
            "sha256": None if path is None else file_sha256(path),
            "seed": seed if path is None else None,
            "parameters_sha256": parameters_sha256(module)}


def weight_records(extractor, seed: int, rgb_name: str, xyz_name: str, fusion_block=None,
                   fusion_path: str | Path | None = None) -> dict:
    """Weight records of the backbones an extractor holds (they carry ``.checkpoint_path``) and the UFF block."""
    records = {}
    if extractor.rgb_backbone is not None:
        records["rgb"] = weight_record(extractor.rgb_backbone, rgb_name, seed, extractor.rgb_backbone.checkpoint_path)
    if extractor.point_backbone is not None:
        records["xyz"] = weight_record(extractor.point_backbone, xyz_name, seed,
                                       extractor.point_backbone.checkpoint_path)
    if fusion_block is not None:
        records["fusion"] = weight_record(fusion_block, "UFF", seed, fusion_path)
    return records


def make_setup(method_name: str, config: dict, settings: dict, weights: dict) -> dict:
    return _plain({"method_name": method_name, "config": config, "settings": settings, "weights": weights})


def describe_run(args, extractor, fusion_block=None) -> dict:
    """The setup of a ``main.py`` run: what a model fitted by it records, and what a loaded model must match."""
    from m3dm.detection.detector import DetectorConfig

    settings = {name: getattr(args, name, default) for name, default in SETTING_DEFAULTS.items()}
    weights = weight_records(extractor, args.seed, args.rgb_backbone_name, args.xyz_backbone_name, fusion_block,
                             args.fusion_module_path if fusion_block is not None else None)
    return make_setup(args.method_name, DetectorConfig.from_args(args).to_dict(), settings, weights)


def _short(sha: str | None) -> str:
    return "-" if sha is None else sha[:12] + "…"


def _weight_source(record: dict) -> str:
    if record["source"] == "random":
        return f"RANDOM weights (seed {record['seed']})"
    return f"weight file {record['path']}"


def _weight_differences(saved: dict, current: dict) -> list[str]:
    lines = []
    for kind in sorted(set(saved) | set(current)):
        what = WEIGHT_KINDS.get(kind, kind)
        old, new = saved.get(kind), current.get(kind)
        if old is None or new is None:
            lines.append(f"{what}: {'used by this run but not by the model' if old is None else 'missing'}")
        elif old["source"] != new["source"]:
            lines.append(f"{what}: the model was fitted with {_weight_source(old)}, this run uses "
                         f"{_weight_source(new)}")
        elif old["sha256"] != new["sha256"]:
            lines.append(f"{what}: weight file {new['path']} has SHA-256 {_short(new['sha256'])}, the model was "
                         f"fitted with {old['path']} (SHA-256 {_short(old['sha256'])}): other weights")
        elif old["parameters_sha256"] != new["parameters_sha256"]:
            cause = (f"random weights rebuilt from seed {new['seed']} (another seed, timm or torch version?)"
                     if new["source"] == "random" else f"weights loaded from {new['path']} (another loader?)")
            lines.append(f"{what}: the {cause} differ from those the model was fitted with")
    return lines


def setup_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a model's setup and a run's (empty when they match)."""
    lines = []
    if saved["method_name"] != current["method_name"]:
        lines.append(f"--method_name: the model is {saved['method_name']}, this run asks for "
                     f"{current['method_name']}")
    reported = {"method_name"}
    for section in ("config", "settings"):
        old, new = saved[section], current[section]
        for key in sorted(set(old) | set(new)):
            if key not in reported and old.get(key) != new.get(key):
                lines.append(f"{key}: the model has {old.get(key)!r}, this run {new.get(key)!r}")
                reported.add(key)
    return lines + _weight_differences(saved["weights"], current["weights"])


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
    import numpy
    import sklearn
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "scikit-learn": sklearn.__version__, "numpy": numpy.__version__}


def save_class_model(path: str | Path, *, class_name: str, setup: dict, detector, generator_state=None,
                     thresholds: Thresholds | None = None, provenance: dict | None = None) -> Path:
    """Write a fitted detector and its setup (``describe_run``) to ``path``, atomically."""
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "m3dm_version": __version__,
              "class_name": class_name, **setup, "detector": detector.fitted_state(),
              "generator_state": generator_state,
              "thresholds": None if thresholds is None else thresholds.to_dict(),
              "environment": _environment(),
              "provenance": {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(provenance or {})}}
    record = _compact(_plain(record))
    record["content_sha256"] = content_sha256(record)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(record, tmp)
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
    def settings(self) -> dict:
        return dict(self.record["settings"])

    @property
    def weights(self) -> dict:
        return self.record["weights"]

    @property
    def config(self):
        from m3dm.detection.detector import DetectorConfig

        values = dict(self.record["config"])
        values["lambdas"] = {m: tuple(v) for m, v in values["lambdas"].items()}
        return DetectorConfig(**values)

    @property
    def setup(self) -> dict:
        return make_setup(self.method_name, self.record["config"], self.record["settings"], self.weights)

    @property
    def thresholds(self) -> Thresholds | None:
        saved = self.record["thresholds"]
        return None if saved is None else Thresholds.from_dict(saved)

    @property
    def generator_state(self) -> torch.Tensor | None:
        return self.record.get("generator_state")

    def check_method(self, method_name: str) -> None:
        if method_name != self.method_name:
            raise ModelFileError(f"{self.path}: holds a {self.method_name} model, but {method_name} was asked for")

    def check_setup(self, current: dict) -> None:
        """Refuse when the run's setup (``describe_run`` / ``make_setup``) differs from the model's."""
        differences = setup_differences(self.setup, current)
        if differences:
            raise ModelFileError(f"{self.path}: the model does not match this run:\n  - " + "\n  - ".join(differences))

    def detector(self, fusion_block=None, device="cpu", progress: bool = True):
        from m3dm.detection.detector import Detector

        try:
            return Detector.from_fitted_state(self.config, self.record["detector"], fusion_block=fusion_block,
                                              device=device, progress=progress)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{self.path}: the saved detector is incomplete or inconsistent "
                                 f"({type(exc).__name__}: {exc})") from exc


def load_class_model(path: str | Path, method_name: str | None = None) -> ClassModel:
    """Read and verify a model file (format, version, content checksum, and the method when given)."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder: give the model file <folder>/<class>.pt")
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found (fit with main.py --save_model)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, damaged pickle, foreign object types, ...
        raise ModelFileError(f"{path}: not a readable m3dm model file (corrupt or truncated?): "
                             f"{type(exc).__name__}: {exc}") from exc
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
    return model


# ------------------------------------------------------------------------------------- main.py's wiring

def save_runner_model(runner, path: str | Path, setup: dict, good_parts, far: float, pixel_far: float,
                      device: str = "cpu") -> tuple[Path, Thresholds]:
    """After ``runner.fit()``: set the thresholds on the good parts (``threshold.ThresholdSamples``) and save.

    The DropPath generator is restored after scoring the good parts, so the evaluation that follows gives the same
    scores as a run without ``--save_model``; the saved state is the one right after fitting.
    """
    from m3dm.detection.thresholds import threshold_dataset

    generator = runner.extractor.generator
    fitted_state = generator.get_state()
    dataset = threshold_dataset(good_parts, runner.root, runner.class_name, runner.img_size)
    scores, maps = runner.score_dataset(dataset, "good parts (thresholds)")
    generator.set_state(fitted_state)
    thresholds = Thresholds.from_good_parts(scores, maps, far, pixel_far, good_parts.description)
    provenance = {"dataset_path": str(runner.root.resolve()), "device": str(device),
                  "n_train": runner.detector.n_train, "batch_size": runner.batch_size}
    path = save_class_model(path, class_name=runner.class_name, setup=setup, detector=runner.detector,
                            generator_state=fitted_state, thresholds=thresholds, provenance=provenance)
    return path, thresholds


def load_into_runner(runner, path: str | Path, setup: dict, fusion_block=None, device="cpu") -> ClassModel:
    """``--load_model``: verify the file against the run's setup and give the runner the fitted detector and the
    DropPath generator state it had after fitting."""
    model = load_class_model(path, setup["method_name"])
    if model.class_name != runner.class_name:
        raise ModelFileError(f"{model.path}: holds a model of class {model.class_name!r}, not {runner.class_name!r}")
    model.check_setup(setup)
    runner.detector = model.detector(fusion_block, device, runner.progress)
    if model.generator_state is not None:
        runner.extractor.generator.set_state(model.generator_state)
    return model
