"""AU-PRO of a realistic class (50 maps of 224 x 224, 10 of them good) against the straightforward algorithm, in the
same run: the time of ``m3dm.evaluation.metrics.au_pro`` (one labelling of the stack, order statistics instead of a
sort, one histogram for every threshold at once) and of the per-threshold loop it replaces (per-image labelling, a
full sort of the OK scores, then for each of the 100 thresholds the overlap of every region), their ratio, and the
two values (equal up to float rounding).

    python benchmarks/au_pro.py [--images 50] [--size 224] [--repeat 3]

This was a wall-clock assertion in the unit tests (au_pro under 5 s on this case); on a shared machine such an
assertion fails for reasons that have nothing to do with the code, so the figure lives here. CPU seconds are
printed beside the wall-clock ones (NumPy runs this on one core).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.ndimage import label

from m3dm.evaluation.metrics import DEFAULT_INTEGRATION_LIMIT, DEFAULT_NUM_THRESHOLDS, au_pro, trapezoid_area


def blob_case(images: int, size: int, good: int, seed: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Masks with one to three discs and a few single pixels per defective image; maps higher on the defects."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((images, size, size), dtype=np.uint8)
    rows, cols = np.mgrid[:size, :size]
    for mask in masks[good:]:
        for _ in range(rng.integers(1, 4)):
            r, c, radius = rng.integers(0, size), rng.integers(0, size), rng.uniform(0.8, size / 4)
            mask[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = 1
        mask[rng.integers(0, size, 3), rng.integers(0, size, 3)] = 1
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    return masks, maps.astype(np.float32)


def straightforward_au_pro(masks: np.ndarray, maps: np.ndarray, limit: float = DEFAULT_INTEGRATION_LIMIT,
                           num_thresholds: int = DEFAULT_NUM_THRESHOLDS) -> float:
    """The same curve, computed threshold by threshold over a list of regions."""
    eight = np.ones((3, 3), dtype=int)
    ok_scores, regions = [], []
    for mask, score_map in zip(masks, maps.astype(np.float64)):
        labels, count = label(mask, structure=eight)
        ok_scores.append(score_map[labels == 0])
        regions += [np.sort(score_map[labels == k]) for k in range(1, count + 1)]
    ok = np.sort(np.concatenate(ok_scores))
    positions = np.linspace(0, len(ok) - 1, num=num_thresholds, dtype=int)
    fprs, pros = [1.0], [1.0]
    for position in positions:
        threshold = ok[position]
        fprs.append(1.0 - (position + 1) / len(ok))
        overlaps = [1.0 - np.searchsorted(region, threshold, side="right") / len(region) for region in regions]
        pros.append(sum(overlaps) / len(regions))
    return trapezoid_area(fprs[::-1], pros[::-1], x_max=limit) / limit


def timed(function, repeat: int) -> tuple[float, float, float]:
    """Best wall-clock and CPU seconds over ``repeat`` calls, and the value."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        value = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--good", type=int, default=10, help="images without a defect")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    masks, maps = blob_case(args.images, args.size, args.good)
    fast_wall, fast_cpu, fast = timed(lambda: au_pro(masks, maps), args.repeat)
    plain_wall, plain_cpu, plain = timed(lambda: straightforward_au_pro(masks, maps), args.repeat)
    print(f"{args.images} maps of {args.size} x {args.size}, best of {args.repeat}")
    print(f"  au_pro:                 {fast_wall:.3f} s wall, {fast_cpu:.3f} s CPU, AU-PRO {fast:.6f}")
    print(f"  per-threshold baseline: {plain_wall:.3f} s wall, {plain_cpu:.3f} s CPU, AU-PRO {plain:.6f}")
    print(f"  ratio (baseline / au_pro): {plain_wall / fast_wall:.1f}x wall, "
          f"{plain_cpu / max(fast_cpu, 1e-9):.1f}x CPU; values differ by {abs(fast - plain):.1e}")


if __name__ == "__main__":
    main()
