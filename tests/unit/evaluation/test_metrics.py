"""Tests of m3dm.evaluation.metrics against brute-force implementations written here and hand-reasoned values."""

from __future__ import annotations

import itertools
import math
from collections import deque

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from m3dm.config import METHODS
from m3dm.evaluation.metrics import (
    AU_PRO_LIMITS,
    au_pro,
    compute_metrics,
    image_auroc,
    pixel_auroc,
    pro_curve,
    trapezoid_area,
)

# ---------------------------------------------------------------------------------------------------------------
# Brute-force references
# ---------------------------------------------------------------------------------------------------------------


def flood_fill_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a 2-D mask as boolean masks, found by breadth-first search in raster order."""
    height, width = mask.shape
    seen = np.zeros(mask.shape, dtype=bool)
    components = []
    for row in range(height):
        for col in range(width):
            if not mask[row, col] or seen[row, col]:
                continue
            component = np.zeros(mask.shape, dtype=bool)
            queue = deque([(row, col)])
            seen[row, col] = True
            while queue:
                r, c = queue.popleft()
                component[r, c] = True
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            queue.append((rr, cc))
            components.append(component)
    return components


def brute_force_pro_points(masks: np.ndarray, maps: np.ndarray,
                           num_thresholds: int = 100) -> list[tuple[float, float]]:
    """(FPR, PRO) points of the official definition, ascending FPR, one threshold and component at a time."""
    ok_scores: list[float] = []
    components: list[tuple[np.ndarray, np.ndarray]] = []
    for mask, score_map in zip(masks, maps):
        anomalous = np.zeros(mask.shape, dtype=bool)
        for component in flood_fill_components(mask != 0):
            components.append((component, score_map))
            anomalous |= component
        ok_scores.extend(float(v) for v in score_map[~anomalous])
    ok_scores.sort()
    n = len(ok_scores)
    points = [(1.0, 1.0)]
    for position in np.linspace(0, n - 1, num=num_thresholds, dtype=int):
        threshold = ok_scores[position]
        pro = 0.0
        for component, score_map in components:
            pro += np.count_nonzero(score_map[component] > threshold) / np.count_nonzero(component)
        points.append((1.0 - (position + 1) / n, pro / len(components)))
    return points[::-1]


def brute_force_area(points: list[tuple[float, float]], limit: float) -> float:
    """Integral of the piecewise-linear curve from its first x up to ``limit``, segment by segment."""
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            y_at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_at_limit) * (limit - x0)
    return area


def brute_force_au_pro(masks: np.ndarray, maps: np.ndarray, limit: float, num_thresholds: int = 100) -> float:
    return brute_force_area(brute_force_pro_points(masks, maps, num_thresholds), limit) / limit


def brute_force_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count one half), over all pairs."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


# ---------------------------------------------------------------------------------------------------------------
# Random cases
# ---------------------------------------------------------------------------------------------------------------


def random_blob_masks(rng: np.random.Generator, num_images: int, size: int, num_good: int) -> np.ndarray:
    """Masks with discs, rectangles and scattered single pixels; the first ``num_good`` images are all good."""
    masks = np.zeros((num_images, size, size), dtype=np.uint8)
    rows, cols = np.mgrid[:size, :size]
    for mask in masks[num_good:]:
        for _ in range(rng.integers(1, 4)):
            r, c, radius = rng.integers(0, size), rng.integers(0, size), rng.uniform(0.8, size / 4)
            mask[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = 1
        r, c = rng.integers(0, size - 3, 2)
        mask[r:r + rng.integers(1, 4), c:c + rng.integers(1, 4)] = 1
        mask[rng.integers(0, size, 3), rng.integers(0, size, 3)] = 1
    return masks


def random_maps(rng: np.random.Generator, masks: np.ndarray, quantize: bool) -> np.ndarray:
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    if quantize:  # coarse levels: many scores tie with the thresholds
        maps = np.round(maps * 4) / 4
    return maps.astype(np.float32)


RANDOM_CASES = [
    # seed, images, size, all-good images, quantised scores
    (0, 4, 16, 0, False),
    (1, 6, 20, 2, False),
    (2, 5, 16, 3, True),
    (3, 8, 12, 1, True),
    (4, 3, 24, 1, False),
]


@pytest.mark.parametrize("limit", [0.3, 0.01])
@pytest.mark.parametrize("seed,num_images,size,num_good,quantize", RANDOM_CASES)
def test_au_pro_matches_brute_force(seed, num_images, size, num_good, quantize, limit):
    rng = np.random.default_rng(seed)
    masks = random_blob_masks(rng, num_images, size, num_good)
    maps = random_maps(rng, masks, quantize)
    expected = brute_force_au_pro(masks, maps, limit)
    assert au_pro(masks, maps, integration_limit=limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("num_thresholds", [100, 99])
def test_every_au_pro_of_compute_metrics_matches_brute_force(num_thresholds):
    """AU-PRO at 30, 10, 5 and 1 % FPR from one curve of the method's thresholds (M3DM's 100, CFM's 99)."""
    rng = np.random.default_rng(7)
    masks = random_blob_masks(rng, 5, 16, 1)
    maps = random_maps(rng, masks, quantize=False)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    metrics = compute_metrics(labels, maps.max(axis=(1, 2)), masks, maps, num_thresholds=num_thresholds)
    assert AU_PRO_LIMITS == {"au_pro": 0.3, "au_pro_0.1": 0.1, "au_pro_0.05": 0.05, "au_pro_0.01": 0.01}
    for key, limit in AU_PRO_LIMITS.items():
        assert metrics[key] == pytest.approx(brute_force_au_pro(masks, maps, limit, num_thresholds), abs=1e-9)
    other = compute_metrics(labels, maps.max(axis=(1, 2)), masks, maps, num_thresholds=199 - num_thresholds)
    assert other["au_pro_0.05"] != metrics["au_pro_0.05"]  # the count matters, so each method needs its own


@pytest.mark.parametrize("num_thresholds", [100, 99])
def test_au_pro_at_5_percent_by_hand(num_thresholds):
    """One 10 x 10 image: 96 OK pixels scoring 0..95 and one component of 4 pixels scoring 92.5, 94.5, 100, 100.
    Both counts of thresholds step by less than 1 through the 96 sorted OK scores, so every position p is a
    threshold, at FPR 1 - (p+1)/96. PRO(p) is the share of the 4 scores above p: 1/2 at p = 95, 3/4 at 94 and 93,
    1 below. Up to FPR 0.05 (past p = 91, FPR 4/96) the trapezoids give
    (0.625 + 0.75 + 0.875 + 1) / 96 + 1 * (0.05 - 4/96) = 0.05 - 0.75/96, i.e. AU-PRO@5% = 1 - 0.75/4.8."""
    masks = np.zeros((1, 10, 10), np.uint8)
    masks[0, 0, :4] = 1
    maps = np.zeros((1, 10, 10))
    maps[0, 0, :4] = [92.5, 94.5, 100, 100]
    maps.reshape(-1)[4:] = np.arange(96)
    expected = 1 - 0.75 / 4.8
    assert au_pro(masks, maps, integration_limit=0.05, num_thresholds=num_thresholds) == pytest.approx(
        expected, abs=1e-12)


def test_each_method_samples_the_pro_curve_as_its_reference():
    """100 thresholds in M3DM's and BTF's au_pro_util.py, 99 in CFM's metrics_utils.py (docs/quirks.md)."""
    assert {name: spec.pro_thresholds for name, spec in METHODS.items()} == {
        **{name: 100 for name in METHODS if name != "CFM"}, "CFM": 99}


@pytest.mark.parametrize("seed,num_images,size,num_good,quantize", RANDOM_CASES[:3])
def test_pro_curve_matches_brute_force_points(seed, num_images, size, num_good, quantize):
    rng = np.random.default_rng(seed)
    masks = random_blob_masks(rng, num_images, size, num_good)
    maps = random_maps(rng, masks, quantize)
    fprs, pros = pro_curve(masks, maps)
    expected = np.array(brute_force_pro_points(masks, maps))
    assert fprs.shape == pros.shape == (101,)
    np.testing.assert_array_equal(fprs, expected[:, 0])
    np.testing.assert_allclose(pros, expected[:, 1], rtol=0, atol=1e-12)
    assert fprs[0] == 0.0 and fprs[-1] == 1.0 and pros[-1] == 1.0


def test_au_pro_with_fewer_ok_pixels_than_thresholds():
    """Fewer OK pixels than thresholds: repeated threshold positions give repeated curve points."""
    rng = np.random.default_rng(5)
    masks = np.ones((2, 6, 6), dtype=np.uint8)
    masks[0, :2, :3] = 0
    masks[1, 4:, 5] = 0  # 8 OK pixels in all
    masks[1, 2, :] = 0  # cuts image 1's region in two and adds 6 OK pixels
    maps = np.round(rng.random(masks.shape) * 5) / 5
    for limit in (0.3, 0.01):
        assert au_pro(masks, maps, integration_limit=limit) == pytest.approx(
            brute_force_au_pro(masks, maps, limit), abs=1e-9)


def test_limit_exactly_on_a_curve_point():
    """1 - (p+1)/n never equals the float 0.3, so the exact-hit branch is exercised with 0.25 (n=100, p=74)."""
    rng = np.random.default_rng(6)
    masks = np.zeros((2, 10, 10), dtype=np.uint8)
    masks[0, 8:, :] = 1  # one band: 80 OK pixels left
    masks[1, :, :] = 1
    masks[1, :, 3:5] = 0  # two bands: 20 OK pixels left
    assert int((masks == 0).sum()) == 100
    maps = np.round(rng.random(masks.shape) * 8) / 8 + 0.3 * masks
    fprs, _ = pro_curve(masks, maps)
    assert 0.25 in fprs
    assert au_pro(masks, maps, integration_limit=0.25) == pytest.approx(
        brute_force_au_pro(masks, maps, 0.25), abs=1e-9)


def test_trapezoid_area_hand_values():
    x, y = [0.0, 0.3, 1.0], [0.0, 0.6, 1.0]
    assert trapezoid_area(x, y, 0.3) == pytest.approx(0.09, abs=1e-15)  # exactly on a point
    assert trapezoid_area(x, y, 0.15) == pytest.approx(0.5 * 0.3 * 0.15, abs=1e-15)  # interpolated y = 0.3
    assert trapezoid_area(x, y, 0.65) == pytest.approx(0.09 + 0.5 * (0.6 + 0.8) * 0.35, abs=1e-15)
    assert trapezoid_area(x, y) == pytest.approx(0.09 + 0.5 * 1.6 * 0.7, abs=1e-15)
    with pytest.warns(RuntimeWarning, match="finite"):
        assert trapezoid_area([0.0, np.nan, 0.3, 1.0], [0.0, 0.2, 0.6, np.inf], 0.3) == pytest.approx(0.09)
    with pytest.raises(ValueError):
        trapezoid_area(x, y, 1.5)


# ---------------------------------------------------------------------------------------------------------------
# Hand-reasoned AU-PRO values
# ---------------------------------------------------------------------------------------------------------------


def _one_region_case() -> tuple[np.ndarray, np.ndarray]:
    masks = np.zeros((3, 8, 8), dtype=np.uint8)
    masks[1, 2:5, 2:5] = 1
    masks[2, 6:, 6:] = 1
    ok_scores = np.linspace(0.2, 0.7, 3 * 64).reshape(3, 8, 8)
    return masks, ok_scores


def test_perfect_separation_gives_one_and_reversed_gives_zero():
    masks, maps = _one_region_case()
    above = np.where(masks == 1, 0.9, maps)
    below = np.where(masks == 1, 0.1, maps)
    assert au_pro(masks, above) == 1.0
    assert au_pro(masks, above, integration_limit=0.01) == 1.0
    assert au_pro(masks, below) == 0.0


def test_overlap_is_strictly_greater_than_threshold():
    masks, _ = _one_region_case()
    constant = np.full(masks.shape, 0.5)  # every threshold equals every anomalous score → no overlap anywhere
    assert au_pro(masks, constant) == 0.0
    fprs, pros = pro_curve(masks, constant)
    assert np.all(pros[:-1] == 0.0) and pros[-1] == 1.0 and fprs[-1] == 1.0


def test_diagonal_pixels_form_one_component():
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 1, 1] = masks[0, 2, 2] = 1  # touch only diagonally
    masks[0, 4, 4] = 1
    maps = np.full(masks.shape, 0.5)
    maps[0, 1, 1] = maps[0, 4, 4] = 1.0
    maps[0, 2, 2] = 0.0
    # 8-connected: {(1,1),(2,2)} half covered, {(4,4)} covered → PRO 0.75 (4-connected would give 2/3)
    _, pros = pro_curve(masks, maps)
    np.testing.assert_array_equal(pros[:-1], 0.75)
    assert au_pro(masks, maps) == pytest.approx(0.75, abs=1e-12)


def test_components_do_not_connect_across_images():
    masks = np.zeros((2, 5, 5), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1
    masks[1, 3, 3] = 1  # would touch image 0's region diagonally if the stack were labelled in 3-D
    maps = np.full(masks.shape, 0.5)
    maps[0][masks[0] == 1] = 1.0
    maps[1, 3, 3] = 0.0
    _, pros = pro_curve(masks, maps)
    np.testing.assert_array_equal(pros[:-1], 0.5)  # mean(1, 0), not 4/5


def test_no_anomalous_component_returns_nan_with_warning():
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    with pytest.warns(RuntimeWarning, match="no anomalous region"):
        assert math.isnan(au_pro(masks, np.random.default_rng(0).random(masks.shape)))


def test_all_pixels_anomalous_returns_nan_with_warning():
    masks = np.ones((1, 4, 4), dtype=np.uint8)
    with pytest.warns(RuntimeWarning, match="no OK"):
        assert math.isnan(au_pro(masks, np.random.default_rng(0).random(masks.shape)))


# ---------------------------------------------------------------------------------------------------------------
# AUROCs
# ---------------------------------------------------------------------------------------------------------------


def test_image_auroc_hand_values_and_shapes():
    labels = np.array([0, 0, 1, 1, 0])
    assert image_auroc(labels, [0.1, 0.2, 0.8, 0.9, 0.3]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.1, 0.2, 0.7]) == 0.0
    assert image_auroc(labels, np.full(5, 0.4)) == 0.5
    # (N, 1) labels and scores; one positive tied with one negative: (2 * 3 - 0.5) / 6
    assert image_auroc(labels[:, None], np.array([[0.1], [0.5], [0.5], [0.9], [0.3]])) == pytest.approx(5.5 / 6)


@pytest.mark.parametrize("seed", range(4))
def test_image_auroc_matches_sklearn_and_pair_counting(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 30)
    labels[:2] = (0, 1)
    scores = np.round(rng.random(30) * 6) / 6  # with ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(labels, scores) == pytest.approx(brute_force_auroc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    masks = random_blob_masks(rng, 3, 7, 1)
    maps = random_maps(rng, masks, quantize=seed == 2)
    expected = brute_force_auroc(masks.reshape(-1), maps.reshape(-1))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks[:, None], maps[:, None]) == pytest.approx(expected, abs=1e-12)


def test_single_class_auroc_returns_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="single class"):
        assert math.isnan(image_auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.warns(RuntimeWarning, match="single class"):
        assert math.isnan(pixel_auroc(np.zeros((2, 3, 3)), np.zeros((2, 3, 3))))


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    masks = random_blob_masks(rng, 3, 12, 1)
    maps = random_maps(rng, masks, quantize=False)
    labels = np.array([[0], [1], [1]])
    scores = rng.random((3, 1))
    expected = compute_metrics(labels, scores, masks, maps)
    got = compute_metrics(torch.from_numpy(labels), torch.from_numpy(scores).requires_grad_(),
                          torch.from_numpy(masks), torch.from_numpy(maps))
    assert got == expected


# ---------------------------------------------------------------------------------------------------------------
# compute_metrics and speed
# ---------------------------------------------------------------------------------------------------------------


def test_compute_metrics_keys_and_values():
    rng = np.random.default_rng(8)
    masks = random_blob_masks(rng, 5, 16, 2)
    maps = random_maps(rng, masks, quantize=False)
    labels = np.array([0, 0, 1, 1, 1])
    scores = maps.reshape(5, -1).max(axis=1)
    metrics = compute_metrics(labels, scores, masks, maps)
    assert list(metrics) == ["image_rocauc", "pixel_rocauc", "au_pro", "au_pro_0.1", "au_pro_0.05", "au_pro_0.01"]
    assert all(type(value) is float for value in metrics.values())
    assert metrics["image_rocauc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics["pixel_rocauc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert metrics["au_pro"] == pytest.approx(brute_force_au_pro(masks, maps, 0.3), abs=1e-9)
    assert metrics["au_pro_0.01"] == pytest.approx(brute_force_au_pro(masks, maps, 0.01), abs=1e-9)
