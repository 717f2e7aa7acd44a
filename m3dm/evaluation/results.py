"""One class's evaluation (per test sample: label, image score, map, mask; metrics) and the files written from it.

The files: the ``--save_maps`` archive and the ``--save_preds`` pictures; the per-sample rows of
``per_sample.csv`` (written by ``tables.write_per_sample``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from m3dm.constants import PRO_THRESHOLDS, RGB_SIZE
from m3dm.data.io import atomic_path, read_rgb
from m3dm.evaluation.pictures import prediction_panel, save_panel

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
    xyz_paths: list[str] = field(default_factory=list)
    pro_curve: tuple[np.ndarray, np.ndarray] | None = None  # (FPRs, PROs) behind the AU-PRO, where computed
    pro_thresholds: int = PRO_THRESHOLDS  # of every PRO curve of this class (the method's count)


PER_SAMPLE_FIELDS = ("class", "split", "defect_type", "stem", "rgb_path", "xyz_path", "label", "image_score",
                     "map_max", "map_mean", "result", "image_threshold")


def per_sample_rows(result: ClassResult, fails: Callable[[float], bool] | None = None,
                    image_threshold: float | None = None) -> list[dict]:
    """One row per test sample, in the evaluation's order, of plain Python values (``PER_SAMPLE_FIELDS``):
    the name's parts, the paths, the label, the image score, the max and mean of the 224 x 224 map, and with a
    model's thresholds (``fails``: image score -> failed) ``result`` "pass"/"fail" and the image threshold (None
    without)."""
    xyz_paths: list[str | None] = list(result.xyz_paths) if result.xyz_paths else [None] * len(result.names)
    rows = []
    for name, rgb, xyz, label, score, score_map in zip(result.names, result.rgb_paths, xyz_paths, result.labels,
                                                       result.image_scores, result.maps, strict=True):
        class_name, split, defect, stem = name.split("/")
        verdict = None if fails is None else ("fail" if fails(float(score)) else "pass")
        rows.append({"class": class_name, "split": split, "defect_type": defect, "stem": stem, "rgb_path": rgb,
                     "xyz_path": xyz, "label": int(label), "image_score": float(score),
                     "map_max": float(np.max(score_map)), "map_mean": float(np.mean(score_map, dtype=np.float64)),
                     "result": verdict, "image_threshold": None if fails is None else image_threshold})
    return rows


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
    folder = Path(folder)
    vmin, vmax = float(result.maps.min()), float(result.maps.max())
    for name, path, score_map, mask, score in zip(result.names, result.rgb_paths, result.maps, result.masks,
                                                  result.image_scores):
        _, _, defect, stem = name.split("/")
        rgb = np.asarray(read_rgb(path).convert("RGB").resize((RGB_SIZE, RGB_SIZE), Image.Resampling.BICUBIC))
        panel = prediction_panel(rgb, mask if mask.any() else None, score_map, float(score), vmin, vmax,
                                 title=name)
        save_panel(folder / defect / f"{stem}.png", panel)
    return folder
