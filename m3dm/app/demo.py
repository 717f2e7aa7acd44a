"""``main.py --demo``: synthetic data generated and preprocessed once, then DINO+Point_MAE on two classes."""

from __future__ import annotations

import logging
from pathlib import Path

from m3dm.config import Settings
from m3dm.data.synthetic import write_mvtec3d
from m3dm.features.weights import default_checkpoint_available
from m3dm.preprocess.mvtec3d import preprocess_dataset

DEMO_CLASSES = ("gadget", "widget")

log = logging.getLogger(__name__)


def prepare_demo(settings: Settings, progress: bool = True) -> Settings:
    """Write the demo data under ``--demo_root`` (kept between runs) and return the demo's settings: its data and
    classes, DINO+Point_MAE (or G2SF when asked for), prediction pictures, ``results/demo`` unless another output
    folder was given, and random backbone weights when no pretrained ones are found."""
    raw = write_mvtec3d(Path(settings.run.demo_root) / "synthetic_mvtec3d", classes=DEMO_CLASSES, progress=progress)
    summary = preprocess_dataset(raw, workers=2)
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
    # G2SF (--method_name G2SF) runs as asked; every other method gives way to DINO+Point_MAE
    method = "G2SF" if settings.detector.method_name == "G2SF" else "DINO+Point_MAE"
    return settings.replace(run=run, detector={"method_name": method, "memory_bank": "multiple"},
                            backbones={"random_init": random_init})
