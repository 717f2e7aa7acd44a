"""One class's evaluation (per test sample: label, image score, map, mask; metrics) and the files written from it.

The files: the ``--save_maps`` archive and the ``--save_preds`` pictures.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m3dm.data.io import atomic_path

log = logging.getLogger(__name__)


@dataclass
class ClassResult:
    metrics: dict
    labels: np.ndarray
    image_scores: np.ndarray
    maps: np.ndarray  # (N, 224, 224) float32
    masks: np.ndarray  # (N, 224, 224) uint8
    names: list[str]  # <class>/<split>/<defect>/<stem>
    rgb_paths: list[str]


def save_score_maps(result: ClassResult, path: str | Path) -> Path:
    """Names, labels, image scores and ``(N, 224, 224)`` float32 maps of one class in one compressed ``.npz``,
    written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, names=np.asarray(result.names), labels=result.labels,
                        image_scores=result.image_scores, maps=result.maps.astype(np.float32))
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    log.debug("%s: %d maps written", path, len(result.names))
    return path


def save_prediction_pictures(result: ClassResult, folder: str | Path) -> Path:
    """One PNG per test sample, ``<folder>/<defect>/<stem>.png``: RGB | GT | heatmap overlay with the image score,
    every heatmap on the colour scale of the class's lowest and highest map values."""
    from PIL import Image

    from m3dm.constants import RGB_SIZE
    from m3dm.data.io import read_rgb
    from m3dm.evaluation.pictures import prediction_panel, save_panel

    folder = Path(folder)
    vmin, vmax = float(result.maps.min()), float(result.maps.max())
    for name, path, score_map, mask, score in zip(result.names, result.rgb_paths, result.maps, result.masks,
                                                  result.image_scores):
        _, _, defect, stem = name.split("/")
        rgb = np.asarray(read_rgb(path).convert("RGB").resize((RGB_SIZE, RGB_SIZE), Image.BICUBIC))
        panel = prediction_panel(rgb, mask if mask.any() else None, score_map, float(score), vmin, vmax,
                                 title=name)
        save_panel(folder / defect / f"{stem}.png", panel)
    return folder
