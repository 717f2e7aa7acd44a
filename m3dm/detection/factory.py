"""The detector of a method: which class fits, scores, saves and loads it (``MethodSpec.family``).

Every family's detector implements ``m3dm.detection.interface.ClassDetector``, the one surface ``m3dm.app.run``
and ``m3dm.app.predict`` use (docs/architecture.md, "How a new method plugs in").
"""

from __future__ import annotations

from m3dm.config import METHODS, DetectorSettings
from m3dm.detection.cfm import CFMDetector
from m3dm.detection.detector import Detector
from m3dm.detection.g2sf import G2SFDetector
from m3dm.detection.interface import ClassDetector, DetectorResources
from m3dm.detection.persistence import ClassModel

DETECTOR_CLASSES: dict[str, type[ClassDetector]] = {"m3dm": Detector, "cfm": CFMDetector, "g2sf": G2SFDetector}


def detector_class(method_name: str) -> type[ClassDetector]:
    """The detector class of a method, by its family."""
    family = METHODS[method_name].family
    if family not in DETECTOR_CLASSES:
        raise ValueError(f"{method_name}: no detector for the method family {family!r}")
    return DETECTOR_CLASSES[family]


def training_cap(config: DetectorSettings, max_sample: int) -> int:
    """How many training samples (the first ones, in order) the method's detector is fitted on."""
    return detector_class(config.method_name).training_cap(config, max_sample)


def build_detector(config: DetectorSettings, resources: DetectorResources) -> ClassDetector:
    """An unfitted detector of ``config.method_name``."""
    return detector_class(config.method_name).build(config, resources)


def detector_from_model(model: ClassModel, resources: DetectorResources) -> ClassDetector:
    """The fitted detector of a loaded and verified class-model file."""
    return detector_class(model.method_name).from_model(model, resources)
