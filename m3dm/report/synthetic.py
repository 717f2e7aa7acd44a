"""Saved results of made-up runs, for tests and the report benchmark: the files a run writes (results.json,
per_sample.csv/.json, report_data/<class>.npz), written by the run's own writers from synthetic arrays."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from m3dm.constants import RGB_SIZE
from m3dm.detection.thresholds import Thresholds
from m3dm.evaluation.metrics import compute_metrics
from m3dm.evaluation.results import ClassResult, per_sample_rows
from m3dm.evaluation.tables import write_per_sample, write_results
from m3dm.report.data import (
    REPORT_DATA_DIR,
    PredictionData,
    cloud_sample,
    depth_thumbnail,
    run_record,
    save_class_data,
    shrink_rgb,
)

DEFECTS = ("good", "crack", "hole", "color")


def synthetic_class(class_name: str, n_parts: int, rng: np.random.Generator, masks: bool = True) -> ClassResult:
    """``n_parts`` test parts (a quarter good) with square defects that the maps find more or less well."""
    defects = [DEFECTS[i % len(DEFECTS)] for i in range(n_parts)]
    labels = np.array([int(d != "good") for d in defects])
    yy, xx = np.mgrid[:RGB_SIZE, :RGB_SIZE]
    maps = rng.gamma(2.0, 0.05, size=(n_parts, RGB_SIZE, RGB_SIZE)).astype(np.float32)
    gts = np.zeros((n_parts, RGB_SIZE, RGB_SIZE), dtype=np.uint8)
    for i in np.flatnonzero(labels):
        cy, cx, r = rng.integers(40, 184), rng.integers(40, 184), rng.integers(8, 30)
        region = (abs(yy - cy) < r) & (abs(xx - cx) < r)
        gts[i][region] = 1
        maps[i][region] += rng.uniform(0.0, 0.6)
    if not masks:
        gts[:] = 0
    scores = maps.reshape(n_parts, -1).max(axis=1).astype(np.float64)
    names = [f"{class_name}/test/{d}/{i:03d}" for i, d in enumerate(defects)]
    paths = [f"/nonexistent/{n}.png" for n in names]  # the dataset is gone: the report must not need it
    with warnings.catch_warnings():  # without masks the pixel metrics are NaN, as a run's are
        warnings.simplefilter("ignore", RuntimeWarning)
        metrics = compute_metrics(labels, scores, gts, maps)
    return ClassResult(metrics, labels, scores, maps, gts, names, paths, [p.replace(".png", ".tiff") for p in paths])


def synthetic_parts(result: ClassResult, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RGB pictures ``(N, 224, 224, 3)`` and organized clouds ``(N, 224, 224, 3)`` of the parts: a tilted plane
    with a dent where the defect is, the defect tinted, no points along one edge."""
    n = len(result.names)
    yy, xx = np.mgrid[:RGB_SIZE, :RGB_SIZE] / RGB_SIZE
    defects = result.masks.astype(bool)
    clouds = np.stack([np.stack([xx - 0.5, yy - 0.5, 0.5 + 0.2 * xx + 0.1 * yy + 0.05 * rng.standard_normal()
                                 + 0.03 * defect], axis=-1) for defect in defects]).astype(np.float32)
    clouds[:, :, :16] = 0  # no point
    rgb = np.empty((n, RGB_SIZE, RGB_SIZE, 3), dtype=np.uint8)
    rgb[:] = rng.integers(90, 160, size=(n, 1, 1, 3))
    rgb[defects] = (200, 60, 40)
    return rgb, clouds


def synthetic_thumbnails(result: ClassResult, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The pictures ``read_thumbnails`` would read of ``synthetic_parts``."""
    rgb, clouds = synthetic_parts(result, rng)
    return {"rgb": np.stack([shrink_rgb(picture) for picture in rgb]), "detail_rgb": rgb,
            "depth": np.stack([depth_thumbnail(cloud) for cloud in clouds]),
            **dict(zip(("cloud", "cloud_at"), map(np.stack, zip(*(cloud_sample(cloud) for cloud in clouds)))))}


def write_synthetic_predictions(folder: str | Path, n_parts: int, class_name: str = "gadget", seed: int = 0,
                                method: str = "DINO+Point_MAE", errors: int = 2) -> Path:
    """The output folder of a made-up ``m3dm.predict`` batch: its report data, run record and ``predictions.jsonl``
    (the scored parts and ``errors`` parts that could not be read; no heatmaps)."""
    rng = np.random.default_rng(seed)
    result = synthetic_class(class_name, n_parts, rng)
    rgb, clouds = synthetic_parts(result, rng)
    threshold = float(np.median(result.image_scores))
    good = result.image_scores[result.labels == 0]
    thresholds = Thresholds(image=threshold, pixel=float(np.median(result.maps)), far=0.5, pixel_far=0.5,
                            source="synthetic", n_parts=len(good), good_image_scores=tuple(map(float, good)),
                            good_pixel_min=float(result.maps.min()), good_pixel_max=float(result.maps.max()))
    data = PredictionData(class_name, threshold, (float(result.maps.min()), float(result.maps.max())),
                          normalise=thresholds.normalised)
    try:
        for i, name in enumerate(result.names):
            gt = result.masks[i] > 0
            data.add(name.split("/", 1)[1], result.image_scores[i], result.image_scores[i] > threshold, rgb[i],
                     clouds[i], gt if gt.any() else None, result.maps[i])
        record = {"kind": "predict", "method": method, "model": f"/models/{class_name}.pt", "class": class_name,
                  "thresholds": f"image {threshold:.6g}", "config": {"method_name": method},
                  "timings_s": {"predict": 1.5 * n_parts}, **run_record({})}
        data.save(folder, record)
    finally:
        data.close()
    rows = [{"name": name, "result": "fail" if failed else "pass", "error": None}
            for name, failed in zip(data.names, data.failed)]
    rows += [{"name": f"unreadable/{i:03d}", "result": "error", "error": f"unreadable/{i:03d}.tiff: not a TIFF file"}
             for i in range(errors)]
    (Path(folder) / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Path(folder)


def write_synthetic_results(folder: str | Path, classes: list[str], n_parts: int, method: str = "DINO+Point_MAE",
                            seed: int = 0, threshold: bool = True, random_weights: bool = True,
                            masks: bool = True) -> Path:
    """The output folder of a made-up ``main.py`` run (``threshold``: as with --save_model, pass/fail rows)."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    per_class, rows_all = {}, []
    for class_name in classes:
        result = synthetic_class(class_name, n_parts, rng, masks)
        good = result.image_scores[result.labels == 0]
        image_threshold = float(np.max(good)) if threshold else None
        fails = None if image_threshold is None else (lambda s, t=image_threshold: s > t)
        rows = per_sample_rows(result, fails, image_threshold)
        save_class_data(result, rows, folder / REPORT_DATA_DIR / f"{class_name}.npz",
                        thumbnails=synthetic_thumbnails(result, rng))
        per_class[class_name] = result.metrics
        rows_all += rows
    source = "random" if random_weights else "file"
    weights = {kind: {"name": name, "source": source, "seed": 0 if random_weights else None,
                      "path": None if random_weights else f"/checkpoints/{name}.pth", "sha256": None}
               for kind, name in (("rgb", "vit_base_patch8_224_dino"), ("xyz", "Point_MAE"))}
    config = {"method_name": method, "random_init": random_weights, "classes": list(classes), **run_record(weights)}
    timings = {"extract": 12.5 * len(classes), "coreset": 3.0 * len(classes), "test scoring": 1.5 * len(classes)}
    write_results(folder, method, per_class, config, timings)
    write_per_sample(folder, rows_all)
    return folder
