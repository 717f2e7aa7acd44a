"""Synthetic datasets in the exact on-disk formats of MVTec 3D-AD (raw) and Eyecandies (raw).

MVTec 3D-AD scenes: a part (a raised, domed slab) lying on a tilted background plane, seen by a camera that
stores metric float32 ``(H, W, 3)`` organized point clouds; floating noise clusters; missing points (zeros);
RGB PNGs; binary ground-truth PNGs. Defects are localised: ``dent`` and ``bump`` change only the geometry,
``color`` only the colour, ``combined`` both, in the same region.

Eyecandies scenes: a sphere on a ground plane rendered through the Eyecandies camera model (focal length
711.11, principal point at the image centre) into a 16-bit depth PNG with its ``*_info_depth.yaml``
normalisation range, a ``*_pose.txt`` world-to-camera matrix, six lighting images ``*_image_{0..5}.png`` and
``*_mask.png``. ``make_eyecandies_scene`` also returns the exact world coordinates of every pixel so the
converter can be checked against ground truth.

Every sample is generated from its own seed derived from (seed, class, split, defect, index), so the output
does not depend on which other samples are generated.

Command line (``m3dm.app.synthetic``): ``python -m m3dm.data.synthetic OUT [--format mvtec3d|eyecandies]
[--classes a b] [--size 128] ...``
"""

from __future__ import annotations

import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from m3dm.data.io import write_png, write_text, write_tiff

MVTEC_DEFECTS = ("dent", "bump", "color", "combined")
GEOMETRY_DEFECTS = {"dent": -1.0, "bump": 1.0, "combined": -1.0}
COLOR_DEFECTS = ("color", "combined")
DEFAULT_CLASSES = ("gadget", "widget")
EYECANDIES_FOCAL_LENGTH = 711.11

# MVTec-like scene constants (metres)
FIELD_OF_VIEW = 0.10  # width of the imaged area
PLANE_DISTANCE = 0.65
SENSOR_NOISE = 0.0002
OBJECT_BASE_HEIGHT = 0.010  # well above the 5 mm plane-removal threshold
OBJECT_DOME_HEIGHT = 0.008
DEFECT_DEPTH = 0.003


def sample_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator that depends only on the seed and the sample's identity (stable across runs)."""
    entropy = [seed] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(entropy)


def _class_style(class_name: str) -> dict:
    rng = sample_rng(0, "style", class_name)
    return {
        "semi_axes": rng.uniform(0.020, 0.028, size=2),
        "exponent": rng.uniform(2.0, 5.0),  # superellipse: 2 = ellipse, larger = rounded rectangle
        "color": rng.uniform(60, 230, size=3),
        "defect_color": rng.uniform(0, 255, size=3),
    }


@dataclass
class MVTecScene:
    cloud: np.ndarray  # (H, W, 3) float32, metres, zeros = missing
    rgb: np.ndarray  # (H, W, 3) uint8
    gt: np.ndarray  # (H, W) uint8, 255 = defect
    labels: np.ndarray  # (H, W) uint8: 0 missing, 1 background plane, 2 object, 3 floating noise


MISSING, PLANE, OBJECT, NOISE = 0, 1, 2, 3


def _smooth_disc(distance: np.ndarray, radius: float) -> np.ndarray:
    """1 at the centre falling smoothly (raised cosine) to 0 at ``radius``."""
    inside = distance < radius
    return np.where(inside, 0.5 * (1 + np.cos(np.pi * np.minimum(distance / radius, 1))), 0.0)


def make_mvtec_scene(rng: np.random.Generator, height: int, width: int, class_name: str,
                     defect: str = "good") -> MVTecScene:
    """One raw MVTec 3D-AD-like sample; see the module docstring."""
    style = _class_style(class_name)
    pitch = FIELD_OF_VIEW / width
    rows, cols = np.mgrid[0:height, 0:width]
    x = (cols - width / 2 + 0.5) * pitch
    y = (rows - height / 2 + 0.5) * pitch
    tilt = rng.uniform(-0.15, 0.15, size=2)
    plane_z = PLANE_DISTANCE + tilt[0] * x + tilt[1] * y

    centre = rng.uniform(-0.004, 0.004, size=2)
    angle = rng.uniform(0, np.pi)
    u = (x - centre[0]) * np.cos(angle) + (y - centre[1]) * np.sin(angle)
    v = -(x - centre[0]) * np.sin(angle) + (y - centre[1]) * np.cos(angle)
    p = style["exponent"]
    rho = (np.abs(u / style["semi_axes"][0]) ** p + np.abs(v / style["semi_axes"][1]) ** p) ** (1 / p)
    on_object = rho < 1
    height_map = np.where(on_object, OBJECT_BASE_HEIGHT + OBJECT_DOME_HEIGHT * (1 - rho**2), 0.0)

    # The defect is always drawn, so that one seed gives the same part with or without its defect.
    radius = rng.uniform(0.004, 0.006)
    r0, a0 = rng.uniform(0, 0.5), rng.uniform(0, 2 * np.pi)
    du, dv = r0 * np.cos(a0) * style["semi_axes"][0], r0 * np.sin(a0) * style["semi_axes"][1]
    distance = np.hypot(u - du, v - dv)
    defect_weight = _smooth_disc(distance, radius) * on_object
    gt = (distance < 0.8 * radius) & on_object & (defect != "good")
    if defect in GEOMETRY_DEFECTS:
        height_map = height_map + GEOMETRY_DEFECTS[defect] * DEFECT_DEPTH * defect_weight

    z = plane_z - height_map + rng.normal(0, SENSOR_NOISE, size=(height, width))
    cloud = np.stack([x, y, z], axis=-1)
    labels = np.where(on_object, OBJECT, PLANE).astype(np.uint8)

    _add_noise_clusters(rng, cloud, labels, rho, plane_z, pitch)
    _drop_points(rng, labels, pitch)
    cloud[labels == MISSING] = 0

    rgb = _mvtec_colours(rng, style, on_object, height_map, defect_weight if defect in COLOR_DEFECTS else None)
    return MVTecScene(cloud.astype(np.float32), rgb, (gt * 255).astype(np.uint8), labels)


def _add_noise_clusters(rng, cloud, labels, rho, plane_z, pitch) -> None:
    """Small blobs of points floating above the plane, well away from the object and the image border."""
    height, width = labels.shape
    rows, cols = np.mgrid[0:height, 0:width]
    border = 12
    candidates = np.argwhere((rho > 1.6)[border:-border, border:-border]) + border
    for _ in range(rng.integers(2, 5)):
        if len(candidates) == 0:
            return
        r, c = candidates[rng.integers(len(candidates))]
        radius_px = max(1.0, rng.uniform(0.0012, 0.0025) / pitch)
        blob = (np.hypot(rows - r, cols - c) <= radius_px) & (rho > 1.4)
        lift = rng.uniform(0.015, 0.035)
        cloud[blob, 2] = plane_z[blob] - lift + rng.normal(0, SENSOR_NOISE, size=blob.sum())
        labels[blob] = NOISE


def _drop_points(rng, labels, pitch) -> None:
    """Missing measurements: a few occlusion holes on the background and 1 % random dropout everywhere."""
    height, width = labels.shape
    rows, cols = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(1, 4)):
        r, c = rng.uniform(0, height), rng.uniform(0, width)
        radius_px = rng.uniform(0.002, 0.006) / pitch
        labels[(np.hypot(rows - r, cols - c) <= radius_px) & (labels == PLANE)] = MISSING
    labels[rng.random((height, width)) < 0.01] = MISSING


def _mvtec_colours(rng, style, on_object, height_map, colour_defect) -> np.ndarray:
    height, width = on_object.shape
    background = np.full((height, width, 3), 110.0) + rng.normal(0, 6, size=(height, width, 1))
    shading = 0.75 + 0.25 * height_map[..., None] / (OBJECT_BASE_HEIGHT + OBJECT_DOME_HEIGHT)
    obj = style["color"] * shading + rng.normal(0, 4, size=(height, width, 3))
    rgb = np.where(on_object[..., None], obj, background)
    if colour_defect is not None:
        w = colour_defect[..., None]
        rgb = (1 - w) * rgb + w * style["defect_color"]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _split_plan(n_train, n_val, n_test_good, n_test_defect):
    yield "train", "good", n_train
    yield "validation", "good", n_val
    yield "test", "good", n_test_good
    for defect in MVTEC_DEFECTS:
        yield "test", defect, n_test_defect


def _write_mvtec_sample(job: tuple) -> None:
    out, seed, size, class_name, split, defect, i = job
    folder = out / class_name / split / defect
    stem = f"{i:03d}"
    if (folder / "xyz" / f"{stem}.tiff").exists():
        return
    scene = make_mvtec_scene(sample_rng(seed, class_name, split, defect, i), size, size, class_name, defect)
    write_png(folder / "rgb" / f"{stem}.png", scene.rgb)
    if defect != "good":
        write_png(folder / "gt" / f"{stem}.png", scene.gt)
    write_tiff(folder / "xyz" / f"{stem}.tiff", scene.cloud)  # last: its presence marks the sample done


def write_mvtec3d(out: str | Path, classes=DEFAULT_CLASSES, size: int = 128, n_train: int = 6, n_val: int = 2,
                  n_test_good: int = 3, n_test_defect: int = 2, seed: int = 0, progress: bool = True,
                  workers: int = 1) -> Path:
    """Write a raw (unpreprocessed) MVTec 3D-AD-like dataset under ``out``; existing files are kept. Each sample
    depends only on the seed and its identity, so ``workers`` processes write the same files as one."""
    out = Path(out)
    jobs = [(out, seed, size, c, split, defect, i) for c in classes
            for split, defect, n in _split_plan(n_train, n_val, n_test_good, n_test_defect) for i in range(n)]
    bar = tqdm(total=len(jobs), desc="synthetic mvtec3d", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        # spawn: the caller may hold threads (torch) that a fork would copy in an unknown state
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            for _ in pool.map(_write_mvtec_sample, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
                bar.update()
    else:
        for job in jobs:
            _write_mvtec_sample(job)
            bar.update()
    bar.close()
    for class_name in classes:
        write_text(out / class_name / "calibration" / "camera_parameters.json",
                   f'{{"camera_type": "synthetic", "image_width": {size}, "image_height": {size}}}\n')
    return out


# --------------------------------------------------------------------------------------------- Eyecandies

@dataclass
class EyecandiesScene:
    depth_png: np.ndarray  # (H, W) uint16
    depth_range: tuple[float, float]  # normalisation min, max
    pose: np.ndarray  # (4, 4) world-to-camera
    images: list[np.ndarray]  # six (H, W, 3) uint8 lighting variants
    mask: np.ndarray  # (H, W) uint8, 255 = defect
    world: np.ndarray  # (H, W, 3) float64 exact world coordinates of each pixel
    labels: np.ndarray  # (H, W) uint8: 1 ground, 2 object


def _look_at(camera: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World-to-camera rotation: rows are image-right, image-down and forward (world up is -y)."""
    forward = (target - camera) / np.linalg.norm(target - camera)
    right = np.cross(forward, [0.0, -1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def _rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def make_eyecandies_scene(rng: np.random.Generator, size: int = 128, defect: str = "good") -> EyecandiesScene:
    """A sphere resting on the ground plane y = 0 (up is -y), seen obliquely; then a random rigid motion
    about the x axis is applied to the whole world so that the converter's plane alignment is exercised."""
    radius = rng.uniform(0.25, 0.35)
    sphere = np.array([rng.uniform(-0.1, 0.1), -radius, rng.uniform(0.2, 0.4)])
    scale = 512 / size  # the focal length is fixed, so smaller images need a more distant camera
    target = np.array([0.0, 0.0, 0.3])
    camera = target + scale * np.array([0.0, -1.6, -2.0])
    rotation = _look_at(camera, target)

    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    rays_cam = np.stack([(cols - size / 2) / EYECANDIES_FOCAL_LENGTH,
                         (rows - size / 2) / EYECANDIES_FOCAL_LENGTH, np.ones_like(cols)], axis=-1)
    rays = rays_cam @ rotation  # world directions; camera-frame z component is 1, so t is the depth
    t_ground = -camera[1] / rays[..., 1]
    oc = camera - sphere
    b = rays @ oc
    a = (rays**2).sum(-1)
    disc = b**2 - a * (oc @ oc - radius**2)
    t_sphere = np.where(disc > 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
    on_object = t_sphere < t_ground
    depth = np.where(on_object, t_sphere, t_ground)

    # The defect is always drawn, so that one seed gives the same part with or without its defect.
    obj_px = np.argwhere(on_object & (depth < np.percentile(depth[on_object], 40)))
    r, c = obj_px[rng.integers(len(obj_px))]
    dist = np.hypot(rows - r, cols - c)
    r_px = size * rng.uniform(0.03, 0.05)
    weight = _smooth_disc(dist, r_px) * on_object
    mask = (dist < 0.8 * r_px) & on_object & (defect != "good")
    if defect in GEOMETRY_DEFECTS:
        depth = depth - GEOMETRY_DEFECTS[defect] * 0.03 * scale * weight

    world = camera + depth[..., None] * rays
    motion = _rotation_x(rng.uniform(-0.3, 0.3))
    shift = rng.uniform(-0.2, 0.2, size=3)
    world = world @ motion.T + shift
    pose = np.eye(4)
    pose[:3, :3] = rotation @ motion.T  # camera frame from moved world: R (M^T (X' - s) - C)
    pose[:3, 3] = -rotation @ (motion.T @ shift + camera)

    lo, hi = float(np.floor(depth.min() * 100) / 100), float(np.ceil(depth.max() * 100) / 100)
    depth_png = np.rint((depth - lo) / (hi - lo) * 65535).astype(np.uint16)
    depth_q = depth_png / 65535.0 * (hi - lo) + lo
    world = (camera + depth_q[..., None] * rays) @ motion.T + shift  # what the depth file really encodes

    colour = rng.uniform(80, 230, size=3)
    base = np.where(on_object[..., None], colour, 120.0)
    if defect in COLOR_DEFECTS:
        base = (1 - weight[..., None]) * base + weight[..., None] * rng.uniform(0, 255, size=3)
    images = [np.clip(np.rint(base * (0.6 + 0.1 * k) + rng.normal(0, 3, base.shape)), 0, 255).astype(np.uint8)
              for k in range(6)]
    labels = np.where(on_object, OBJECT, PLANE).astype(np.uint8)
    return EyecandiesScene(depth_png, (lo, hi), pose, images, (mask * 255).astype(np.uint8), world, labels)


def write_eyecandies_sample(folder: Path, prefix: str, scene: EyecandiesScene) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(scene.images):
        write_png(folder / f"{prefix}_image_{k}.png", image)
    write_png(folder / f"{prefix}_mask.png", scene.mask)
    write_text(folder / f"{prefix}_info_depth.yaml",
               f"normalization:\n  max: {scene.depth_range[1]!r}\n  min: {scene.depth_range[0]!r}\n")
    write_text(folder / f"{prefix}_pose.txt",
               "\n".join(" ".join(f"{v:.17g}" for v in row) for row in scene.pose) + "\n")
    write_png(folder / f"{prefix}_depth.png", scene.depth_png)  # last: its presence marks the sample done


def write_eyecandies(out: str | Path, classes=("CandyCane", "GummyBear"), size: int = 128, n_train: int = 6,
                     n_test: int = 6, seed: int = 0, progress: bool = True) -> Path:
    """Write a raw Eyecandies-like dataset: ``<Class>/train/data/NNN_*`` and ``<Class>/test_public/data/NN_*``.
    Every second public-test sample is defective (dent, bump or colour)."""
    out = Path(out)
    jobs = [(c, "train", f"{i:03d}", "good") for c in classes for i in range(n_train)]
    jobs += [(c, "test_public", f"{i:02d}", "good" if i % 2 == 0 else ("dent", "bump", "color")[(i // 2) % 3])
             for c in classes for i in range(n_test)]
    for class_name, split, prefix, defect in tqdm(jobs, desc="synthetic eyecandies", disable=not progress):
        folder = out / class_name / split / "data"
        if (folder / f"{prefix}_depth.png").exists():
            continue
        scene = make_eyecandies_scene(sample_rng(seed, class_name, split, prefix), size, defect)
        write_eyecandies_sample(folder, prefix, scene)
    return out


if __name__ == "__main__":  # ``python -m m3dm.data.synthetic``: a shim, the command line is m3dm.app.synthetic
    from m3dm.app.synthetic import main

    main()
