"""MVTec 3D-AD preprocessing (docs/original.md): background-plane removal, square padding, DBSCAN cleaning.

The algorithm is the reference's, step for step (thresholds, RANSAC parameters, padding rule, the DBSCAN
"largest label wins, noise label included" rule; DBSCAN labels are exactly Open3D's, computed by a
cell-based algorithm that is two orders of magnitude faster on dense scans). What differs is how it is run:
the source is never modified (a complete copy of the tree is written to an output root), each file is written
atomically, a run resumes where an interrupted one stopped, samples run in parallel, and RANSAC is seeded.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m3dm.data.io import (
    check_same_size,
    open_image,
    read_organized_pc,
    remove_stale_temporaries,
    to_rgb,
    write_png,
    write_tiff,
)
from m3dm.data.layout import SPLITS, available_classes, discover_samples
from m3dm.errors import DataError
from m3dm.preprocess.common import JobResult, Summary, copy_other_files, resolve_roots, run_jobs, timed
from m3dm.preprocess.dbscan import dbscan_labels

EDGE_BAND = 10
RANSAC_DISTANCE = 0.004
RANSAC_N = 50
RANSAC_ITERATIONS = 1000
PLANE_REMOVAL_DISTANCE = 0.005
DBSCAN_EPS = 0.006
DBSCAN_MIN_POINTS = 30
PAD_MULTIPLE = 100
log = logging.getLogger(__name__)
DONE_LOG = ".m3dm_preprocess_done"  # only used with --inplace, where outputs cannot mark completion


def valid_mask(cloud: np.ndarray) -> np.ndarray:
    return (cloud != 0).all(axis=-1)


def edge_band_points(cloud: np.ndarray, band: int = EDGE_BAND) -> np.ndarray:
    """Valid points of the outer ``band`` rows and columns (corners twice, as in the reference)."""
    parts = [cloud[:band], cloud[-band:], cloud[:, :band], cloud[:, -band:]]
    points = np.concatenate([p.reshape(-1, 3) for p in parts])
    return points[valid_mask(points)]


def fit_background_plane(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """RANSAC plane ``(a, b, c, d)`` with Open3D's ``segment_plane`` and the reference's parameters, or, where
    Open3D is not installed (a GPU machine's own Python, say), :func:`ransac_plane`, which gives the same plane
    wherever both find the same inliers (tests compare them on synthetic and real scans)."""
    if len(points) < RANSAC_N:
        raise DataError(f"only {len(points)} valid points in the {EDGE_BAND}-pixel border band; at least "
                        f"{RANSAC_N} are needed to fit the background plane")
    try:
        import open3d as o3d
    except ImportError:
        _warn_no_open3d()
        return ransac_plane(points.astype(np.float64), seed)
    o3d.utility.random.seed(seed)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    plane, _ = cloud.segment_plane(distance_threshold=RANSAC_DISTANCE, ransac_n=RANSAC_N,
                                   num_iterations=RANSAC_ITERATIONS)
    return np.asarray(plane)


@functools.cache
def _warn_no_open3d() -> None:
    log.warning("open3d is not installed: the background plane is fitted by m3dm's NumPy RANSAC")


def ransac_plane(points: np.ndarray, seed: int = 0, iterations: int = RANSAC_ITERATIONS) -> np.ndarray:
    """Open3D's ``segment_plane`` without Open3D: ``iterations`` least-squares planes of ``RANSAC_N`` random
    points; the one with the most points within ``RANSAC_DISTANCE`` wins (ties: the smaller summed distance over
    the square root of the count, as Open3D ranks them); the result is the least-squares plane of its inliers,
    computed as Open3D computes it. The samples differ from Open3D's (another random generator), but the final
    plane depends only on the winner's inlier set, so on a scan with a clear background plane it is Open3D's
    bit for bit. ``points`` is float64 ``(N, 3)``."""
    rng = np.random.default_rng(seed)
    best_count, best_error, best = 0, np.inf, None
    for start in range(0, iterations, 100):  # 100 candidate planes at a time bound the (N, planes) distances
        picks = np.stack([rng.choice(len(points), RANSAC_N, replace=False)
                          for _ in range(min(100, iterations - start))])
        planes = least_squares_plane(points[picks])
        distance = np.abs(points @ planes[:, :3].T + planes[:, 3])
        within = distance < RANSAC_DISTANCE
        counts = within.sum(axis=0)
        errors = np.where(within, distance, 0).sum(axis=0) / np.sqrt(np.maximum(counts, 1))
        counts[~planes.any(axis=1)] = 0  # a degenerate sample is skipped, as Open3D skips it
        first = np.lexsort((errors, -counts))[0]  # the chunk's best; the first of equals, as in Open3D's loop
        if counts[first] > best_count or (counts[first] == best_count and errors[first] < best_error):
            best_count, best_error, best = counts[first], errors[first], planes[first]
    inliers = None if best is None else np.abs(points @ best[:3] + best[3]) < RANSAC_DISTANCE
    if inliers is None or not inliers.any():
        raise DataError("no background plane found in the border band (the RANSAC found no inliers)")
    return least_squares_plane(points[inliers])


def least_squares_plane(points: np.ndarray) -> np.ndarray:
    """The plane ``(a, b, c, d)``, unit normal, of least summed squared distance to float64 ``points`` ``(N, 3)``
    (or one plane per leading index of ``(..., N, 3)``), computed operation for operation as Open3D's
    ``GetPlaneFromPoints`` (sums in point order, hence ``accumulate``; the normal from the largest of the three
    2 x 2 determinants), so that the same points give the same bits. All zeros where the points span no plane."""
    def total(values: np.ndarray) -> np.ndarray:
        return np.add.accumulate(values, axis=-1)[..., -1]  # left to right, as Open3D's loop adds

    x, y, z = np.moveaxis(points, -1, 0)
    count = float(points.shape[-2])
    cx, cy, cz = total(x) / count, total(y) / count, total(z) / count
    rx, ry, rz = x - cx[..., None], y - cy[..., None], z - cz[..., None]
    xx, xy, xz = total(rx * rx), total(rx * ry), total(rx * rz)
    yy, yz, zz = total(ry * ry), total(ry * rz), total(rz * rz)
    det_x, det_y, det_z = yy * zz - yz * yz, xx * zz - xz * xz, xx * yy - xy * xy
    by_x = np.stack([det_x, xz * yz - xy * zz, xy * yz - xz * yy], axis=-1)
    by_y = np.stack([xz * yz - xy * zz, det_y, xy * xz - yz * xx], axis=-1)
    by_z = np.stack([xy * yz - xz * yy, xy * xz - yz * xx, det_z], axis=-1)
    use_x, use_y = (det_x > det_y) & (det_x > det_z), det_y > det_z
    normal = np.where(use_x[..., None], by_x, np.where(use_y[..., None], by_y, by_z))
    a, b, c = np.moveaxis(normal, -1, 0)
    norm = np.sqrt(a * a + b * b + c * c)
    safe = np.where(norm == 0, 1.0, norm)
    a, b, c = a / safe, b / safe, c / safe
    plane = np.stack([a, b, c, -(a * cx + b * cy + c * cz)], axis=-1)
    return np.where((norm == 0)[..., None], 0.0, plane)


def remove_plane(cloud: np.ndarray, rgb: np.ndarray, plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero every pixel (cloud and RGB) closer than 5 mm to the plane."""
    distance = np.abs(cloud @ plane[:3] + plane[3])
    near = distance < PLANE_REMOVAL_DISTANCE
    cloud, rgb = cloud.copy(), rgb.copy()
    cloud[near] = 0
    rgb[near] = 0
    return cloud, rgb


def pad_to_square(array: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """Zero-pad H and W up to the next multiple of ``multiple``, then to a square of the larger side,
    splitting the padding floor-first (top/left) as the reference does."""
    height, width = array.shape[:2]
    side = max(-(-height // multiple) * multiple, -(-width // multiple) * multiple)
    top, left = (side - height) // 2, (side - width) // 2
    pad = [(top, side - height - top), (left, side - width - left)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="constant")


def largest_cluster_mask(points: np.ndarray) -> tuple[np.ndarray, int]:
    """Boolean mask of the points in the most populous DBSCAN label (the noise label -1 competes too, as in
    the reference), and the number of labels found. The labels are exactly Open3D's (see ``dbscan``)."""
    labels = dbscan_labels(points, eps=DBSCAN_EPS, min_points=DBSCAN_MIN_POINTS)
    ids, counts = np.unique(labels, return_counts=True)
    return labels == ids[np.argmax(counts)], len(ids)


def clean_with_dbscan(cloud: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep only the largest DBSCAN cluster; everything else is zeroed in the cloud and the RGB image."""
    valid = valid_mask(cloud)
    if not valid.any():
        return cloud, rgb, 0
    keep, n_labels = largest_cluster_mask(cloud[valid])
    drop = np.zeros(valid.shape, bool)
    drop[valid] = ~keep
    cloud, rgb = cloud.copy(), rgb.copy()
    cloud[drop] = 0
    rgb[drop] = 0
    return cloud, rgb, n_labels


def preprocess_arrays(cloud: np.ndarray, rgb: np.ndarray, gt: np.ndarray | None = None, seed: int = 0):
    """The whole per-sample algorithm on arrays. Returns ``(cloud, rgb, gt, n_labels)``; gt may be None."""
    plane = fit_background_plane(edge_band_points(cloud), seed)
    cloud, rgb = remove_plane(cloud, rgb, plane)
    cloud, rgb = pad_to_square(cloud), pad_to_square(rgb)
    gt = None if gt is None else pad_to_square(gt)
    cloud, rgb, n_labels = clean_with_dbscan(cloud, rgb)
    return cloud, rgb, gt, n_labels


@dataclass(frozen=True)
class SampleJob:
    name: str
    xyz: Path
    rgb: Path
    gt: Path | None
    out_xyz: Path
    out_rgb: Path
    out_gt: Path | None
    seed: int
    done_log: Path | None  # set with --inplace


def process_sample(job: SampleJob) -> JobResult:
    cloud = read_organized_pc(job.xyz)  # float32, whatever the file's float type
    with open_image(job.rgb, "RGB image") as image:
        check_same_size(cloud, image, job.xyz, job.rgb)
        rgb = np.array(to_rgb(image, job.rgb))
    gt = None
    if job.gt is not None:
        with open_image(job.gt, "ground-truth mask") as mask:
            check_same_size(cloud, mask, job.xyz, job.gt)
            gt = np.array(mask)
    cloud, rgb, gt, n_labels = preprocess_arrays(cloud, rgb, gt, job.seed)
    if gt is not None and job.out_gt is not None:  # set together with job.gt, where the ground truth comes from
        write_png(job.out_gt, gt)
    write_png(job.out_rgb, rgb)
    write_tiff(job.out_xyz, cloud)  # written last: its presence marks the sample as done
    if job.done_log is not None:
        with open(job.done_log, "a") as log:
            log.write(job.name + "\n")
    return JobResult(job.name, valid_points=int(valid_mask(cloud).sum()), clusters=n_labels)


def _sample_paths(source: Path) -> tuple[list, set[Path]]:
    """All samples of all classes and splits (pairing validated up front), and the set of their files."""
    class_dirs = [p for p in sorted(source.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if not class_dirs:
        raise DataError(f"{source}: no class folders found")
    with_splits = set(available_classes(source))
    samples = []
    for class_dir in class_dirs:
        if class_dir.name not in with_splits:
            raise DataError(f"{class_dir}: class folder holds no train/validation/test split")
        for split in SPLITS:
            if (class_dir / split).is_dir():
                samples += discover_samples(source, class_dir.name, split)
    files = set()
    for s in samples:
        files.update({s.rgb_path, s.xyz_path} | ({s.gt_path} if s.gt_path else set()))
    return samples, files


def _good_gt(sample) -> Path | None:
    """Good test samples may carry a gt folder; the reference pads those masks too."""
    candidate = sample.xyz_path.parent.parent / "gt" / f"{sample.stem}.png"
    return candidate if candidate.is_file() else None


def preprocess_dataset(source, output=None, inplace: bool = False, workers: int = 1, seed: int = 0,
                       progress: bool = True) -> Summary:
    """Preprocess a whole raw MVTec 3D-AD tree into ``output`` (default ``<source>_preprocessed``), with a progress
    bar unless ``progress`` is False."""
    start = time.perf_counter()
    source, output = resolve_roots(source, output, inplace)
    samples, sample_files = _sample_paths(source)
    summary = Summary(source, output)
    remove_stale_temporaries(output)
    done = set()
    done_log = output / DONE_LOG if inplace else None
    if done_log is not None and done_log.exists():
        done = set(done_log.read_text().split())

    jobs: list[SampleJob] = []
    already: list[SampleJob] = []
    for s in samples:
        gt = s.gt_path or _good_gt(s)
        rel = lambda p: output / p.relative_to(source)
        job = SampleJob(s.name, s.xyz_path, s.rgb_path, gt, rel(s.xyz_path), rel(s.rgb_path),
                        rel(gt) if gt else None, seed, done_log)
        is_done = s.name in done if inplace else job.out_xyz.exists()
        (already if is_done else jobs).append(job)
        if gt:
            sample_files.add(gt)
    for job in already:
        summary.add(JobResult(job.name, skipped=True))

    if not inplace:
        summary.copied = copy_other_files(source, output, sample_files)
    for result in run_jobs(jobs, process_sample, workers, desc="preprocess mvtec3d", progress=progress):
        summary.add(result)
    return timed(summary, start)

