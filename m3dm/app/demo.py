"""``main.py --demo``: synthetic data generated and preprocessed once, then DINO+Point_MAE on two classes."""

from __future__ import annotations

import logging
from pathlib import Path

from m3dm.config import METHODS, DetectorSettings, Settings
from m3dm.data.synthetic import write_mvtec3d
from m3dm.features.weights import default_checkpoint_available
from m3dm.preprocess.mvtec3d import preprocess_dataset

DEMO_CLASSES = ("gadget", "widget")

log = logging.getLogger(__name__)


def prepare_demo(settings: Settings, progress: bool = True) -> Settings:
    """Write the demo data under ``--demo_root`` (kept between runs) and return the demo's settings: its data and
    classes, DINO+Point_MAE (or the method asked for: :func:`demo_detector`), prediction pictures, ``results/demo``
    unless another output folder was given, and random backbone weights when no pretrained ones are found."""
    raw = write_mvtec3d(Path(settings.run.demo_root) / "synthetic_mvtec3d", classes=DEMO_CLASSES, progress=progress)
    summary = preprocess_dataset(raw, workers=2, progress=progress)
    log.info(summary.report())
    run = {"dataset_path": str(summary.output), "classes": list(DEMO_CLASSES), "save_preds": True}
    if settings.run.output_dir == "results":
        run["output_dir"] = "results/demo"
    backbones = settings.backbones
    have_weights = all(default_checkpoint_available(kind, name) for kind, name in
                       (("rgb", backbones.rgb_backbone_name), ("xyz", backbones.xyz_backbone_name)))
    random_init = backbones.random_init
    if not have_weights and not random_init:
        log.warning("demo: pretrained weights not found under checkpoints/ (see checkpoints/README.md): running "
                    "with RANDOM backbone weights")
        random_init = True
    return settings.replace(run=run, detector=demo_detector(settings.detector, settings.uff.use_uff),
                            backbones={"random_init": random_init})


def demo_detector(detector: DetectorSettings, use_uff: bool = False) -> dict[str, str]:
    """The demo's ``--method_name`` and ``--memory_bank``: those given, except that the default method
    (DINO+Point_MAE+Fusion, which needs a UFF block the demo has not got unless ``--use_uff`` is given) becomes
    DINO+Point_MAE, and a ``--memory_bank`` left at its default becomes ``single`` for the methods that have no
    decision layer fusion (``--demo --method_name BTF_FPFH`` runs BTF_FPFH). Any other combination is checked as
    main.py checks it."""
    defaults = DetectorSettings()
    method = detector.method_name
    if method == defaults.method_name and not use_uff:
        method = "DINO+Point_MAE"
    memory_bank = detector.memory_bank
    if memory_bank == defaults.memory_bank and METHODS[method].combine in ("single", "add"):
        memory_bank = "single"
    return {"method_name": method, "memory_bank": memory_bank}
