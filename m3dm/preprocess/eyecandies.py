"""Eyecandies -> MVTec 3D-AD layout (docs/original.md), vectorised and with the reference's path bugs fixed.

Per sample: depth PNG + normalisation range -> metric depth; back-projection through ``P = K · pose`` with
the fixed focal length 711.11 and principal point at the image centre; background removal relative to the
ground line through the top-centre and bottom-centre pixels; axes reordered to (x, z, y) and scaled by
(0.1, -0.1, 0.1); float64 TIFF. Background points get the reference's replacement value by default (x = 0,
y and z not), which the loader treats as invalid; ``exact_zero_background`` writes (0, 0, 0) instead.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from m3dm.data.io import copy_file, remove_stale_temporaries, write_png, write_tiff
from m3dm.errors import DataError
from m3dm.preprocess.common import JobResult, Summary, resolve_roots, run_jobs, timed
from m3dm.preprocess.depth import Intrinsics, depth_to_points

FOCAL_LENGTH = 711.11
RGB_LIGHTING = 4  # which of the six lighting images becomes the RGB input
GROUND_CLEARANCE = -0.02
MAX_DEPTH = 1.8
MAX_LATERAL = 1.0
SAMPLE_FILE = re.compile(r"^(\d+)_depth\.png$")


def read_depth(depth_png: Path, info_yaml: Path) -> np.ndarray:
    """16-bit depth PNG scaled into the metric range given by ``normalization.min/max`` -> float32 (H, W)."""
    try:
        info = yaml.safe_load(info_yaml.read_text())
        lo, hi = float(info["normalization"]["min"]), float(info["normalization"]["max"])
    except FileNotFoundError:
        raise DataError(f"{info_yaml}: depth normalisation file not found") from None
    except Exception as exc:
        raise DataError(f"{info_yaml}: cannot read normalization.min/max ({exc})") from exc
    try:
        with Image.open(depth_png) as image:
            raw = np.array(image)
    except Exception as exc:
        raise DataError(f"{depth_png}: not a readable depth PNG ({exc})") from exc
    if raw.ndim != 2 or raw.dtype not in (np.uint16, np.int32, np.uint8):
        raise DataError(f"{depth_png}: expected a single-channel 16-bit PNG, got shape {raw.shape} {raw.dtype}")
    return raw.astype(np.float32) / np.float32(65535) * np.float32(hi - lo) + np.float32(lo)


def read_pose(path: Path) -> np.ndarray:
    try:
        pose = np.loadtxt(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read the 4x4 pose matrix ({exc})") from exc
    if pose.shape != (4, 4):
        raise DataError(f"{path}: expected a 4x4 pose matrix, got shape {pose.shape}")
    return pose


def back_project(depth: np.ndarray, pose: np.ndarray, focal: float = FOCAL_LENGTH) -> np.ndarray:
    """Every pixel (row j, column i) -> ``depth · P⁻¹ (i, j, 1, 1/depth)``, first three components: the general
    depth back-projection (m3dm.preprocess.depth) with Eyecandies' camera (``focal``, principal point at the image
    centre) and ``pose``. Returns ``(H·W, 3)`` float64 in row-major pixel order; zero depth gives (0, 0, 0)."""
    height, width = depth.shape
    return depth_to_points(depth, Intrinsics(focal, focal, width / 2, height / 2), pose)


def remove_background(points: np.ndarray, width: int, exact_zero: bool = False) -> np.ndarray:
    """The reference's background removal on a flat ``(H·W, 3)`` cloud, then axes (x, z, y) × (0.1, -0.1, 0.1). The
    reference points are the top-centre and bottom-centre pixels (flat indices 256 and -256 for 512-wide images)."""
    top, bottom = points[width // 2], points[-(width - width // 2)]
    dz, dy = top[1] - bottom[1], top[2] - bottom[2]
    norm = np.hypot(dz, dy)
    cos, sin = dy / norm, dz / norm
    origin = np.array([0.0, bottom[1], bottom[2]])
    rotation = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
    q = (points - origin) @ rotation.T
    background = (q[:, 1] > GROUND_CLEARANCE) | (q[:, 2] > MAX_DEPTH) | (np.abs(q[:, 0]) > MAX_LATERAL)
    q[background] = -origin
    restored = q @ rotation + origin
    if exact_zero:
        restored[background] = 0
    return restored[:, [0, 2, 1]] * np.array([0.1, -0.1, 0.1])


def convert_cloud(depth_png: Path, info_yaml: Path, pose_txt: Path, exact_zero: bool = False) -> np.ndarray:
    depth = read_depth(depth_png, info_yaml)
    points = back_project(depth, read_pose(pose_txt))
    height, width = depth.shape
    return remove_background(points, width, exact_zero).reshape(height, width, 3)


@dataclass(frozen=True)
class EyecandiesJob:
    name: str
    data_dir: Path
    prefix: str  # "000" (train) or "00" (public test)
    out_dir: Path  # <target>/<Class>/<split>
    out_stem: str  # 3-digit
    is_test: bool
    exact_zero: bool


def convert_sample(job: EyecandiesJob) -> JobResult:
    src = lambda suffix: job.data_dir / f"{job.prefix}_{suffix}"
    cloud = convert_cloud(src("depth.png"), src("info_depth.yaml"), src("pose.txt"), job.exact_zero)
    rgb = src(f"image_{RGB_LIGHTING}.png")
    if not rgb.is_file():
        raise DataError(f"{rgb}: RGB image (lighting {RGB_LIGHTING}) not found")
    defect = "good"
    if job.is_test:
        mask_path = src("mask.png")
        if not mask_path.is_file():
            raise DataError(f"{mask_path}: ground-truth mask not found (the reference would silently call the "
                            f"sample good)")
        with Image.open(mask_path) as image:
            mask = np.array(image.convert("RGB"))
        defect = "bad" if mask.any() else "good"
        write_png(job.out_dir / defect / "gt" / f"{job.out_stem}.png", mask)
    copy_file(rgb, job.out_dir / defect / "rgb" / f"{job.out_stem}.png")
    write_tiff(job.out_dir / defect / "xyz" / f"{job.out_stem}.tiff", cloud)  # last: marks the sample done
    return JobResult(job.name, valid_points=int((cloud != 0).all(-1).sum()))


def _category_jobs(category: Path, target: Path, exact_zero: bool) -> list[EyecandiesJob]:
    jobs = []
    for split, out_split, is_test in (("train", "train", False), ("test_public", "test", True)):
        data_dir = category / split / "data"
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: folder not found (expected <Class>/{split}/data/)")
        prefixes = sorted(m.group(1) for p in data_dir.iterdir() if (m := SAMPLE_FILE.match(p.name)))
        if not prefixes:
            raise DataError(f"{data_dir}: no samples (*_depth.png) found")
        for prefix in prefixes:
            out_stem = f"{int(prefix):03d}"
            jobs.append(EyecandiesJob(f"{category.name}/{split}/{prefix}", data_dir, prefix,
                                      target / category.name / out_split, out_stem, is_test, exact_zero))
    return jobs


def _is_done(job: EyecandiesJob) -> bool:
    defects = ("good", "bad") if job.is_test else ("good",)
    return any((job.out_dir / d / "xyz" / f"{job.out_stem}.tiff").exists() for d in defects)


def convert_dataset(source, target=None, workers: int = 1, exact_zero: bool = False) -> Summary:
    """Convert every category folder of a raw Eyecandies root (train + public test) into ``target``."""
    start = time.perf_counter()
    source, target = resolve_roots(source, target, inplace=False)
    categories = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not categories:
        raise DataError(f"{source}: no category folders found")
    jobs = [job for category in categories for job in _category_jobs(category, target, exact_zero)]
    summary = Summary(source, target)
    remove_stale_temporaries(target)
    todo = []
    for job in jobs:
        if _is_done(job):
            summary.add(JobResult(job.name, skipped=True))
        else:
            todo.append(job)
    for result in run_jobs(todo, convert_sample, workers, desc="convert eyecandies"):
        summary.add(result)
    return timed(summary, start)
