"""Evaluation metrics of M3DM: image AUROC, pixel AUROC and AU-PRO (docs/quirks.md: quirk 39, "AU-PRO").

AU-PRO follows the official MVTec 3D-AD definition used by the reference (``utils/au_pro_util.py``) exactly:
8-connected ground-truth components, 100 thresholds taken from the sorted scores of all OK pixels, strict
``score > threshold`` overlaps, equal weight per component, the (FPR 1, PRO 1) end point, and trapezoidal
integration up to the limit with linear interpolation at the limit, normalised by the limit. The reference walks
every component for every threshold in Python; here each anomalous pixel is binned once by the number of
thresholds it exceeds, so the whole curve costs one labelling pass, one selection of the thresholds and
``O(P log T + C·T)`` numpy work. The SciPy import is the public ``scipy.ndimage`` one (quirk 39: FIX).

Inputs may be numpy arrays or torch tensors (anything with ``.detach()``); torch is not imported here.
"""

from __future__ import annotations

import bisect
import logging
import warnings
from typing import Any

import numpy as np
from scipy.ndimage import label as label_components
from sklearn.metrics import roc_auc_score

from m3dm.constants import PRO_THRESHOLDS

log = logging.getLogger(__name__)

DEFAULT_INTEGRATION_LIMIT = 0.3
DEFAULT_NUM_THRESHOLDS = PRO_THRESHOLDS  # M3DM's and BTF's; a method's own is MethodSpec.pro_thresholds (CFM: 99)
# The AU-PROs of compute_metrics, key -> FPR limit: the four CFM's reference reports (30, 10, 5 and 1 %), for
# every method; "au_pro" (0.3) is M3DM's and BTF's only one, "au_pro_0.01" was added first, hence the key names.
AU_PRO_LIMITS = {"au_pro": 0.3, "au_pro_0.1": 0.1, "au_pro_0.05": 0.05, "au_pro_0.01": 0.01}
METRIC_NAMES = ("image_rocauc", "pixel_rocauc", *AU_PRO_LIMITS)  # of compute_metrics, in order

# 3-D structure whose middle plane is the 3×3 8-connectivity element: labels each image of an (N, H, W)
# stack separately in one call, numbering components image by image in raster order like the reference.
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=int)
_EIGHT_CONNECTED_PER_IMAGE[1] = 1


def to_numpy(values: Any) -> np.ndarray:
    """Numpy view of an array-like or torch tensor (moved to the CPU, detached from autograd)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def image_auroc(labels: Any, scores: Any) -> float:
    """ROC AUC of image-level scores against 0/1 labels; both (N,) or (N, 1). NaN (with a warning) if one class."""
    labels = to_numpy(labels).reshape(-1)
    scores = to_numpy(scores).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    return _binary_auroc(labels, scores, what="image")


def pixel_auroc(masks: Any, maps: Any) -> float:
    """ROC AUC over every pixel of every image: masks (N, H, W) with nonzero = anomalous, maps (N, H, W)."""
    masks, maps = _as_image_stacks(masks, maps)
    return _binary_auroc((masks != 0).reshape(-1), maps.reshape(-1), what="pixel")


def _binary_auroc(labels: np.ndarray, scores: np.ndarray, what: str) -> float:
    if np.unique(labels).size < 2:
        warnings.warn(f"{what} AUROC is undefined with a single class in the ground truth; returning NaN",
                      RuntimeWarning, stacklevel=3)
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _as_image_stacks(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) arrays from (N, H, W) or (N, 1, H, W) inputs (or sequences of (H, W) maps)."""
    masks, maps = to_numpy(masks), to_numpy(maps)
    masks = masks[:, 0] if masks.ndim == 4 and masks.shape[1] == 1 else masks
    maps = maps[:, 0] if maps.ndim == 4 and maps.shape[1] == 1 else maps
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"expected matching (N, H, W) masks and maps, got {masks.shape} and {maps.shape}")
    return masks, maps


def pro_curve(masks: Any, maps: Any,
              num_thresholds: int = DEFAULT_NUM_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve (FPRs ascending from 0 to 1, PROs), ``num_thresholds + 1`` points, as in the reference.

    Returns NaN PROs (with a warning) when the masks contain no anomalous component and NaN FPRs when every
    pixel is anomalous: both are undefined, and the reference crashes on them.
    """
    masks, maps = _as_image_stacks(masks, maps)
    maps = maps.astype(np.float64, copy=False)  # the reference pools OK scores in float64; comparisons are exact
    if np.isnan(maps).any():
        raise ValueError("anomaly maps contain NaN")
    components, num_components = label_components(masks != 0, structure=_EIGHT_CONNECTED_PER_IMAGE)
    components = components.reshape(-1)
    scores = maps.reshape(-1)
    is_ok = components == 0
    ok_scores = scores[is_ok]
    num_ok = ok_scores.size
    if num_ok == 0:
        warnings.warn("AU-PRO: no OK (label 0) pixel, the false positive rate is undefined; returning NaN",
                      RuntimeWarning, stacklevel=2)
        nan = np.full(num_thresholds + 1, np.nan)
        return nan, nan.copy()

    positions = np.linspace(0, num_ok - 1, num=num_thresholds, dtype=int)
    thresholds = _order_statistics(ok_scores, positions)
    fprs = 1.0 - (positions + 1) / num_ok
    if num_components == 0:
        warnings.warn("AU-PRO: the ground truth has no anomalous region, PRO is undefined; returning NaN",
                      RuntimeWarning, stacklevel=2)
        pros = np.full(num_thresholds, np.nan)
    else:
        pros = _mean_overlaps(scores[~is_ok], components[~is_ok] - 1, num_components, thresholds)
    fprs = np.concatenate(([1.0], fprs))[::-1].copy()
    pros = np.concatenate(([1.0], pros))[::-1].copy()
    return fprs, pros


def _order_statistics(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``np.sort(values)[positions]`` by selection instead of a full sort."""
    unique_positions = np.unique(positions)
    partitioned = np.partition(values, unique_positions)
    return partitioned[positions]


def _mean_overlaps(scores: np.ndarray, component_ids: np.ndarray, num_components: int,
                   thresholds: np.ndarray) -> np.ndarray:
    """Mean over components of the fraction of each component's pixels scoring strictly above each threshold.

    ``thresholds`` is non-decreasing, so a pixel is above exactly the first ``k`` of them, with ``k`` the number of
    thresholds strictly below its score. Histogramming ``k`` per component and taking suffix sums gives every
    (component, threshold) count at once.
    """
    num_thresholds = thresholds.size
    num_above = np.searchsorted(thresholds, scores, side="left")
    histogram = np.bincount(component_ids.astype(np.int64) * (num_thresholds + 1) + num_above,
                            minlength=num_components * (num_thresholds + 1))
    histogram = histogram.reshape(num_components, num_thresholds + 1)
    at_least = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]  # at_least[c, j] = #pixels with k >= j
    above = at_least[:, 1:]  # above[c, t] = #pixels with k > t, i.e. score > thresholds[t]
    sizes = at_least[:, :1]
    overlaps = 1.0 - (sizes - above) / sizes  # same expression as the reference (1 - #below / size)
    return np.ascontiguousarray(overlaps).sum(axis=0) / num_components


def trapezoid_area(x: Any, y: Any, x_max: float | None = None) -> float:
    """Area under the piecewise-linear curve (x ascending) from x[0] up to ``x_max``, as the reference computes it.

    Non-finite points are dropped with a warning. When ``x_max`` is not an x value, y is interpolated linearly
    at ``x_max`` between its neighbours and the partial trapezoid is added.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():
        warnings.warn("not all points of the curve are finite; integrating the finite ones only",
                      RuntimeWarning, stacklevel=2)
        x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            insert_at = bisect.bisect_right(x.tolist(), x_max)
            if not 0 < insert_at < len(x):
                raise ValueError(f"integration limit {x_max} lies outside the curve's x range")
            x0, x1, y0, y1 = x[insert_at - 1], x[insert_at], y[insert_at - 1], y[insert_at]
            y_at_limit = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            correction = 0.5 * (y_at_limit + y0) * (x_max - x0)
        inside = x <= x_max
        x, y = x[inside], y[inside]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def au_pro_from_curve(fprs: np.ndarray, pros: np.ndarray,
                      integration_limit: float = DEFAULT_INTEGRATION_LIMIT) -> float:
    """Normalised area under a PRO curve up to ``integration_limit`` (NaN if the curve is undefined)."""
    if np.isnan(pros).any() or np.isnan(fprs).any():  # only the degenerate curves of ``pro_curve``
        return float("nan")
    return trapezoid_area(fprs, pros, x_max=integration_limit) / integration_limit


def au_pro(masks: Any, maps: Any, integration_limit: float = DEFAULT_INTEGRATION_LIMIT,
           num_thresholds: int = DEFAULT_NUM_THRESHOLDS) -> float:
    """AU-PRO of anomaly maps (N, H, W) against binary masks (N, H, W), normalised to [0, 1]."""
    fprs, pros = pro_curve(masks, maps, num_thresholds=num_thresholds)
    return au_pro_from_curve(fprs, pros, integration_limit)


def compute_metrics(labels: Any, image_scores: Any, masks: Any, maps: Any, masks_available: bool = True,
                    name: str = "", num_thresholds: int = DEFAULT_NUM_THRESHOLDS) -> dict[str, float | None]:
    """All metrics of one class, unrounded: image/pixel ROC AUC and AU-PRO up to each FPR of ``AU_PRO_LIMITS``,
    from one PRO curve of ``num_thresholds`` thresholds (the method's reference's count).

    A metric the test split cannot give is None ("not available"), with a log line saying why (``name`` is the
    class): the pixel metrics without ``masks_available`` (defect folders without ``gt/``), and every metric
    when the test parts are all good or all defective (no AUROC without both).
    """
    return metrics_and_pro_curve(labels, image_scores, masks, maps, masks_available, name, num_thresholds)[0]


def metrics_and_pro_curve(labels: Any, image_scores: Any, masks: Any, maps: Any, masks_available: bool = True,
                          name: str = "", num_thresholds: int = DEFAULT_NUM_THRESHOLDS
                          ) -> tuple[dict[str, float | None], tuple[np.ndarray, np.ndarray] | None]:
    """``compute_metrics`` and the PRO curve ``(FPRs, PROs)`` behind its AU-PRO (None without pixel metrics), for
    the report, which would otherwise sort every pixel of the class a second time."""
    labels_flat = to_numpy(labels).reshape(-1)
    if np.unique(labels_flat).size < 2:
        kind = "good" if labels_flat.size == 0 or labels_flat[0] == 0 else "defective"
        log.warning("%s: every test part is %s (%d parts): no image or pixel metric is available; add %s test "
                    "parts to evaluate", name or "class", kind, labels_flat.size,
                    "defective" if kind == "good" else "good")
        return dict.fromkeys(METRIC_NAMES), None
    if not masks_available:
        log.info("%s: defective test parts without ground-truth masks (no gt/ folder): image metrics only, the "
                 "pixel metrics are not available", name or "class")
        return {**dict.fromkeys(METRIC_NAMES), "image_rocauc": image_auroc(labels, image_scores)}, None
    fprs, pros = pro_curve(masks, maps, num_thresholds)
    return {
        "image_rocauc": image_auroc(labels, image_scores),
        "pixel_rocauc": pixel_auroc(masks, maps),
        **{key: au_pro_from_curve(fprs, pros, limit) for key, limit in AU_PRO_LIMITS.items()},
    }, (fprs, pros)
