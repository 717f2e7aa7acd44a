"""What a report needs of one class (or one batch of predictions), saved at the end of the run in one ``.npz``.

A report must build later without the dataset and the models, so the run keeps, per test part: its name, label,
image score and pass/fail, small thumbnails (RGB, depth of the point cloud, the score map, the ground truth), the
pictures of its detail view at the maps' size (RGB, the heatmap's colour levels, the ground truth), its point cloud
decimated to ``CLOUD x CLOUD`` points with the score at each, and per class the PRO curve and the metrics by defect
type, both computed from the full-size maps while they exist. Files of older runs without the detail pictures and
the cloud still load (``ClassData.has_detail`` is False).
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import shlex
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any, TypeAlias

import numpy as np
from PIL import Image

import m3dm
from m3dm.constants import PRO_THRESHOLDS, RGB_SIZE
from m3dm.data.io import atomic_path, disk_writes, read_organized_pc, read_rgb, write_text
from m3dm.errors import DataError
from m3dm.evaluation.metrics import au_pro, image_auroc, pro_curve

log = logging.getLogger(__name__)

REPORT_DATA_DIR = "report_data"  # under the output folder: <class>.npz, and run.json for predictions
THUMBNAIL = 112  # pixels per side of every saved thumbnail (224 / 2: maps and masks shrink by 2 x 2 blocks)
UNKNOWN_LABEL = -1  # parts without a label (predictions on new parts)
DETAIL = RGB_SIZE  # pixels per side of a part's detail pictures: the size of its score map
CLOUD = 64  # points per side of a part's decimated cloud: at most 4,096 points, what a browser turns smoothly

# a class's thumbnails of one kind: an array, or a spool file read part by part (``SpooledThumbnails``)
Thumbnails: TypeAlias = "np.ndarray | SpooledThumbnails"


@dataclass
class ClassData:
    """One class's saved report data (``save_class_data``), thumbnails ``(N, T, T[, 3])`` in the test order (or
    ``SpooledThumbnails``: on disk, read one part at a time)."""

    class_name: str
    names: list[str]
    labels: np.ndarray  # int8: 0 good, 1 defective, UNKNOWN_LABEL
    scores: np.ndarray  # float64 image scores
    failed: np.ndarray | None  # bool per part with a model's threshold, else None
    image_threshold: float | None
    rgb: Thumbnails  # uint8 (N, T, T, 3)
    depth: Thumbnails  # float16 (N, T, T): z of the cloud, NaN where no point
    maps: Thumbnails  # float16 (N, T, T)
    masks: Thumbnails | None  # bool (N, T, T); None without ground truth masks
    map_range: tuple[float, float]  # the heatmaps' colour scale
    pro_curve: tuple[np.ndarray, np.ndarray] | None  # (FPRs, PROs) of the whole test split
    defect_metrics: dict  # defect type -> {"n": ..., metric: value or None}
    # the detail view (None in files of older runs): (N, D, D, 3) uint8 RGB, (N, D, D) uint8 heatmap colour levels
    # over ``map_range``, (N, D, D) bool ground truth (None without masks), (N, C, C, 3) float32 cloud (NaN: no
    # point), (N, 2, C) float32 where its grid lies in the frame (``cloud_sample``) and (N, C, C) float16 scores at
    # its points
    detail_rgb: Thumbnails | None = None
    detail_heat: Thumbnails | None = None
    detail_mask: Thumbnails | None = None
    cloud: Thumbnails | None = None
    cloud_at: Thumbnails | None = None
    cloud_scores: Thumbnails | None = None
    # predictions: each image score on [0, 1] with the model's threshold at 0.5 (docs/inference.md); else None
    normalised_scores: np.ndarray | None = None

    @property
    def has_detail(self) -> bool:
        return self.cloud is not None

    def detail(self, i: int) -> dict[str, Any] | None:
        """Part ``i``'s detail pictures by their field names without ``detail_`` (``rgb``, ``heat``, ``mask``: None
        without ground truth) and its ``cloud``, ``cloud_at`` and ``cloud_scores``; None where the file has none (an
        older run's)."""
        if not self.has_detail:
            return None
        return {key.removeprefix("detail_"): None if getattr(self, key) is None else getattr(self, key)[i]
                for key in DETAIL_KEYS}

    @property
    def has_labels(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels != UNKNOWN_LABEL).all())

    @functools.cached_property
    def defect_types(self) -> list[str]:
        """Each part's defect type (its folder); made once: the gallery asks for it part by part, and making the
        whole list for each part was quadratic in the parts (0.6 s at 1,000 parts, a minute at 10,000)."""
        return [name.split("/")[-2] if name.count("/") >= 1 else "" for name in self.names]


# ------------------------------------------------------------------------------------------- thumbnails

def shrink_rgb(rgb: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(size, size, 3)`` uint8 (area average)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.Resampling.BOX))


def shrink_maps(maps: np.ndarray, size: int = THUMBNAIL, reduce=np.mean) -> np.ndarray:
    """``(N, H, W)`` -> ``(N, size, size)`` by ``reduce`` over blocks (H and W multiples of ``size``), or by
    sampling the nearest pixel otherwise."""
    n, height, width = maps.shape
    if height % size == 0 and width % size == 0:
        blocks = maps.reshape(n, size, height // size, size, width // size)
        return reduce(blocks, axis=(2, 4))
    rows = ((np.arange(size) + 0.5) * height / size).astype(int)
    cols = ((np.arange(size) + 0.5) * width / size).astype(int)
    return maps[:, rows][:, :, cols]


def _organized(cloud: np.ndarray) -> np.ndarray:
    """An organized cloud as ``(H, W, 3)`` (given so or as ``(3, H, W)``)."""
    cloud = np.asarray(cloud)
    return cloud.transpose(1, 2, 0) if cloud.shape[0] == 3 and cloud.shape[-1] != 3 else cloud


def _points_at(cloud: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The points of an ``(H, W, 3)`` cloud at ``rows`` x ``cols`` as float32, NaN where there is no point
    (all-zero coordinates)."""
    points = cloud[rows][:, cols].astype(np.float32)
    points[~(points != 0).any(axis=2)] = np.nan
    return points


def depth_thumbnail(cloud: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """An organized cloud ``(H, W, 3)`` (or ``(3, H, W)``) -> its z at ``size x size`` nearest pixels, float16,
    NaN where there is no point (all-zero coordinates)."""
    cloud = _organized(cloud)
    height, width = cloud.shape[:2]
    rows = ((np.arange(size) + 0.5) * height / size).astype(int)
    cols = ((np.arange(size) + 0.5) * width / size).astype(int)
    return _points_at(cloud, rows, cols)[..., 2].astype(np.float16)


def cloud_sample(cloud: np.ndarray, size: int = CLOUD) -> tuple[np.ndarray, np.ndarray]:
    """The 3D view's decimation of an organized cloud ``(H, W, 3)`` (or ``(3, H, W)``): its points on a ``size x
    size`` grid over the bounding box of its points, so that a part small in the frame gets as many points as a
    large one, ``(size, size, 3)`` float32 (NaN: no point); and where the grid lies, ``(2, size)`` rows and columns
    as fractions of the frame (``sample_grid`` picks the pixels of a picture or map there)."""
    cloud = _organized(cloud)
    height, width = cloud.shape[:2]
    valid = (cloud != 0).any(axis=2)
    spans = []
    for axis, length in ((1, height), (0, width)):
        present = np.flatnonzero(valid.any(axis=axis))
        low, high = (present[0], present[-1] + 1) if present.size else (0, length)
        spans.append(low + ((np.arange(size) + 0.5) * (high - low) / size).astype(int))
    rows, cols = spans
    at = np.stack([(rows + 0.5) / height, (cols + 0.5) / width]).astype(np.float32)
    return _points_at(cloud, rows, cols), at


def sample_grid(picture: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The nearest pixels of ``picture`` ``(h, w, ...)`` at a grid ``at`` of ``cloud_sample``."""
    height, width = picture.shape[:2]
    rows = np.minimum((at[0] * height).astype(int), height - 1)
    cols = np.minimum((at[1] * width).astype(int), width - 1)
    return picture[rows][:, cols]


def heat_levels(maps: np.ndarray, map_range: tuple[float, float]) -> np.ndarray:
    """Score maps -> uint8 levels 0 to 255 over ``map_range`` (clipped): what the heatmap's colours show."""
    low, high = map_range
    scaled = (np.asarray(maps, dtype=np.float32) - low) / max(high - low, 1e-12)
    return np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def detail_pictures(rgb: np.ndarray, maps: np.ndarray, masks: np.ndarray | None, clouds: np.ndarray,
                    cloud_at: np.ndarray, map_range: tuple[float, float]) -> dict[str, np.ndarray]:
    """The detail-view arrays of ``N`` parts (``ClassData``'s ``detail_*`` and ``cloud*`` fields) from their RGB
    ``(N, DETAIL, DETAIL, 3)``, full-size maps ``(N, H, W)``, masks (or None) and decimated clouds with their grids
    (``cloud_sample``)."""
    maps = np.asarray(maps, dtype=np.float32)
    pictures = {"detail_rgb": np.asarray(rgb, dtype=np.uint8),
                "detail_heat": heat_levels(maps if maps.shape[-1] == DETAIL else shrink_maps(maps, DETAIL), map_range),
                "cloud": np.asarray(clouds, dtype=np.float32), "cloud_at": np.asarray(cloud_at, dtype=np.float32),
                "cloud_scores": np.stack([sample_grid(m, at) for m, at in zip(maps, cloud_at)]).astype(np.float16)}
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        pictures["detail_mask"] = masks if masks.shape[-1] == DETAIL else shrink_maps(masks, DETAIL, reduce=np.any)
    return pictures


# ------------------------------------------------------------------------------------------------ saving

def defect_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray,
                   defect_types: list[str], pro_thresholds: int = PRO_THRESHOLDS) -> dict:
    """Per defect type: the number of parts, their mean score and the metrics of the good parts with that type's
    parts (image AUROC, AU-PRO up to FPR 0.3 with the method's ``pro_thresholds``); ``good``: its count and mean
    only. Undefined metrics (no mask, a single label) are None. (No pixel AUROC per type: sorting every pixel again
    per type would cost seconds per class.)"""
    types = np.asarray(defect_types)
    good = labels == 0
    table = {}
    for defect in dict.fromkeys(defect_types):
        chosen = types == defect
        row: dict = {"n": int(chosen.sum()), "mean_score": float(np.mean(scores[chosen]))}
        if defect != "good" and good.any():
            subset = good | chosen
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                row["image_rocauc"] = _finite(image_auroc(labels[subset], scores[subset]))
                if masks is not None and masks[chosen].any():
                    row["au_pro"] = _finite(au_pro(masks[subset], maps[subset], num_thresholds=pro_thresholds))
                else:
                    row["au_pro"] = None
        table[defect] = row
    return table


def _finite(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def read_thumbnails(rgb_paths: list[str], xyz_paths: list[str | None]) -> dict[str, np.ndarray]:
    """The pictures of the test parts read from their files, one part at a time: ``rgb`` ``(N, T, T, 3)`` and
    ``depth`` ``(N, T, T)`` thumbnails, ``detail_rgb`` ``(N, DETAIL, DETAIL, 3)``, ``cloud`` ``(N, CLOUD, CLOUD,
    3)`` (NaN without a cloud file) and ``cloud_at`` (``cloud_sample``)."""
    pictures: dict[str, list[np.ndarray]] = {"rgb": [], "depth": [], "detail_rgb": [], "cloud": [], "cloud_at": []}
    for rgb_path, xyz_path in zip(rgb_paths, xyz_paths):
        rgb = np.asarray(read_rgb(rgb_path))
        cloud = read_organized_pc(xyz_path) if xyz_path else None
        pictures["rgb"].append(shrink_rgb(rgb))
        pictures["detail_rgb"].append(shrink_rgb(rgb, DETAIL))
        pictures["depth"].append(depth_thumbnail(cloud) if cloud is not None else
                                 np.full((THUMBNAIL,) * 2, np.nan, np.float16))
        points, at = cloud_sample(cloud if cloud is not None else np.zeros((DETAIL, DETAIL, 3), np.float32))
        pictures["cloud"].append(points)
        pictures["cloud_at"].append(at)
    return {key: np.stack(values) for key, values in pictures.items()}


def save_class_data(result, rows: list[dict], path: str | Path,
                    thumbnails: dict[str, np.ndarray] | None = None) -> Path:
    """The report data of one evaluated class (``m3dm.evaluation.results.ClassResult`` and its per-sample rows,
    which hold pass/fail with a model's thresholds), written atomically. The RGB, depth, detail RGB and cloud
    pictures (``read_thumbnails``) are read from the test files unless given."""
    maps = np.asarray(result.maps, dtype=np.float32)
    masks = None if result.masks is None else np.asarray(result.masks) > 0
    if masks is not None and not masks.any():
        masks = None  # no ground truth: nothing to outline, no pixel metric
    labels = np.asarray(result.labels, dtype=np.int8)
    scores = np.asarray(result.image_scores, dtype=np.float64)
    defect_types = [name.split("/")[2] for name in result.names]
    curve = result.pro_curve  # the evaluation's, where it made one
    if curve is None and masks is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            curve = pro_curve(masks, maps, result.pro_thresholds)
    if thumbnails is None:
        thumbnails = read_thumbnails(result.rgb_paths, result.xyz_paths or [None] * len(result.names))
    thresholds = {row["image_threshold"] for row in rows}
    failed = None if None in thresholds else np.array([row["result"] == "fail" for row in rows])
    map_range = (float(maps.min()), float(maps.max()))
    detail = detail_pictures(thumbnails["detail_rgb"], maps, masks, thumbnails["cloud"], thumbnails["cloud_at"],
                             map_range)
    data = ClassData(class_name=result.names[0].split("/")[0], names=result.names, labels=labels, scores=scores,
                     failed=failed, image_threshold=None if failed is None else thresholds.pop(),
                     rgb=thumbnails["rgb"], depth=thumbnails["depth"], maps=maps, masks=masks, map_range=map_range,
                     pro_curve=curve,
                     defect_metrics=defect_metrics(labels, scores, masks, maps, defect_types, result.pro_thresholds),
                     **detail)
    return write_data(path, data)


def write_data(path: str | Path, data: ClassData) -> Path:
    """Write one ``ClassData`` file: maps and masks at full size (224) are shrunk to the thumbnails here; spooled
    thumbnails (``SpooledThumbnails``, at the thumbnail size) are written chunk by chunk, never whole in memory."""
    maps, masks, failed = data.maps, data.masks, data.failed
    if not isinstance(maps, SpooledThumbnails):
        maps = np.asarray(maps, dtype=np.float32)
        maps = (maps if maps.shape[-1] == THUMBNAIL else shrink_maps(maps)).astype(np.float16)
    if masks is not None and not isinstance(masks, SpooledThumbnails) and np.asarray(masks).shape[-1] != THUMBNAIL:
        masks = shrink_maps(np.asarray(masks, dtype=bool), reduce=np.any)
    n = len(data.names)
    arrays = {
        "class_name": np.asarray(data.class_name), "names": np.asarray(data.names, dtype=str),
        "labels": np.asarray(data.labels, dtype=np.int8).reshape(n),
        "scores": np.asarray(data.scores, np.float64).reshape(n),
        "failed": np.asarray([] if failed is None else failed, dtype=bool),
        "has_threshold": np.asarray(failed is not None),
        "image_threshold": np.asarray(np.nan if data.image_threshold is None else data.image_threshold,
                                      dtype=np.float64),
        "rgb": _typed(data.rgb, np.uint8), "depth": _typed(data.depth, np.float16),
        "maps": maps, "has_masks": np.asarray(masks is not None),
        "masks": _typed(masks if masks is not None else np.zeros((0,), bool), np.bool_),
        "map_range": np.asarray(data.map_range, dtype=np.float64),
        "pro_fprs": np.asarray([] if data.pro_curve is None else data.pro_curve[0], dtype=np.float64),
        "pro_pros": np.asarray([] if data.pro_curve is None else data.pro_curve[1], dtype=np.float64),
        "defect_metrics": np.asarray(json.dumps(data.defect_metrics)),
        "has_detail": np.asarray(data.has_detail),
    }
    if data.normalised_scores is not None:
        arrays["normalised_scores"] = np.asarray(data.normalised_scores, np.float64).reshape(n)
    for key in DETAIL_KEYS:  # absent (empty) in the data of a part without ground truth, or of an older file
        value = getattr(data, key)
        arrays[key] = _typed(value if value is not None else np.zeros((0,), SPOOL_RECORD[key].base),
                             SPOOL_RECORD[key].base.type)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        _write_npz(tmp, arrays)
    log.debug("%s: report data of %d parts", path, n)
    return path


def _typed(values: Thumbnails, dtype: type[np.generic]) -> Thumbnails:
    """An array as ``dtype``; spooled thumbnails as they are (they are written as the spool stores them)."""
    return values if isinstance(values, SpooledThumbnails) else np.ascontiguousarray(values, dtype=dtype)


def _write_npz(path: Path, arrays: dict[str, Thumbnails]) -> None:
    """What ``np.savez_compressed`` writes, with ``SpooledThumbnails`` members written chunk by chunk."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                if not isinstance(value, SpooledThumbnails):
                    np.lib.format.write_array(member, value, allow_pickle=False)
                    continue
                header = {"descr": np.lib.format.dtype_to_descr(value.stored_dtype), "fortran_order": False,
                          "shape": value.shape}
                np.lib.format.write_array_header_1_0(member, header)
                for chunk in value.chunks():
                    member.write(np.ascontiguousarray(chunk, dtype=value.stored_dtype).tobytes())


def read_member_chunks(archive: zipfile.ZipFile, key: str, size: int) -> Iterator[np.ndarray]:
    """The array ``key`` of an open data file, ``size`` rows at a time (its other rows are not in memory)."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with archive.open(f"{key}.npy") as member:
        shape, fortran_order, dtype = readers[np.lib.format.read_magic(member)](member)
        if fortran_order and len(shape) > 1:
            raise ValueError(f"{key}: Fortran-ordered array")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0] if shape else 0, size):
            count = min(size, shape[0] - start)
            data = member.read(count * row)
            if len(data) != count * row:
                raise ValueError(f"{key}: truncated array")
            yield np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])


DETAIL_KEYS = ("detail_rgb", "detail_heat", "detail_mask", "cloud", "cloud_at", "cloud_scores")  # ClassData's
THUMBNAIL_KEYS = ("rgb", "depth", "maps", "masks") + DETAIL_KEYS  # the arrays of a data file ``spool`` keeps on disk


def stored_pictures(archive: dict, has_masks: bool) -> tuple[str, ...]:
    """The per-part arrays a data file holds (``archive``: its small arrays): the thumbnails, and the detail
    pictures where it has them; the masks only with ground truth."""
    keys: tuple[str, ...] = ("rgb", "depth", "maps", "masks")
    if "has_detail" in archive and bool(archive["has_detail"]):
        keys += DETAIL_KEYS
    return tuple(k for k in keys if has_masks or k not in ("masks", "detail_mask"))


def load_class_data(path: str | Path, spool: bool = False) -> ClassData:
    """Read a file written by ``write_data``; with ``spool`` the thumbnails stay on disk (``spool_thumbnails``):
    what a report of any number of parts holds in memory at once is one part's."""
    pictures: dict[str, Thumbnails]
    try:
        with np.load(path, allow_pickle=False) as archive:
            a = {key: archive[key] for key in archive.files if not (spool and key in THUMBNAIL_KEYS)}
            keys = stored_pictures(a, bool(a["has_masks"]))
            pictures = spool_thumbnails(archive.zip, keys) if spool else {k: a[k] for k in keys}
        if not spool:
            pictures["maps"] = np.asarray(pictures["maps"], dtype=np.float32)
        has_threshold = bool(a["has_threshold"])
        fprs, pros = a["pro_fprs"], a["pro_pros"]
        rgb, depth, maps, masks = pictures["rgb"], pictures["depth"], pictures["maps"], pictures.get("masks")
        return ClassData(
            class_name=str(a["class_name"]), names=[str(n) for n in a["names"]], labels=a["labels"],
            scores=a["scores"], failed=a["failed"] if has_threshold else None,
            image_threshold=float(a["image_threshold"]) if has_threshold else None, rgb=rgb, depth=depth,
            maps=maps, masks=masks, map_range=(float(a["map_range"][0]), float(a["map_range"][1])),
            pro_curve=(fprs, pros) if fprs.size and np.isfinite(pros).all() else None,
            defect_metrics=json.loads(str(a["defect_metrics"])), normalised_scores=a.get("normalised_scores"),
            **{k: pictures.get(k) for k in DETAIL_KEYS})
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a readable report data file ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------------------- the run record

def software_versions() -> dict[str, str]:
    """Versions of Python and the packages that change numbers (a report and results.json show them)."""
    versions = {"python": platform.python_version(), "m3dm": m3dm.__version__}
    for package in ("torch", "timm", "numpy", "scipy", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the m3dm checkout that runs (with "+ local changes" when its tracked files differ from it);
    None outside a git checkout (an installed package) or without git."""
    folder = str(Path(m3dm.__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        changed = subprocess.run(["git", "-C", folder, "diff", "--quiet", "HEAD", "--", "."], capture_output=True,
                                 timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" + local changes" if changed else "")


def provenance() -> dict[str, str | None]:
    """Where a run comes from, for results.json and the report: its command line, the git commit, the host."""
    return {"command": shlex.join(sys.argv), "git_commit": git_commit(), "host": platform.node()}


def run_record(weights: dict) -> dict:
    """The fields a run adds to its results.json record for the report: software versions, the weights used
    (``persistence.weight_record`` by kind) and the ``provenance``."""
    return {"versions": software_versions(), "weights": weights, **provenance()}


def write_run_record(folder: str | Path, record: dict) -> Path:
    """``<folder>/report_data/run.json``: the record of a run that writes no results.json (predictions)."""
    path = Path(folder) / REPORT_DATA_DIR / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


# ------------------------------------------------------------------------------------------- predictions

# one part's thumbnails in the spool file of ``PredictionData`` (fixed size: part i starts at i x itemsize)
SPOOL_RECORD = np.dtype([("rgb", np.uint8, (THUMBNAIL, THUMBNAIL, 3)), ("depth", np.float16, (THUMBNAIL, THUMBNAIL)),
                         ("maps", np.float16, (THUMBNAIL, THUMBNAIL)), ("masks", np.bool_, (THUMBNAIL, THUMBNAIL)),
                         ("detail_rgb", np.uint8, (DETAIL, DETAIL, 3)), ("detail_heat", np.uint8, (DETAIL, DETAIL)),
                         ("detail_mask", np.bool_, (DETAIL, DETAIL)), ("cloud", np.float32, (CLOUD, CLOUD, 3)),
                         ("cloud_at", np.float32, (2, CLOUD)), ("cloud_scores", np.float16, (CLOUD, CLOUD))])
SPOOL_CHUNK = 16  # parts read back at a time (~6.5 MB: a part's record is ~410 KB)


class ThumbnailSpool:
    """Thumbnails appended to an anonymous file in ``folder`` as parts finish, read back ``SPOOL_CHUNK`` parts at a
    time: what a run keeps per part in memory does not grow with its thumbnails. The file has no name (the system
    deletes it when it is closed or the process ends, even killed), so no run leaves it behind."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.count = 0
        self._file: IO[bytes] | None = None
        self._last: tuple[int, np.ndarray] | None = None  # (index, record) of the last ``record`` read

    def append(self, record: np.ndarray) -> None:
        """One ``SPOOL_RECORD``; written at the end of the last whole record (a write cut short is overwritten)."""
        with disk_writes(self.folder):
            if self._file is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._file = tempfile.TemporaryFile(dir=self.folder, prefix="m3dm-thumbnails-")  # noqa: SIM115
            self._file.seek(self.count * SPOOL_RECORD.itemsize)
            self._last = None
            self._file.write(record.tobytes())
            self._file.flush()
        self.count += 1

    def record(self, index: int) -> np.ndarray:
        """The ``SPOOL_RECORD`` of part ``index`` (the last one read is kept: a part's fields are read one after
        the other, from one read of the file)."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        if self._last is None or self._last[0] != index:
            self._last = (index, self._read(index, 1)[0])
        return self._last[1]

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        """Field ``name`` of every record, in order."""
        for start in range(0, self.count, SPOOL_CHUNK):
            yield self._read(start, min(SPOOL_CHUNK, self.count - start))[name]

    def _read(self, start: int, count: int) -> np.ndarray:
        """Records ``start`` to ``start + count`` (appended ones)."""
        if self._file is None or start + count > self.count:
            raise IndexError(f"records {start} to {start + count} of a spool of {self.count}")
        self._file.seek(start * SPOOL_RECORD.itemsize)
        data = self._file.read(count * SPOOL_RECORD.itemsize)
        if len(data) != count * SPOOL_RECORD.itemsize:
            raise OSError(f"the report thumbnails' spool file in {self.folder} was truncated")
        return np.frombuffer(data, dtype=SPOOL_RECORD)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.count = 0
        self._last = None


class SpooledThumbnails:
    """One kind of thumbnail (``name``: a field of ``SPOOL_RECORD``) of a class's parts in a ``ThumbnailSpool``, in
    place of its array in a ``ClassData``: indexed (``[i]``, as ``dtype``) to draw one part, as the arrays of
    ``load_class_data``; read in order a chunk at a time (``chunks``, as ``stored_dtype``) to be written."""

    def __init__(self, spool: ThumbnailSpool, name: str, dtype: type[np.generic] | None = None):
        self.spool, self.name = spool, name
        self.stored_dtype = SPOOL_RECORD[name].base
        self.dtype = self.stored_dtype if dtype is None else np.dtype(dtype)

    def __len__(self) -> int:
        return self.spool.count

    def __getitem__(self, index: int) -> np.ndarray:
        return self.spool.record(index)[self.name].astype(self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.spool.count, *SPOOL_RECORD[self.name].shape)

    def chunks(self) -> Iterator[np.ndarray]:
        return self.spool.chunks(self.name)


def thumbnail_records(archive: zipfile.ZipFile, fields: tuple[str, ...]) -> Iterator[np.ndarray]:
    """The per-part arrays ``fields`` of an open data file as ``SPOOL_RECORD`` arrays of up to ``SPOOL_CHUNK``
    parts, in order (the other fields zero)."""
    for chunks in zip(*(read_member_chunks(archive, key, SPOOL_CHUNK) for key in fields)):
        records = np.zeros(len(chunks[0]), dtype=SPOOL_RECORD)
        for key, chunk in zip(fields, chunks):
            records[key] = chunk
        yield records


def spool_thumbnails(archive: zipfile.ZipFile, fields: tuple[str, ...]) -> dict[str, Thumbnails]:
    """The per-part arrays ``fields`` of an open data file copied to a spool file in the system's temporary folder a
    chunk at a time, as ``load_class_data`` gives them (``maps`` as float32)."""
    spool = ThumbnailSpool(tempfile.gettempdir())
    for records in thumbnail_records(archive, fields):
        for record in records:
            spool.append(record)
    return {key: SpooledThumbnails(spool, key, np.float32 if key == "maps" else None) for key in fields}


@dataclass
class PredictionData:
    """The report data of ``m3dm.predict``, gathered part by part (no labels: new parts). Names, scores and
    pass/fail stay in memory; the thumbnails go to a spool file in ``spool_folder`` (the system's temporary folder
    when None) until ``save``, so memory stays flat over any number of parts. ``close`` deletes the spool."""

    class_name: str
    image_threshold: float
    map_range: tuple[float, float]
    spool_folder: str | Path | None = None
    normalise: Callable[[float], float] | None = None  # an image score's normalised score (Thresholds.normalised)

    def __post_init__(self):
        self.names, self.scores, self.failed = [], [], []
        self.has_masks = False  # any part with a ground truth: the file then holds a mask per part (blank if none)
        self.spool = ThumbnailSpool(tempfile.gettempdir() if self.spool_folder is None else self.spool_folder)

    def add(self, name: str, score: float, failed: bool, rgb: np.ndarray, cloud: np.ndarray, gt: np.ndarray | None,
            score_map: np.ndarray) -> None:
        """One scored part: ``rgb (224, 224, 3)`` uint8, ``cloud (3, S, S)``, ``gt (224, 224)`` or None, the map."""
        record = np.zeros((), dtype=SPOOL_RECORD)
        score_map = np.asarray(score_map, dtype=np.float32)[None]
        record["rgb"] = shrink_rgb(rgb)
        record["depth"] = depth_thumbnail(cloud)
        record["maps"] = shrink_maps(score_map)[0]
        masks = None if gt is None else np.asarray(gt, dtype=bool)[None]
        if masks is not None:
            record["masks"] = shrink_maps(masks, reduce=np.any)[0]
        detail_rgb = rgb if rgb.shape[0] == DETAIL else shrink_rgb(rgb, DETAIL)
        points, at = cloud_sample(cloud)
        for key, value in detail_pictures(detail_rgb[None], score_map, masks, points[None], at[None],
                                          self.map_range).items():
            record[key] = value[0]
        self._append(record, name, score, failed, gt is not None)

    def _append(self, record: np.ndarray, name: str, score: float, failed: bool, has_mask: bool) -> None:
        self.spool.append(record)  # first: a part whose thumbnails could not be written is not listed
        self.names.append(name)
        self.scores.append(float(score))
        self.failed.append(bool(failed))
        self.has_masks = self.has_masks or has_mask

    def resume(self, folder: str | Path, names: list[str]) -> None:
        """Start from the parts ``names`` an earlier run scored into ``folder``, as its report data holds them
        (parts it lacks, scored by a run that was killed before writing it, are left out of the report). The
        earlier thumbnails are copied to the spool a chunk at a time."""
        path = Path(folder) / REPORT_DATA_DIR / f"{self.class_name}.npz"
        if not path.is_file():
            log.warning("%s not found: the %d part(s) scored earlier are in the tables but not in the report", path,
                        len(names))
            return
        try:
            with np.load(path, allow_pickle=False) as archive:
                earlier = {key: archive[key] for key in ("names", "scores", "failed", "has_threshold", "has_masks",
                                                         "has_detail") if key in archive.files}
                index = {str(name): i for i, name in enumerate(earlier["names"])}
                kept = sorted(index[name] for name in names if name in index)
                if len(kept) < len(names):
                    log.warning("%s: %d of the %d part(s) scored earlier have no report data: they are in the "
                                "tables but not in the report", path, len(names) - len(kept), len(names))
                self._copy_earlier(archive.zip, earlier, set(kept))
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a readable report data file ({type(exc).__name__}: {exc})") from exc

    def _copy_earlier(self, archive: zipfile.ZipFile, earlier: dict, kept: set[int]) -> None:
        has_masks = bool(earlier["has_masks"])
        failed = earlier["failed"] if bool(earlier["has_threshold"]) else np.zeros(len(earlier["names"]), bool)
        start = 0
        for records in thumbnail_records(archive, stored_pictures(earlier, has_masks)):
            for i in range(start, start + len(records)):
                if i in kept:
                    self._append(records[i - start], str(earlier["names"][i]), earlier["scores"][i], failed[i],
                                 has_masks)
            start += len(records)

    def save(self, folder: str | Path, record: dict) -> Path | None:
        """``report_data/<class>.npz`` and ``report_data/run.json`` under ``folder``; None without scored parts."""
        if not self.names:
            return None
        write_run_record(folder, record)
        spool = self.spool
        data = ClassData(class_name=self.class_name, names=self.names,
                         labels=np.full(len(self.names), UNKNOWN_LABEL, dtype=np.int8),
                         scores=np.asarray(self.scores, dtype=np.float64), failed=np.asarray(self.failed, dtype=bool),
                         image_threshold=self.image_threshold, rgb=SpooledThumbnails(spool, "rgb"),
                         depth=SpooledThumbnails(spool, "depth"), maps=SpooledThumbnails(spool, "maps"),
                         masks=SpooledThumbnails(spool, "masks") if self.has_masks else None,
                         map_range=self.map_range, pro_curve=None, defect_metrics={},
                         normalised_scores=None if self.normalise is None else
                         np.asarray([self.normalise(score) for score in self.scores], dtype=np.float64),
                         **{key: SpooledThumbnails(spool, key) for key in DETAIL_KEYS
                            if self.has_masks or key != "detail_mask"})
        return write_data(Path(folder) / REPORT_DATA_DIR / f"{self.class_name}.npz", data)

    def close(self) -> None:
        """Delete the spool file (the data is lost unless saved)."""
        self.spool.close()
