"""Depth-sensor input: depth images (16-bit PNG or float TIFF, times a depth scale) and camera intrinsics into
organized point clouds (``(H, W, 3)`` float32 TIFF, zeros where the depth is missing), vectorised.

A pixel (column u, row v) with depth d becomes the camera-frame point ``d · (x̃, ỹ, 1)`` with the normalised
coordinates ``x̃ = (u - cx) / fx``, ``ỹ = (v - cy) / fy``; an optional division-model distortion (MVTec 3D-AD's
camera, ``area_scan_division``) divides both by ``1 + k (x̃² + ỹ²)``; optional extrinsics (4 × 4, world to
camera) give world coordinates. Eyecandies' back-projection is this one with its fixed camera and pose
(m3dm.preprocess.eyecandies).

``convert_depth_dataset`` converts a tree in the MVTec 3D-AD layout whose samples hold ``depth/`` instead of
``xyz/``, with the rules of the other converters: the source is never modified, each file is written atomically
(the cloud last: it marks the sample done), an interrupted run resumes, samples run in parallel.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import yaml
from PIL import Image

from m3dm.data.io import copy_file, remove_stale_temporaries, write_tiff
from m3dm.data.layout import GOOD, SPLITS, group_by_stem, pairing_problems
from m3dm.errors import DataError
from m3dm.preprocess.common import JobResult, Summary, copy_other_files, resolve_roots, run_jobs, timed

CALIBRATION_FILE = Path("calibration") / "camera_parameters.json"  # MVTec 3D-AD's, per class folder


@dataclass(frozen=True)
class Intrinsics:
    """A pinhole camera in pixels (principal point ``cx, cy`` counted from the centre of the top-left pixel as
    0, 0), with an optional division-model distortion ``division`` on normalised coordinates and the image size
    it was calibrated for (checked against each depth image when known)."""

    fx: float
    fy: float
    cx: float
    cy: float
    division: float = 0.0
    width: int | None = None
    height: int | None = None

    def check_size(self, shape: tuple[int, ...], path: Path) -> None:
        if self.width is not None and self.height is not None and tuple(shape[:2]) != (self.height, self.width):
            raise DataError(f"{path}: depth image is {shape[1]}x{shape[0]} (WxH) but the camera intrinsics are for "
                            f"{self.width}x{self.height} images")

    def matrix(self) -> np.ndarray:
        """The 4 × 4 projection (homogeneous pixel from a camera point), as the Eyecandies reference builds it."""
        return np.array([[self.fx, 0, self.cx, 0], [0, self.fy, self.cy, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                        dtype=np.float64)


def intrinsics_from_mapping(values: dict, where: str) -> Intrinsics:
    """Intrinsics from a parsed file: MVTec 3D-AD's ``camera_parameters.json`` (HALCON ``area_scan_division``:
    focus, kappa, sx, sy, cx, cy, image_width, image_height), or ``fx, fy, cx, cy`` (optional ``width``,
    ``height``), or a 3 × 3 camera matrix under ``K`` or ``camera_matrix`` (a nested or flat list, or ROS's
    ``{data: [...]}``). ``where`` names the file in errors."""
    if not isinstance(values, dict):
        raise DataError(f"{where}: expected a mapping of camera parameters, got {type(values).__name__}")
    size = {"width": _optional_int(values, ("image_width", "width"), where),
            "height": _optional_int(values, ("image_height", "height"), where)}
    if "focus" in values:  # HALCON: metric focal length and pixel pitch, kappa in 1/m² on metric coordinates
        focus, kappa, sx, sy, cx, cy = (_number(values, key, where) for key in ("focus", "kappa", "sx", "sy", "cx",
                                                                                  "cy"))
        camera_type = values.get("camera_type", "area_scan_division")
        if camera_type not in ("area_scan_division", "area_scan_pinhole"):
            raise DataError(f"{where}: camera_type {camera_type!r} is not supported (area_scan_division or "
                            f"area_scan_pinhole)")
        division = kappa * focus**2 if camera_type == "area_scan_division" else 0.0
        return Intrinsics(focus / sx, focus / sy, cx, cy, division, width=size["width"], height=size["height"])
    matrix = values.get("K", values.get("camera_matrix"))
    if matrix is not None:
        if isinstance(matrix, dict):
            matrix = matrix.get("data")
        try:
            k = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
        except (TypeError, ValueError):
            raise DataError(f"{where}: the camera matrix must hold 9 numbers (3 x 3), got {matrix!r}") from None
        return Intrinsics(k[0, 0], k[1, 1], k[0, 2], k[1, 2], width=size["width"], height=size["height"])
    if not {"fx", "fy", "cx", "cy"} <= set(values):
        raise DataError(f"{where}: no camera intrinsics found: expected fx, fy, cx, cy, or a 3x3 matrix K, or "
                        f"MVTec 3D-AD's focus/kappa/sx/sy/cx/cy (keys present: {', '.join(map(str, values))})")
    fx, fy, cx, cy = (_number(values, key, where) for key in ("fx", "fy", "cx", "cy"))
    return Intrinsics(fx, fy, cx, cy, _number(values, "division", where) if "division" in values else 0.0, **size)


def _number(values: dict, key: str, where: str) -> float:
    try:
        number = float(values[key])
    except KeyError:
        raise DataError(f"{where}: camera parameter {key!r} missing") from None
    except (TypeError, ValueError):
        raise DataError(f"{where}: camera parameter {key!r} is not a number: {values[key]!r}") from None
    if not math.isfinite(number):
        raise DataError(f"{where}: camera parameter {key!r} is not finite: {number}")
    return number


def _optional_int(values: dict, keys: tuple[str, ...], where: str) -> int | None:
    key = next((k for k in keys if k in values), None)
    return None if key is None else int(_number(values, key, where))


def read_intrinsics(path: str | Path) -> Intrinsics:
    """Camera intrinsics from a JSON or YAML file (formats: ``intrinsics_from_mapping``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: camera intrinsics file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the camera intrinsics ({exc})") from exc
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({exc})") from exc
    intrinsics = intrinsics_from_mapping(values, str(path))
    if min(intrinsics.fx, intrinsics.fy) <= 0:
        raise DataError(f"{path}: focal lengths must be positive, got fx={intrinsics.fx}, fy={intrinsics.fy}")
    return intrinsics


def read_depth(path: str | Path, depth_scale: float | None = None) -> np.ndarray:
    """A depth image as float64 ``(H, W)`` depths: stored value × ``depth_scale`` (default 1 for float images;
    required for integer ones, e.g. 0.001 for millimetres). Zero, negative and non-finite depths become 0
    (missing)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: depth image not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            raw = tifffile.imread(path)
        else:
            with Image.open(path) as image:
                raw = np.array(image)
    except Exception as exc:  # the readers raise several exception types for corrupt files
        raise DataError(f"{path}: not a readable depth image ({type(exc).__name__}: {exc})") from exc
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2 or not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise DataError(f"{path}: expected a single-channel depth image, got shape {raw.shape} dtype {raw.dtype}")
    if depth_scale is None:
        if np.issubdtype(raw.dtype, np.integer):
            raise DataError(f"{path}: integer depth image ({raw.dtype}): give the depth scale (metres per unit, "
                            f"e.g. --depth_scale 0.001 for millimetres)")
        depth_scale = 1.0
    depth = raw.astype(np.float64) * float(depth_scale)
    depth[~np.isfinite(depth) | (depth <= 0)] = 0.0
    return depth


def depth_to_points(depth: np.ndarray, intrinsics: Intrinsics, extrinsics: np.ndarray | None = None) -> np.ndarray:
    """Back-project every pixel: ``(H, W)`` depths -> ``(H·W, 3)`` float64 points in row-major pixel order, in the
    camera frame, or in the world frame with ``extrinsics`` (4 × 4, world to camera). Pixels with zero depth
    become (0, 0, 0).

    Computed as ``d · (K · extrinsics)⁻¹ (u, v, 1, 1/d)``, the form of the Eyecandies reference (so that its
    conversion is this function, bit for bit); the distortion, when there is one, moves (u, v) first.
    """
    height, width = depth.shape
    pose = np.eye(4) if extrinsics is None else np.asarray(extrinsics, dtype=np.float64)
    inverse = np.linalg.inv(intrinsics.matrix() @ pose)
    rows, cols = np.mgrid[0:height, 0:width]
    u, v = cols.reshape(-1).astype(np.float64), rows.reshape(-1).astype(np.float64)
    if intrinsics.division:
        x, y = (u - intrinsics.cx) / intrinsics.fx, (v - intrinsics.cy) / intrinsics.fy
        factor = 1.0 / (1.0 + intrinsics.division * (x * x + y * y))
        u, v = intrinsics.cx + intrinsics.fx * x * factor, intrinsics.cy + intrinsics.fy * y * factor
    d = depth.reshape(-1).astype(np.float64)
    valid = d != 0
    safe = np.where(valid, d, 1.0)
    homogeneous = np.stack([u, v, np.ones_like(d), 1.0 / safe], axis=1)
    points = (homogeneous @ inverse.T)[:, :3] * safe[:, None]
    points[~valid] = 0
    return points


def organized_cloud(depth: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
    """``(H, W)`` depths -> the organized ``(H, W, 3)`` float32 camera-frame cloud; missing depths give (0, 0, 0).
    A valid point whose x or y is exactly 0 (on the principal axis) would read as missing, so such coordinates
    are nudged to the smallest float32 of their side (far below any sensor's resolution)."""
    height, width = depth.shape
    cloud = depth_to_points(depth, intrinsics).reshape(height, width, 3).astype(np.float32)
    valid = depth != 0
    on_axis = (cloud == 0) & valid[..., None]
    cloud[on_axis] = np.finfo(np.float32).tiny
    return cloud


def convert_depth_image(depth_path: str | Path, intrinsics: Intrinsics, depth_scale: float | None = None,
                        rgb_path: str | Path | None = None) -> np.ndarray:
    """One depth image -> its organized float32 cloud, sizes checked against the intrinsics and the RGB image."""
    depth_path = Path(depth_path)
    depth = read_depth(depth_path, depth_scale)
    intrinsics.check_size(depth.shape, depth_path)
    if rgb_path is not None:
        try:
            with Image.open(rgb_path) as image:
                size = image.size
        except Exception as exc:
            raise DataError(f"{rgb_path}: not a readable image ({type(exc).__name__}: {exc})") from exc
        if size != (depth.shape[1], depth.shape[0]):
            raise DataError(f"{rgb_path}: image is {size[0]}x{size[1]} (WxH) but its depth image {depth_path} is "
                            f"{depth.shape[1]}x{depth.shape[0]}")
    return organized_cloud(depth, intrinsics)


# ------------------------------------------------------------------------------------------ a whole tree

@dataclass(frozen=True)
class DepthJob:
    name: str  # <class>/<split>/<defect>/<stem>
    depth: Path
    rgb: Path
    gt: Path | None
    out_xyz: Path
    out_rgb: Path
    out_gt: Path | None
    intrinsics: Intrinsics
    depth_scale: float | None


def convert_depth_sample(job: DepthJob) -> JobResult:
    cloud = convert_depth_image(job.depth, job.intrinsics, job.depth_scale, job.rgb)
    copy_file(job.rgb, job.out_rgb)
    if job.gt is not None and job.out_gt is not None:  # set together
        copy_file(job.gt, job.out_gt)
    write_tiff(job.out_xyz, cloud)  # written last: its presence marks the sample as done
    return JobResult(job.name, valid_points=int((cloud != 0).all(-1).sum()))


def class_intrinsics(class_dir: Path, given: Intrinsics | None, intrinsics_file: Path | None) -> Intrinsics:
    """The camera of one class: ``given`` (flags), else ``intrinsics_file``, else the class's own
    ``calibration/camera_parameters.json`` (MVTec 3D-AD's)."""
    if given is not None:
        return given
    if intrinsics_file is not None:
        return read_intrinsics(intrinsics_file)
    own = class_dir / CALIBRATION_FILE
    if own.is_file():
        return read_intrinsics(own)
    raise DataError(f"{class_dir}: no camera intrinsics: give --fx --fy --cx --cy or --intrinsics FILE, or put "
                    f"the camera's parameters in {own}")


def _depth_jobs(source: Path, output: Path, intrinsics: Intrinsics | None, intrinsics_file: Path | None,
                depth_scale: float | None) -> tuple[list[DepthJob], set[Path]]:
    """Every sample of the tree (pairing checked up front, every problem at once) and the set of their files."""
    class_dirs = [p for p in sorted(source.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    jobs: list[DepthJob] = []
    files: set[Path] = set()
    problems: list[str] = []
    for class_dir in class_dirs:
        split_dirs = [class_dir / s for s in SPLITS if (class_dir / s).is_dir()]
        if not split_dirs:
            continue
        camera = class_intrinsics(class_dir, intrinsics, intrinsics_file)
        for split_dir in split_dirs:
            for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                has_gt = defect_dir.name != GOOD and (defect_dir / "gt").is_dir()
                kinds = ("rgb", "depth", "gt") if has_gt else ("rgb", "depth")
                groups = group_by_stem(defect_dir, kinds)
                problems += [f"{defect_dir}: {line}" for line in pairing_problems(groups, kinds)]
                for stem, found in groups.items():
                    if not {"rgb", "depth"} <= set(found):
                        continue
                    out = output / defect_dir.relative_to(source)
                    gt = found.get("gt") or _good_mask(defect_dir, stem)
                    jobs.append(DepthJob(f"{class_dir.name}/{split_dir.name}/{defect_dir.name}/{stem}",
                                         found["depth"], found["rgb"], gt, out / "xyz" / f"{stem}.tiff",
                                         out / "rgb" / found["rgb"].name, out / "gt" / gt.name if gt else None,
                                         camera, depth_scale))
                    files.update(p for p in (found["depth"], found["rgb"], gt) if p is not None)
    if problems:
        raise DataError(f"{source}: rgb/depth/gt files do not pair up by name:\n  " + "\n  ".join(problems))
    if not jobs:
        raise DataError(f"{source}: no samples found (expected <class>/<split>/<defect>/{{rgb,depth}}/<stem>.*)")
    return jobs, files


def _good_mask(defect_dir: Path, stem: str) -> Path | None:
    """Good folders may carry masks (MVTec 3D-AD's test/good/gt): copied along."""
    candidate = defect_dir / "gt" / f"{stem}.png"
    return candidate if candidate.is_file() else None


def convert_depth_dataset(source, output=None, *, intrinsics: Intrinsics | None = None,
                          intrinsics_file: str | Path | None = None, depth_scale: float | None = None,
                          workers: int = 1) -> Summary:
    """Convert a tree ``<source>/<class>/<split>/<defect>/{rgb,depth[,gt]}/<stem>.*`` into the MVTec 3D-AD layout
    under ``output`` (default ``<source>_xyz``): ``xyz/<stem>.tiff`` clouds, the RGB images and masks copied,
    every other file (calibration, readme) copied too. Samples already written are skipped."""
    start = time.perf_counter()
    source = Path(source)
    source, output = resolve_roots(source, output if output is not None else source.with_name(source.name + "_xyz"),
                                   inplace=False)
    jobs, sample_files = _depth_jobs(source, output, intrinsics, Path(intrinsics_file) if intrinsics_file else None,
                                     depth_scale)
    summary = Summary(source, output)
    remove_stale_temporaries(output)
    todo = []
    for job in jobs:
        if job.out_xyz.exists():
            summary.add(JobResult(job.name, skipped=True))
        else:
            todo.append(job)
    summary.copied = copy_other_files(source, output, sample_files)
    for result in run_jobs(todo, convert_depth_sample, workers, desc="convert depth"):
        summary.add(result)
    return timed(summary, start)

