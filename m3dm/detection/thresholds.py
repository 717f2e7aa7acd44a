"""Pass/fail thresholds of a saved class model, set on good parts only.

An addition: the reference only reports threshold-free metrics.

Rule (docs/inference.md):

- **Image threshold**: the smallest observed good-part image score ``t`` such that at most a fraction ``far``
  (``--far``, default 0.01) of the good parts score above it, i.e. the ``⌈(1 − far)·n⌉``-th smallest of the ``n``
  good scores. A part *fails* when its image score is strictly greater than ``t``. With fewer than ``1/far`` good
  parts this is their maximum, and the false-alarm rate on new good parts is then about ``1/(n + 1)``.
- **Pixel threshold**: the same rule over every pixel of every good part's map, with ``--pixel_far`` (default
  0.01). Pixels strictly above it form the outlined anomaly region.
- **Normalised image score** (``Thresholds.normalised``, for people; no metric uses it): the linear map that sends
  the lowest good-part image score to 0 and the image threshold to 0.5, clipped to [0, 1]. It is monotone and
  above 0.5 exactly when the part fails; scores at twice the threshold's distance from the good minimum and beyond
  read 1.

Good parts (``choose_threshold_samples``): the ``validation/good`` split of MVTec 3D-AD; without a validation
split, the last 10 % (rounded up, at least one) of the sorted training samples. Those are left out of the memory
banks when the banks would otherwise use them (the banks then use fewer samples than without ``--save_model``);
when ``--max_sample`` already leaves them out (e.g. Eyecandies, 1000 training samples) the banks are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from m3dm.data.dataset import AnomalyDataset
from m3dm.data.layout import GOOD, discover_samples
from m3dm.errors import DataError

DEFAULT_FAR = 0.01
HOLDOUT_FRACTION = 0.1


def false_alarm_threshold(values, far: float) -> float:
    """The ``⌈(1 − far)·n⌉``-th smallest of ``n`` values: the smallest observed value with at most a fraction
    ``far`` of the values strictly above it."""
    flat = np.asarray(values).ravel()
    if flat.size == 0:
        raise ValueError("no good-part scores to set a threshold from")
    if not np.isfinite(flat).all():
        raise ValueError("good-part scores contain NaN or infinite values")
    if not 0 <= far < 1:
        raise ValueError(f"the false-alarm rate must be in [0, 1), got {far}")
    n = flat.size
    rank = min(n, max(1, math.ceil((1 - far) * n - 1e-9)))  # the tolerance absorbs (1 - far)·n round-off
    return float(np.partition(flat, rank - 1)[rank - 1])


@dataclass(frozen=True)
class Thresholds:
    """Image and pixel thresholds with how they were set (stored in the model file)."""

    image: float
    pixel: float
    far: float
    pixel_far: float
    source: str  # which good parts, e.g. "validation/good (22 parts)"
    n_parts: int
    good_image_scores: tuple[float, ...]
    good_pixel_min: float
    good_pixel_max: float

    @classmethod
    def from_good_parts(cls, image_scores, maps, far: float = DEFAULT_FAR, pixel_far: float = DEFAULT_FAR,
                        source: str = "") -> Thresholds:
        """Thresholds from good parts' image scores ``(n,)`` and maps ``(n, H, W)`` (see the module rule)."""
        scores = np.asarray(image_scores, dtype=np.float64).ravel()
        maps = np.asarray(maps)
        if maps.shape[0] != scores.size:
            raise ValueError(f"{scores.size} image scores but {maps.shape[0]} maps")
        return cls(image=false_alarm_threshold(scores, far), pixel=false_alarm_threshold(maps, pixel_far),
                   far=float(far), pixel_far=float(pixel_far), source=source, n_parts=int(scores.size),
                   good_image_scores=tuple(float(s) for s in scores), good_pixel_min=float(maps.min()),
                   good_pixel_max=float(maps.max()))

    def fails(self, image_score: float) -> bool:
        return image_score > self.image

    def normalised(self, image_score: float) -> float:
        """The image score on [0, 0.5] for the good parts' range up to the threshold and (0.5, 1] above it (see
        the module rule); the scale is |threshold| (or 1) where the threshold is not above the good minimum."""
        low = min(self.good_image_scores, default=self.image)
        scale = self.image - low if self.image > low else (abs(self.image) or 1.0)
        value = float(np.clip(0.5 + 0.5 * (image_score - self.image) / scale, 0.0, 1.0))
        if self.fails(image_score) and value <= 0.5:  # a score just above the threshold: round-off must not hide it
            value = float(np.nextafter(0.5, 1.0))
        return value

    def region(self, score_map) -> np.ndarray:
        """Boolean anomaly region: pixels strictly above the pixel threshold."""
        return np.asarray(score_map) > self.pixel

    def colour_range(self) -> tuple[float, float]:
        """Heatmap colour scale shared by every part: from the lowest good pixel score, with the pixel threshold
        in the middle of the scale (green in 'jet'); red is twice as far above the good minimum."""
        low = self.good_pixel_min
        return low, max(2 * self.pixel - low, low + 1e-12)

    def with_overrides(self, image: float | None = None, pixel: float | None = None) -> Thresholds:
        return replace(self, image=self.image if image is None else float(image),
                       pixel=self.pixel if pixel is None else float(pixel))

    def to_dict(self) -> dict:
        record = asdict(self)
        record["good_image_scores"] = list(self.good_image_scores)
        return record

    @classmethod
    def from_dict(cls, record: dict) -> Thresholds:
        values = dict(record)
        values["good_image_scores"] = tuple(values["good_image_scores"])
        return cls(**values)


@dataclass(frozen=True)
class ThresholdSamples:
    """Which good parts set the thresholds, and what that implies for the banks."""

    split: str  # "validation" or "train"
    indices: tuple[int, ...] | None  # positions in the split; None: all of it
    train_limit: int | None  # the banks may use at most this many training samples; None: no change
    description: str


def choose_threshold_samples(root: str | Path, class_name: str, train_cap: int,
                             holdout_fraction: float = HOLDOUT_FRACTION) -> ThresholdSamples:
    """``validation/good`` when the class has it, else the last ``holdout_fraction`` of the training samples.

    ``train_cap``: how many training samples the banks would use (``max_sample + 1`` in the reference).
    """
    if (Path(root) / class_name / "validation" / GOOD).is_dir():
        n = len(discover_samples(root, class_name, "validation"))
        return ThresholdSamples("validation", None, None, f"validation/good ({n} parts)")
    n = len(discover_samples(root, class_name, "train"))
    held = max(1, math.ceil(holdout_fraction * n))
    start = n - held
    if start < 1:
        raise DataError(f"{Path(root) / class_name}: no validation/good split and only {n} training sample(s): "
                        f"too few to hold some out for the pass/fail thresholds")
    limit = start if start < train_cap else None
    note = "held out from the memory banks" if limit is not None else "beyond --max_sample, unused by the banks"
    return ThresholdSamples("train", tuple(range(start, n)), limit,
                            f"train/good samples {start}..{n - 1} (the last {held} of {n}, {note})")


def threshold_dataset(samples: ThresholdSamples, root: str | Path, class_name: str, img_size: int = 224):
    """The torch dataset of the chosen good parts."""
    dataset = AnomalyDataset(root, class_name, samples.split, img_size)
    return dataset if samples.indices is None else Subset(dataset, list(samples.indices))
