"""G2SF's pseudo-anomalies: Perlin masks, an RGB and a point-cloud anomaly source cut and pasted onto a training
sample (docs/g2sf.md, step 4; differences from the reference in docs/quirks.md, "G2SF").

Everything random is drawn from one ``numpy.random.Generator`` in the order the reference draws it, so a seed gives
the same masks, images and clouds on any machine. Masks are boolean ``(H, W)`` arrays, images ``(H, W, 3)`` uint8,
clouds ``(H, W, 3)`` float32 organized point clouds (a point with a zero coordinate is no point).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage

from m3dm.data.io import read_organized_pc, read_rgb
from m3dm.data.layout import GOOD, Sample, discover_samples
from m3dm.errors import DataError

PERLIN_GRID = 512  # the masks are drawn on a 512 x 512 grid, then resized to the sample
PERLIN_MAX_OCTAVE = 5  # periods 2^0 .. 2^4 along each axis
MIN_COMPONENT, MAX_COMPONENT = 100, 1600  # pixels of a kept Perlin component (on the 512 grid)
MIN_MASK_PIXELS = 300  # a mask is drawn again until it has this many pixels
MAX_MASK_TRIES = 2000  # the reference loops forever; we stop with an error naming the sample
DISPLACEMENT = (2e-4, 2e-3)  # range of the pasted points' shift (metres), either sign
SOURCES_PER_CLASS = {"mvtec3d": 8, "eyecandies": 24}  # create_anomaly_source.py
# the classes whose augmentation is milder in MVTec 3D-AD (they are long or not rotation-invariant)
MILD_AUGMENTATION = ("dowel", "tire", "foam", "rope", "cable_gland")


# ------------------------------------------------------------------------------------------------ Perlin masks

def perlin_noise(shape: tuple[int, int], periods: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise of ``shape`` with ``periods`` lattice cells per axis (``rand_perlin_2d_np``): random unit
    gradients at the lattice points, the quintic fade, values in about ``[-1, 1]``, 0 at every lattice point."""
    cells = (shape[0] // periods[0], shape[1] // periods[1])
    rows = (np.arange(shape[0]) * periods[0] / shape[0]) % 1
    cols = (np.arange(shape[1]) * periods[1] / shape[1]) % 1
    u, v = np.meshgrid(rows, cols, indexing="ij")
    angles = 2 * math.pi * rng.random((periods[0] + 1, periods[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def corner(di: int, dj: int) -> np.ndarray:
        g = gradients[di:di + periods[0], dj:dj + periods[1]]
        g = np.repeat(np.repeat(g, cells[0], axis=0), cells[1], axis=1)[:shape[0], :shape[1]]
        return (u - di) * g[..., 0] + (v - dj) * g[..., 1]

    fade_u, fade_v = (t * t * t * (t * (6 * t - 15) + 10) for t in (u, v))  # 6t⁵ − 15t⁴ + 10t³
    top = corner(0, 0) + fade_u * (corner(1, 0) - corner(0, 0))
    bottom = corner(0, 1) + fade_u * (corner(1, 1) - corner(0, 1))
    return math.sqrt(2) * (top + fade_v * (bottom - top))


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest resize as OpenCV's ``INTER_NEAREST``: output pixel ``i`` takes input ``floor(i · in / out)``."""
    rows = np.minimum((np.arange(shape[0]) * mask.shape[0] / shape[0]).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) * mask.shape[1] / shape[1]).astype(np.int64), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def dilate(mask: np.ndarray) -> np.ndarray:
    """3 x 3 binary dilation (``cv.dilate`` with a 3 x 3 kernel of ones)."""
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))


def keep_components(mask: np.ndarray, skip_last: bool = True) -> np.ndarray:
    """The 4-connected components of ``mask`` with ``MIN_COMPONENT``..``MAX_COMPONENT`` pixels (``restrict_component``;
    ``skip_last``: as the reference, the last component is never kept)."""
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = (sizes >= MIN_COMPONENT) & (sizes <= MAX_COMPONENT)
    keep[0] = False
    if skip_last and count > 0:
        keep[count] = False
    return keep[labels]


@dataclass(frozen=True)
class MaskRule:
    """How ``perlin_mask`` thresholds the noise: the reference's MVTec 3D-AD rule (0.4, fixed) or its Eyecandies
    rule (0.4, or 0.3 for thin sources, ×0.9 every 10 tries down to 0.2)."""

    threshold: float = 0.4
    decay: bool = False
    skip_last: bool = True  # keep_components' quirk (off with --fix_quirks)


def perlin_mask(foreground: np.ndarray, rng: np.random.Generator, rule: MaskRule = MaskRule(),
                where: str = "a sample") -> np.ndarray:
    """A random Perlin mask on ``foreground`` (``random_perlin_mask``): noise on the 512 grid with periods
    ``2^a x 2^b``, rotated by U(-90, 90) degrees, above the threshold, inside the foreground, components of 100–1600
    pixels, drawn again until it has 300 pixels; resized back to the foreground's shape."""
    big = resize_nearest(foreground, (PERLIN_GRID, PERLIN_GRID))
    threshold = rule.threshold
    for tries in range(1, MAX_MASK_TRIES + 1):
        if rule.decay and tries % 10 == 0:
            threshold = max(0.2, threshold * 0.9)
        periods = (2 ** int(rng.integers(0, PERLIN_MAX_OCTAVE)), 2 ** int(rng.integers(0, PERLIN_MAX_OCTAVE)))
        noise = perlin_noise((PERLIN_GRID, PERLIN_GRID), periods, rng)
        noise = ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, order=1, mode="constant", cval=0.0)
        mask = keep_components(big & (noise > threshold), rule.skip_last)
        if mask.sum() >= MIN_MASK_PIXELS:
            return resize_nearest(mask, foreground.shape)
    raise DataError(f"{where}: no pseudo-anomaly of {MIN_MASK_PIXELS} pixels fits its foreground after "
                    f"{MAX_MASK_TRIES} Perlin masks (is the object almost empty?)")


# ------------------------------------------------------------------------------------------------- cut and paste

def foreground(cloud: np.ndarray) -> np.ndarray:
    """Pixels whose point has three non-zero coordinates."""
    return np.all(cloud != 0, axis=-1)


def blend_pixels(image: np.ndarray, target: np.ndarray, source_image: np.ndarray, source: np.ndarray,
                 ratio: float) -> np.ndarray:
    """``ratio · image + (1 − ratio) · source`` on the target pixels (row-major pairing of the two masks), clipped
    to uint8 (``paste_image_interpolation``)."""
    out = image.astype(np.float64)
    out[target] = image[target] * ratio + source_image[source] * (1 - ratio)
    return np.clip(out, 0, 255).astype(np.uint8)


def paste_points(cloud: np.ndarray, full: np.ndarray, target: np.ndarray, source_cloud: np.ndarray,
                 source: np.ndarray, move: float) -> np.ndarray:
    """The source's points moved onto the target (``paste_point_cloud``): their centroid onto the target's, shifted
    by ``move`` in every coordinate, then x and y replaced by the full cloud's, so only z keeps the source's shape
    and the shift. Source pixels without a point become no point. Returns a new cloud."""
    out = cloud.copy()
    target_points, source_points = cloud[target], source_cloud[source]
    valid_target, valid_source = foreground(target_points), foreground(source_points)
    if not valid_target.any() or not valid_source.any():  # the reference's mean of nothing is NaN
        return out
    moved = np.zeros_like(source_points)
    moved[:, 2] = source_points[:, 2]  # a source pixel without a point keeps its z (x and y become 0)
    moved[valid_source] = (source_points[valid_source] - source_points[valid_source].mean(axis=0)
                           + target_points[valid_target].mean(axis=0) + move)
    moved[valid_source, :2] = full[target][valid_source, :2]
    out[target] = moved
    return out


def shift_mask(target_foreground: np.ndarray, mask: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """Move ``mask`` (one component) so that its centre lands on a random foreground pixel that keeps its bounding
    box in the image (``shift_mask``): ``(target mask, matching source mask)``, or None to paste in place (a
    degenerate component or no such pixel). As the reference, the last row and column of the component's bounding
    box are left out."""
    ys, xs = np.nonzero(mask)
    x_min, x_max, y_min, y_max = xs.min(), xs.max(), ys.min(), ys.max()
    if x_min == x_max or y_min == y_max:  # a contour of zero area: the reference pastes in place
        return None
    centre_x, centre_y = int(xs.mean()), int(ys.mean())
    height, width = mask.shape
    inner = np.zeros_like(mask)
    half_w, half_h = int((x_max - x_min) / 2), int((y_max - y_min) / 2)
    inner[half_h:height - half_h, half_w:width - half_w] = True
    candidates = np.argwhere(target_foreground & inner)  # (y, x), row-major as the reference's meshgrid
    if len(candidates) == 0:
        return None
    y, x = candidates[int(rng.choice(len(candidates)))]
    dx, dy = centre_x - x, centre_y - y
    box = np.zeros_like(mask)
    box[y_min:y_max, x_min:x_max] = True
    ys, xs = np.nonzero(mask & box)
    ty, tx = ys - dy, xs - dx
    inside = (tx >= 0) & (tx < width) & (ty >= 0) & (ty < height)
    shifted, kept = np.zeros_like(mask), np.zeros_like(mask)
    shifted[ty[inside], tx[inside]] = True
    kept[ys[inside], xs[inside]] = True
    return shifted, kept


def paste_component(image, cloud, full, target_foreground, component, source_image, source_cloud,
                    rng: np.random.Generator):
    """One connected component pasted onto the sample (``cut_paste_scc``): in place when more than 2/3 of it lies
    on the foreground, else shifted onto the foreground (then fully opaque, as the reference's double write).
    Returns ``(image, cloud, pasted mask)``."""
    if (target_foreground & component).sum() > int(2 / 3 * component.sum()):
        target = source = component
        opaque = False
    else:
        shifted = shift_mask(target_foreground, component, rng)
        target, source = (component, component) if shifted is None else shifted
        opaque = shifted is not None
    ratio = rng.uniform(0, 0.5)
    image = blend_pixels(image, target, source_image, source, 0.0 if opaque else ratio)
    move = rng.uniform(*DISPLACEMENT) * (1 if rng.normal() > 0 else -1)
    return image, paste_points(cloud, full, target, source_cloud, source, move), target


def paste_threshold(shape: tuple[int, int]) -> int:
    """Components of at most this many pixels are not pasted: the reference's 100 on images of 512 x 512 pixels and
    more (every MVTec 3D-AD and Eyecandies image), scaled by the area below that (small synthetic data), where the
    masks drawn on the 512 grid would otherwise shrink under it."""
    return min(MIN_COMPONENT, round(MIN_COMPONENT * shape[0] * shape[1] / PERLIN_GRID**2))


# ---------------------------------------------------------------------------------------- augmentations

def augment_geometry(image: np.ndarray, cloud: np.ndarray, full: np.ndarray, rng: np.random.Generator,
                     dataset_type: str, class_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same random rotation, flips and affine map on the image, the cloud and the full cloud (nearest, zero
    fill), with the reference's ranges per dataset and class (``normal_augmentation``)."""
    mild = dataset_type == "mvtec3d" and class_name in MILD_AUGMENTATION
    if dataset_type == "eyecandies":
        degrees, flips, shift, scales = 90, True, 0.025, (0.9, 1.1)
    elif mild:
        degrees, flips, shift, scales = 10, False, 0.05, (0.9, 1.1)
    else:
        degrees, flips, shift, scales = 45, True, 0.1, (0.8, 1.25)
    stack = torch.from_numpy(np.concatenate([image.astype(np.float32), cloud, full], axis=2)).permute(2, 0, 1)
    nearest = TF.InterpolationMode.NEAREST
    stack = TF.rotate(stack, float(rng.uniform(-degrees, degrees)), interpolation=nearest, fill=0.0)
    if flips and rng.random() < 0.5:
        stack = TF.hflip(stack)
    if flips and rng.random() < 0.5:
        stack = TF.vflip(stack)
    height, width = stack.shape[1:]
    translate = [round(rng.uniform(-shift * width, shift * width)), round(rng.uniform(-shift * height, shift * height))]
    stack = TF.affine(stack, angle=0.0, translate=translate, scale=float(rng.uniform(*scales)), shear=[0.0, 0.0],
                      interpolation=nearest, fill=0.0)
    out = stack.permute(1, 2, 0).numpy()
    return out[..., :3].astype(np.uint8), np.ascontiguousarray(out[..., 3:6]), np.ascontiguousarray(out[..., 6:])


def _hsv_shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(image).convert("HSV")).astype(np.int64)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51))) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))


def _brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # changing Y in YCrCb at fixed chroma adds the same amount to R, G and B
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    new = np.clip(luma * rng.uniform(0.75, 1.7) + rng.uniform(-50, 50), 0, 255)
    return np.clip(image + (new - luma)[..., None], 0, 255).astype(np.uint8)


def _elastic(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    alpha, sigma = rng.uniform(2.5, 7.5), 5.0
    shape = image.shape[:2]
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, shape), sigma) * alpha
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, shape), sigma) * alpha
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    coords = [rows + dy, cols + dx]
    return np.stack([ndimage.map_coordinates(image[..., c], coords, order=1, mode="constant")
                     for c in range(3)], axis=-1)


def _cartoon(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # a stand-in for imgaug's Cartoon (its mean-shift segmentation needs OpenCV): median, 3-bit posterisation,
    # saturation x2
    smoothed = ndimage.median_filter(image, size=(3, 3, 1))
    posterised = ((smoothed >> 5) << 5) + 16
    return np.asarray(ImageEnhance.Color(Image.fromarray(posterised.astype(np.uint8))).enhance(2.0))


COLOUR_AUGMENTERS = {
    "average_blur": lambda x, rng: ndimage.uniform_filter(x, size=(50, 50, 1), mode="mirror"),
    "gamma_contrast": lambda x, rng: (255 * (x / 255.0) ** rng.uniform(0.5, 2.0, 3)).astype(np.uint8),
    "brightness": _brightness,
    "hue_saturation": _hsv_shift,
    "autocontrast": lambda x, rng: np.asarray(ImageOps.autocontrast(Image.fromarray(x),
                                                                    cutoff=int(rng.integers(0, 21)))),
    "elastic": _elastic,
    "invert": lambda x, rng: np.where(rng.random(3) < 0.05, 255 - x, x).astype(np.uint8),
    "cartoon": _cartoon,
}


def augment_colours(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Three of the eight colour augmenters, drawn without replacement, in the drawn order (``randAugmenter``)."""
    names = list(COLOUR_AUGMENTERS)
    for index in rng.choice(len(names), 3, replace=False):
        image = np.ascontiguousarray(COLOUR_AUGMENTERS[names[int(index)]](image, rng), dtype=np.uint8)
    return image


# -------------------------------------------------------------------------------------------------- sources

def anomaly_sources(root: str | Path, classes: Sequence[str], dataset_type: str) -> list[Path]:
    """The point-cloud anomaly sources of ``create_anomaly_source.py``: per class in order, the sorted training
    clouds shuffled by Python's ``random`` seeded with 0 once, the first 8 (MVTec 3D-AD) or 24 (Eyecandies)."""
    shuffler = random.Random(0)
    sources: list[Path] = []
    for class_name in classes:
        paths = sorted(str(s.xyz_path) for s in discover_samples(root, class_name, "train") if s.defect == GOOD)
        shuffler.shuffle(paths)
        sources += [Path(p) for p in paths[:SOURCES_PER_CLASS[dataset_type]]]
    return sources


def pad_to_square(cloud: np.ndarray) -> np.ndarray:
    """``pad_crop``: zero padding to a square whose side is the larger side rounded up to a multiple of 100."""
    side = max(math.ceil(n / 100.0) * 100 for n in cloud.shape[:2])
    top, left = (side - cloud.shape[0]) // 2, (side - cloud.shape[1]) // 2
    return np.pad(cloud, ((top, side - top - cloud.shape[0]), (left, side - left - cloud.shape[1]), (0, 0)))


def resize_cloud(cloud: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest resize of an organized cloud as ``F.interpolate(mode='nearest')`` (``resize_organized_pcd``)."""
    grid = torch.from_numpy(np.ascontiguousarray(cloud)).permute(2, 0, 1)[None]
    return torch.nn.functional.interpolate(grid, size=shape, mode="nearest")[0].permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------------ synthesis

@dataclass
class PseudoAnomaly:
    image: np.ndarray  # (H, W, 3) uint8
    cloud: np.ndarray  # (H, W, 3) float32
    mask: np.ndarray  # (H, W) bool
    name: str  # the training sample it was made from


class PseudoAnomalySynthesiser:
    """Pseudo-anomalies of one class (``MVTecPseudoDataset`` / ``EyeCandiesPseudoDataset``): each from a random
    training sample, another training sample's colour-augmented image and a random point-cloud source.

    ``full_root``: the unpreprocessed dataset whose clouds give the pasted points their x and y (MVTec 3D-AD, padded
    to a square); None: the sample's own cloud (the reference's Eyecandies setting)."""

    def __init__(self, samples: Sequence[Sample], sources: Sequence[Path], dataset_type: str, *,
                 root: str | Path | None = None, full_root: str | Path | None = None, fix_quirks: bool = False):
        if len(samples) < 2:
            raise DataError("G2SF's pseudo-anomalies need at least 2 training samples (one is pasted onto another)")
        if not sources:
            raise DataError("G2SF's pseudo-anomalies need at least one point-cloud anomaly source")
        self.samples, self.sources = list(samples), list(sources)
        self.dataset_type = dataset_type
        self.root = None if root is None else Path(root)
        self.full_root = None if full_root is None else Path(full_root)
        self.fix_quirks = fix_quirks

    def read_sample(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """A training sample's ``(image, cloud)``."""
        return np.asarray(read_rgb(sample.rgb_path).convert("RGB")), read_organized_pc(sample.xyz_path)

    def read_source(self, path: Path) -> np.ndarray:
        """A point-cloud anomaly source."""
        return read_organized_pc(path)

    def _full_cloud(self, sample: Sample, cloud: np.ndarray) -> np.ndarray:
        if self.full_root is None or self.root is None:
            return cloud.copy()
        full = read_organized_pc(self.full_root / Path(sample.xyz_path).relative_to(self.root))
        return full if self.dataset_type == "eyecandies" else pad_to_square(full)

    def normal(self, rng: np.random.Generator, index: int) -> PseudoAnomaly:
        """An augmented good sample (``--num_normal``), mask empty."""
        sample = self.samples[index % len(self.samples)]
        image, cloud = self.read_sample(sample)
        image, cloud, _ = augment_geometry(image, cloud, np.zeros_like(cloud), rng, self.dataset_type,
                                           sample.class_name)
        return PseudoAnomaly(image, cloud, np.zeros(cloud.shape[:2], bool), sample.name)

    def anomaly(self, rng: np.random.Generator) -> PseudoAnomaly:
        """One pseudo-anomalous sample (``generate_pseudo_anomaly``)."""
        sample = self.samples[int(rng.integers(len(self.samples)))]
        image, cloud = self.read_sample(sample)
        image, cloud, full = augment_geometry(image, cloud, self._full_cloud(sample, cloud), rng, self.dataset_type,
                                              sample.class_name)
        target_fg = foreground(cloud)
        while True:
            other = self.samples[int(rng.integers(len(self.samples)))]
            if other.rgb_path != sample.rgb_path:
                break
        source_image, other_cloud = self.read_sample(other)
        source_image = augment_colours(source_image, rng)
        source_path = self.sources[int(rng.integers(len(self.sources)))]
        source_cloud = resize_cloud(self.read_source(source_path), other_cloud.shape[:2])
        rule, source_fg = self._mask_rule(source_path), foreground(source_cloud)
        if self.dataset_type == "mvtec3d":
            source_fg = source_fg & foreground(other_cloud)
        mask = dilate(perlin_mask(source_fg, rng, rule, where=str(source_path)))
        labels, count = ndimage.label(mask)
        pasted = np.zeros_like(mask)
        smallest = paste_threshold(mask.shape)
        for component in range(1, count + 1):
            part = labels == component
            if part.sum() <= smallest:
                continue
            image, cloud, target = paste_component(image, cloud, full, target_fg, part, source_image, source_cloud,
                                                   rng)
            pasted |= target
        if self.dataset_type == "eyecandies":  # pastes on the background are removed
            image, cloud = image * target_fg[..., None], cloud * target_fg[..., None]
            pasted &= target_fg
        return PseudoAnomaly(image.astype(np.uint8), cloud.astype(np.float32), pasted, sample.name)

    def _mask_rule(self, source_path: Path) -> MaskRule:
        skip_last = not self.fix_quirks
        if self.dataset_type != "eyecandies":
            return MaskRule(0.4, decay=False, skip_last=skip_last)
        thin = "Cane" in str(source_path) or "Loll" in str(source_path)
        return MaskRule(0.3 if thin else 0.4, decay=True, skip_last=skip_last)
