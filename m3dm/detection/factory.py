"""The detector of a method: which class fits, scores, saves and loads it (``MethodSpec.family``).

Every family's detector has the surface ``m3dm.app.run`` and ``m3dm.app.predict`` use: ``needs_rgb`` /
``needs_xyz``, ``add`` per training sample, ``finalize``, ``uses_dlf`` (and then ``fit_fusion``),
``release_training_samples``, ``modality_patches``, ``predict``, ``n_train``, ``to_state`` / ``from_state`` /
``save`` / ``from_model``, and the static ``training_cap`` (how many training samples it is fitted on); optionally
``fit_stage``, the name the run's timings give ``finalize`` (docs/architecture.md, "How a new method plugs in").
"""

from __future__ import annotations

from m3dm.config import METHODS, DetectorSettings
from m3dm.detection.cfm import CFMDetector
from m3dm.detection.detector import Detector, sample_cap
from m3dm.detection.persistence import ClassModel


def detector_class(method_name: str) -> type:
    """The detector class of a method, by its family."""
    family = METHODS[method_name].family
    classes = {"m3dm": Detector, "cfm": CFMDetector}
    if family not in classes:
        raise ValueError(f"{method_name}: no detector for the method family {family!r}")
    return classes[family]


def training_cap(config: DetectorSettings, max_sample: int) -> int:
    """How many training samples (the first ones, in order) the method's detector is fitted on (a detector class
    without ``training_cap`` takes M3DM's ``sample_cap``)."""
    cls = detector_class(config.method_name)
    if hasattr(cls, "training_cap"):
        return cls.training_cap(config, max_sample)
    return sample_cap(max_sample, config.fix_quirks)


def build_detector(config: DetectorSettings, fusion_block=None, device="cpu", progress: bool = True,
                   spool_dir=None):
    """An unfitted detector of ``config.method_name``."""
    return detector_class(config.method_name)(config, fusion_block, device=device, progress=progress,
                                              spool_dir=spool_dir)


def detector_from_model(model: ClassModel, fusion_block=None, device="cpu", progress: bool = True):
    """The fitted detector of a loaded and verified class-model file."""
    return detector_class(model.method_name).from_model(model, fusion_block, device, progress=progress)
