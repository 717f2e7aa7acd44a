"""The one interface every method's detector implements, and what the run lends a detector.

``m3dm.app.run`` (fitting, evaluation), ``m3dm.app.predict`` and the model files (``m3dm.detection.factory``)
see a detector only through :class:`ClassDetector`. The memory-bank methods (``detector.Detector``), CFM
(``cfm.CFMDetector``) and G2SF (``g2sf.G2SFDetector``) implement it; a new method is one more class with these
members, named by its ``MethodSpec.family`` in ``factory.py`` (docs/architecture.md, "How a new method plugs in").

Fitting one class, as the run does it:

1. ``training_cap`` training samples, in order: ``add(features)`` each (``needs_rgb`` / ``needs_xyz`` say which
   backbones the extractor runs);
2. ``finalize()`` (timed under the name ``fit_stage``);
3. when ``uses_dlf``, pass 2 (:class:`FusionDetector`): the per-sample scores of every training sample, from
   ``training_patches(index)`` (kept by pass 1) or re-extracted, then ``fit_fusion`` on them;
4. ``release_training_samples()``, then ``save`` (the state of ``to_state``, tensors and primitives only).

Scoring: ``predict(modality_patches(features))`` gives the image score and the 224 x 224 map of one sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from typing_extensions import Self  # typing.Self from Python 3.11 on

from m3dm.config import DetectorSettings
from m3dm.data.layout import Sample
from m3dm.detection.persistence import ClassModel, Setup, save_class_model
from m3dm.detection.thresholds import Thresholds
from m3dm.errors import ModelFileError
from m3dm.features.extractor import SampleFeatures


@dataclass(frozen=True)
class TrainingData:
    """The class's training samples as files, for a method that makes new samples from them (G2SF's
    pseudo-anomalies) and extracts their features with the run's extractor."""

    root: Path  # the dataset
    dataset_type: str  # mvtec3d or eyecandies
    samples: tuple[Sample, ...]  # the training samples the detector is fitted on, in order
    classes: tuple[str, ...]  # every class of the dataset (G2SF draws anomaly sources from all of them)
    extract: Callable[..., list[SampleFeatures]]  # (rgb batch, cloud batch) -> features, the run's extractor
    seed: int = 0  # --seed
    batch_size: int = 1  # samples per extraction batch
    full_root: Path | None = None  # --g2sf_full_dataset_path
    anomaly_source: Path | None = None  # --g2sf_anomaly_source


@dataclass(frozen=True)
class DetectorResources:
    """What the run lends a detector besides its settings; a detector uses what it needs and ignores the rest."""

    device: torch.device | str = "cpu"  # where it fits and scores
    progress: bool = True  # tqdm bars on stderr
    fusion_block: nn.Module | None = None  # the UFF block, for the methods with a fusion bank (--use_uff)
    spool_dir: str | Path | None = None  # a folder where training rows may wait on disk (--spool_folder)
    training_data: TrainingData | None = None  # when fitting (G2SF needs it)


DEFAULT_RESOURCES = DetectorResources()


class SavesWholeState:
    """``save`` and ``from_model`` of a detector whose whole fitted state is ``to_state()``, rebuilt by
    ``from_state(config, state, device=..., progress=...)`` (CFM, G2SF): written once for every such method."""

    method_title = "?"  # the method's name in the message about an unreadable model file

    def to_state(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_state(cls, config: DetectorSettings, state: dict, device: torch.device | str = "cpu",
                   progress: bool = True) -> Self:
        raise NotImplementedError

    def save(self, path: str | Path, *, class_name: str, setup: Setup, rng_state: Tensor | None = None,
             thresholds: Thresholds | None = None, provenance: dict | None = None) -> Path:
        """Write the fitted state to a class-model file (``m3dm.detection.persistence``)."""
        return save_class_model(path, class_name=class_name, setup=setup, detector_state=self.to_state(),
                                generator_state=rng_state, thresholds=thresholds, provenance=provenance)

    @classmethod
    def from_model(cls, model: ClassModel, resources: DetectorResources = DEFAULT_RESOURCES) -> Self:
        try:
            return cls.from_state(model.detector_settings, model.detector_state, device=resources.device,
                                  progress=resources.progress)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f"{model.path}: the saved {cls.method_title} detector is incomplete or "
                                 f"inconsistent ({type(exc).__name__}: {exc})") from exc


class ClassDetector(Protocol):
    """The detector of one class of one method: fitted on good training samples, then scoring test samples."""

    fit_stage: str  # what ``finalize`` does, as the run's timings name it
    n_train: int  # training samples added (or, once loaded, that it was fitted on)

    @property
    def needs_rgb(self) -> bool: ...

    @property
    def needs_xyz(self) -> bool: ...

    @property
    def uses_dlf(self) -> bool:
        """Whether fitting has pass 2 (then the detector is also a :class:`FusionDetector`)."""
        ...

    @staticmethod
    def training_cap(config: DetectorSettings, max_sample: int) -> int:
        """How many training samples (the first ones, in order) the detector is fitted on."""
        ...

    @classmethod
    def build(cls, config: DetectorSettings, resources: DetectorResources) -> Self:
        """An unfitted detector."""
        ...

    @classmethod
    def from_model(cls, model: ClassModel, resources: DetectorResources) -> Self:
        """The fitted detector of a loaded and verified class-model file (errors: ``ModelFileError``)."""
        ...

    def modality_patches(self, features: SampleFeatures) -> dict[str, Any]:
        """What ``add`` keeps and ``predict`` scores of one sample's features."""
        ...

    def add(self, features: SampleFeatures) -> None: ...

    def finalize(self) -> None: ...

    def release_training_samples(self) -> None: ...

    def predict(self, patches: dict[str, Any]) -> tuple[float, Tensor]:
        """Image score and ``(224, 224)`` float32 map (on the CPU) of one sample."""
        ...

    def to_state(self) -> dict:
        """Everything scoring needs once fitted, as tensors and primitives (what a model file stores)."""
        ...

    def save(self, path: str | Path, *, class_name: str, setup: Setup, rng_state: Tensor | None = None,
             thresholds: Thresholds | None = None, provenance: dict | None = None) -> Path:
        """Write the fitted detector to a class-model file (``persistence.save_class_model``)."""
        ...


@runtime_checkable
class FusionDetector(ClassDetector, Protocol):
    """A detector whose fitting has pass 2 (``uses_dlf``): a model fitted on the training samples' own scores."""

    def fusion_samples(self) -> list[int]:
        """The indices of the training samples pass 2 scores (all, unless an approximate mode caps them)."""
        ...

    def training_patches(self, index: int) -> dict[str, Any]:
        """Pass-1 patches of training sample ``index`` (pass 2 without a second extraction)."""
        ...

    def modality_scores(self, patches: dict[str, Any]) -> Any:
        """The per-sample scores pass 2 fits on (opaque to the run: it hands them back to ``fit_fusion``)."""
        ...

    def fit_fusion(self, training_scores: list[Any]) -> None: ...


def fusion_pass(detector: ClassDetector) -> FusionDetector | None:
    """The detector, when its fitting has pass 2 (``uses_dlf``); None otherwise."""
    if not detector.uses_dlf:
        return None
    if not isinstance(detector, FusionDetector):
        raise TypeError(f"{type(detector).__name__} says it uses pass 2 but has no training_patches, "
                        f"modality_scores and fit_fusion")
    return detector
