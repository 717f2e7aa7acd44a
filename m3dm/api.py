"""The Python API: fit a class model, save and load it, score parts and evaluate it (docs/api.md).

    import m3dm

    model = m3dm.fit("datasets/mvtec3d/bagel", method="DINO+Point_MAE")
    model.save("models/bagel.pt")
    prediction = m3dm.load("models/bagel.pt").predict("part.png", "part.tiff")
    print(prediction.score, prediction.result)

Every method of ``m3dm.config.METHODS`` fits and scores through these few names. They run the command lines' own
code, not a second pipeline: ``fit`` is ``main.py --save_model`` for one class (``m3dm.app.run.ClassRun``: the
same fitting, the same pass/fail thresholds), ``Model.evaluate`` is its evaluation (the same scores and metrics,
bit for bit), ``Model.save`` writes the same model file (``m3dm-predict`` and ``main.py --load_model`` read it),
and ``load`` and ``Model.predict`` are ``m3dm-predict``'s (``m3dm.app.predict``).

Settings are ``main.py``'s flags, by name (``f_coreset=0.05``, ``rgb_backbone_name=...``), on top of a
configuration file or a ``Settings`` object when ``config=`` gives one; an unknown name is refused with the
closest valid one. ``import m3dm`` loads none of this: the package's ``fit``, ``load``, ``Model``, ... are
imported on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from m3dm.app.outputs import check_classes_exist
from m3dm.app.parts import LoadedPart, Part, load_part, part_from_arrays
from m3dm.app.predict import Predictor, score_loaded_parts
from m3dm.app.run import ClassRun, build_models, run_setup
from m3dm.config import (
    METHODS,
    BackboneSettings,
    Settings,
    checked_settings,
    read_settings_file,
    settings_from_flags,
    settings_with,
)
from m3dm.data.check import require_usable_dataset
from m3dm.data.io import HUGE_COORDINATES, check_same_size, huge_pixels, read_organized_pc, read_rgb
from m3dm.data.layout import available_classes
from m3dm.detection.persistence import ClassModel, Setup, load_class_model
from m3dm.detection.thresholds import Thresholds
from m3dm.errors import ConfigError, DataError, ModelFileError
from m3dm.runtime import resolve_device, seed_everything, use_device

__all__ = ["Evaluation", "Model", "Prediction", "fit", "load"]

PathLike = str | os.PathLike[str]
ImageInput = PathLike | np.ndarray | Image.Image  # a file, an (H, W, 3) uint8 array or a Pillow image
CloudInput = PathLike | np.ndarray  # a TIFF file or an organized (H, W, 3) float array
# The settings ``fit`` starts from (before ``config=`` and its keyword arguments): main.py's defaults.
DEFAULTS = Settings()


# ------------------------------------------------------------------------------------------------ results

@dataclass(frozen=True)
class Prediction:
    """One part scored by a model: the image score, the pass/fail decision and the anomaly map."""

    score: float  # the image score (higher: more anomalous; its scale depends on the method)
    normalised_score: float  # in [0, 1]: 0 at the lowest good-part score, 0.5 at the threshold, above it = fail
    anomaly_map: np.ndarray  # (224, 224) float32, on the 224 x 224 RGB image the model saw
    anomalous: bool  # the image score is above the model's image threshold
    region: np.ndarray  # (224, 224) bool: the pixels above the model's pixel threshold
    image_threshold: float
    pixel_threshold: float

    @property
    def result(self) -> str:
        """``"fail"`` (anomalous) or ``"pass"``, as ``m3dm-predict`` writes it."""
        return "fail" if self.anomalous else "pass"

    @classmethod
    def of(cls, score: float, anomaly_map: np.ndarray, thresholds: Thresholds) -> Prediction:
        return cls(score=score, normalised_score=thresholds.normalised(score), anomaly_map=anomaly_map,
                   anomalous=thresholds.fails(score), region=thresholds.region(anomaly_map),
                   image_threshold=thresholds.image, pixel_threshold=thresholds.pixel)


@dataclass(frozen=True)
class Evaluation:
    """A model's scores and metrics on the test split of a class."""

    metrics: dict[str, float]  # image_rocauc, pixel_rocauc, au_pro, au_pro_0.01, ... (those the data allows)
    names: list[str]  # <class>/test/<defect>/<stem>, in the order scored
    labels: np.ndarray  # (N,) 0 good, 1 anomalous
    scores: np.ndarray  # (N,) image scores
    maps: np.ndarray  # (N, 224, 224) float32 anomaly maps
    anomalous: np.ndarray  # (N,) bool: the image score is above the model's image threshold


# -------------------------------------------------------------------------------------------------- model

class Model:
    """A fitted class model: its detector with the backbones it was fitted with, and its pass/fail thresholds.

    Made by ``fit`` or ``load``. Scoring with the reference's training-mode point backbone (a model fitted
    without ``backbone_eval=True``) draws DropPath masks: ``evaluate`` starts the draws where fitting left them
    (the scores of ``main.py``), and ``predict`` continues them, as ``m3dm-predict`` does, so a part's score then
    depends on the parts scored before it. Fit with ``backbone_eval=True`` for scores of the part alone.
    """

    def __init__(self, run: ClassRun, setup: Setup, fitted_state: Any, provenance: dict,
                 thresholds: Thresholds):
        self._run, self._setup = run, setup
        self._fitted_state, self._provenance = fitted_state, provenance
        self.thresholds = thresholds  # may be replaced, e.g. by ``thresholds.with_overrides(image=...)``

    def __repr__(self) -> str:
        return f"Model({self.method!r}, class {self.class_name!r}, image threshold {self.thresholds.image:.6g})"

    @property
    def class_name(self) -> str:
        return self._run.class_name

    @property
    def method(self) -> str:
        return self.settings.detector.method_name

    @property
    def settings(self) -> Settings:
        """Every setting the model was fitted with (``m3dm.config.settings_yaml`` writes them as a file)."""
        return self._run.settings

    @classmethod
    def load(cls, path: PathLike, **options: Any) -> Model:
        """The same as ``m3dm.load``."""
        return load(path, **options)

    def save(self, path: PathLike) -> Path:
        """Write the model file ``main.py --save_model`` writes (``m3dm-predict --model`` and ``load`` read it)."""
        return self._run.fitted_detector.save(Path(path), class_name=self.class_name, setup=self._setup,
                                              rng_state=self._fitted_state, thresholds=self.thresholds,
                                              provenance=self._provenance)

    def predict(self, rgb: ImageInput, xyz: CloudInput, *, preprocess: bool = False,
                name: str | None = None) -> Prediction:
        """Score one part: its RGB image and organized point cloud, as files or arrays of the same height and
        width. ``preprocess``: a raw scan, cleaned first as ``m3dm-preprocess`` cleans the dataset."""
        part = _loaded_part(rgb, xyz, int(self.settings.backbones.img_size), preprocess, name)
        ((score, anomaly_map),) = score_loaded_parts(self._run.extractor, self._run.fitted_detector, [part])
        return Prediction.of(score, anomaly_map, self.thresholds)

    def evaluate(self, dataset_path: PathLike | None = None) -> Evaluation:
        """Scores, maps and metrics of the test split of the model's class (of ``dataset_path``: a dataset root
        holding that class, or a class folder; default: the data it was fitted on), as ``main.py`` computes
        them."""
        run = self._run if dataset_path is None else self._run_on(dataset_path)
        run.start()
        if self._fitted_state is not None:
            run.extractor.set_rng_state(self._fitted_state)
        result = run.evaluate()
        return Evaluation(metrics=dict(result.metrics), names=list(result.names), labels=result.labels,
                          scores=result.image_scores, maps=result.maps,
                          anomalous=np.array([self.thresholds.fails(s) for s in result.image_scores], dtype=bool))

    def _run_on(self, dataset_path: PathLike) -> ClassRun:
        """This model's detector and extractor, on another dataset."""
        root, class_name = locate_class(dataset_path, fallback=self.class_name)
        require_usable_dataset(root, [class_name], fitting=False)
        run = self._run
        other = ClassRun(self.settings.replace(run={"dataset_path": str(root), "classes": [class_name]}), class_name,
                         run.extractor, run.fusion_block, device=run.device, progress=run.progress)
        other.detector, other.thresholds = run.detector, self.thresholds
        return other


# ------------------------------------------------------------------------------------------- fit and load

def fit(dataset_path: PathLike, method: str | None = None, *, class_name: str | None = None,
        config: PathLike | Settings | None = None, progress: bool = False, **settings: Any) -> Model:
    """Fit one class, set its pass/fail thresholds on good parts, and return the model.

    ``dataset_path``: a class folder (``datasets/mvtec3d/bagel``) or a dataset root with ``class_name``.
    ``method``: one of ``m3dm.config.METHODS`` (its memory-bank setting follows it unless given). ``config``: a
    YAML file (``main.py --print_config`` writes one) or a ``Settings`` object to start from; ``settings``:
    any of main.py's flags by name, over it. ``progress``: progress bars on stderr.
    """
    root, name = locate_class(dataset_path, class_name)
    chosen = fit_settings(config, method, settings, root, name)
    check_classes_exist(root, [name])
    require_usable_dataset(root, [name], fitting=True)
    device = resolve_device(chosen.run.device)
    use_device(device)
    seed_everything(chosen.run.seed)  # random backbone weights are drawn from it, as in main.py
    extractor, fusion_block = build_models(chosen, device)
    run = ClassRun(chosen, name, extractor, fusion_block, device=device, progress=progress)
    run.start()
    run.fit()
    fitted_state = extractor.rng_state()
    thresholds = run.set_thresholds()
    return Model(run, run_setup(chosen, extractor, fusion_block), fitted_state, run.provenance(), thresholds)


def fit_settings(config: PathLike | Settings | None, method: str | None, values: dict[str, Any], root: Path,
                 class_name: str) -> Settings:
    """The settings ``fit`` runs with: ``DEFAULTS``, then ``config``, then the method and ``values``; checked."""
    if isinstance(config, Settings):
        base = config
    elif config is not None:
        base = settings_with(DEFAULTS, read_settings_file(config))
    else:
        base = DEFAULTS
    given = checked_settings(values, "m3dm.fit")
    placed = sorted(set(given) & {"dataset_path", "classes", "load_model"})
    if placed:
        raise ConfigError(f"m3dm.fit: {', '.join(placed)}: the data is fit's first argument (a class folder, or a "
                          f"dataset root with class_name=), and a saved model is read with m3dm.load")
    if method is not None:
        given.update(checked_settings({"method_name": method}, "m3dm.fit"))
        given.setdefault("memory_bank", METHODS[given["method_name"]].memory_bank)
    elif config is None and "method_name" not in given:
        raise ConfigError(f"m3dm.fit: give the method, e.g. method='DINO+Point_MAE' (one of {', '.join(METHODS)})")
    # thresholds are part of a model here: fitting holds their good parts out as main.py --save_model does
    given.update(dataset_path=str(root), classes=[class_name], save_model=True, load_model=None)
    chosen = settings_with(base, given)
    chosen.validate()
    return chosen


def load(path: PathLike, *, device: str = "auto", rgb_checkpoint: str | None = None,
         xyz_checkpoint: str | None = None, fusion_module_path: str | None = None, progress: bool = False) -> Model:
    """A model file written by ``Model.save`` or ``main.py --save_model``, with its backbones rebuilt and every
    checksum verified (``ModelFileError`` names the file and each difference). Weight files that moved since
    fitting are given by their new paths (only their checksums must match)."""
    model_file = load_class_model(Path(path))
    if model_file.thresholds is None:
        raise ModelFileError(f"{model_file.path}: the model holds no pass/fail thresholds (fit it with "
                             f"main.py --save_model or m3dm.fit)")
    chosen_device = resolve_device(device)
    use_device(chosen_device)
    predictor = Predictor(model_file, chosen_device, rgb_checkpoint, xyz_checkpoint, fusion_module_path)
    settings = settings_of_model(model_file, predictor.backbones, str(chosen_device), fusion_module_path)
    run = ClassRun(settings, model_file.class_name, predictor.extractor, predictor.fusion_block,
                   device=chosen_device, progress=progress)
    run.detector, run.thresholds = predictor.detector, model_file.thresholds
    provenance = dict(model_file.record.get("provenance") or {})
    return Model(run, model_file.setup, model_file.generator_state, provenance, model_file.thresholds)


def settings_of_model(model_file: ClassModel, backbones: BackboneSettings, device: str,
                      fusion_module_path: str | None = None) -> Settings:
    """The settings a model file records, with the backbones it was rebuilt with and the dataset it was fitted on."""
    values = {**Settings(detector=model_file.detector_settings).flags(), **model_file.settings,
              **{f.name: getattr(backbones, f.name) for f in fields(backbones)}}
    fusion = model_file.weights.get("fusion")
    fusion_path = fusion_module_path or (fusion.path if fusion is not None else None)
    if fusion_path:
        values["fusion_module_path"] = fusion_path
    fitted_on = (model_file.record.get("provenance") or {}).get("dataset_path")
    if fitted_on:
        values["dataset_path"] = fitted_on
    values.update(classes=[model_file.class_name], device=device)
    return settings_from_flags(values)


# ------------------------------------------------------------------------------------------------ inputs

def locate_class(dataset_path: PathLike, class_name: str | None = None,
                 fallback: str | None = None) -> tuple[Path, str]:
    """``(dataset root, class)`` from a class folder (one holding ``train`` or ``test``) or a root and a class
    name (``class_name``; else ``fallback`` when the root has it, else the root's only class)."""
    path = Path(dataset_path)
    if class_name is not None:
        return path, class_name
    if any((path / split).is_dir() for split in ("train", "test")):
        return path.parent, path.name
    classes = available_classes(path)
    if fallback is not None and fallback in classes:
        return path, fallback
    if len(classes) == 1:
        return path, classes[0]
    raise ConfigError(f"{path}: give class_name= or a class folder (classes there: {', '.join(classes) or 'none'})")


def _loaded_part(rgb: ImageInput, xyz: CloudInput, img_size: int, preprocess: bool,
                 name: str | None) -> LoadedPart:
    """One part's tensors from files or arrays (files are read as ``m3dm-predict`` reads them)."""
    rgb_path = None if isinstance(rgb, (np.ndarray, Image.Image)) else Path(rgb)
    xyz_path = None if isinstance(xyz, np.ndarray) else Path(xyz)
    part = Part(name or (xyz_path or rgb_path or Path("part")).stem, rgb_path, xyz_path)
    if rgb_path is not None and xyz_path is not None:
        return load_part(part, img_size, preprocess)
    image = read_rgb(rgb_path) if rgb_path is not None else _image(rgb)
    cloud = read_organized_pc(xyz_path) if xyz_path is not None else _cloud(xyz)
    check_same_size(cloud, image, xyz_path or "the xyz array", rgb_path or "the rgb array")
    return part_from_arrays(part, cloud, image, None, img_size, preprocess)


def _image(rgb: Any) -> Image.Image:
    if isinstance(rgb, Image.Image):
        return rgb.convert("RGB")
    array = np.asarray(rgb)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise DataError(f"the rgb array must be (H, W, 3) uint8, not {array.shape} {array.dtype}")
    return Image.fromarray(array)


def _cloud(xyz: Any) -> np.ndarray:
    array = np.asarray(xyz)
    if array.ndim != 3 or array.shape[2] != 3 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"the xyz array must be an organized (H, W, 3) float cloud, not {array.shape} {array.dtype}")
    with np.errstate(over="ignore"):
        cloud = array.astype(np.float32)  # the dtype of every cloud the backbones see (read_organized_pc)
    if not np.isfinite(cloud).all():
        raise DataError("the xyz array holds NaN, infinite or beyond-float32 values (missing points are zeros)")
    huge = huge_pixels(cloud)
    if huge:
        raise DataError(f"the xyz array: {huge} {HUGE_COORDINATES}")
    return cloud
