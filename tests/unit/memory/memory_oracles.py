"""Straightforward NumPy versions of the memory bank's steps (the oracles its tests compare with), and test data."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.random_projection import SparseRandomProjection

from m3dm.memory.defaults import default_coreset


def clustered(seed: int, rows: int = 600, dim: int = 256, duplicates: int = 0) -> np.ndarray:
    """Float32 rows around a few centres, optionally with exact duplicate rows and all-zero rows appended."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (8, dim))
    x = centres[rng.integers(0, 8, rows)] + rng.normal(0, 1, (rows, dim))
    if duplicates:
        x = np.concatenate([np.zeros((duplicates, dim)), x, x[:duplicates]])
    return x.astype(np.float32)


def to_half_like_torch(values: np.ndarray) -> np.ndarray:
    # torch turns float64 into float16 through float32 (checked in test_half_conversion_goes_through_float32)
    return values.astype(np.float32).astype(np.float16)


def numpy_coreset(features: np.ndarray, n: int, seed, fp16: bool) -> list[int]:
    """Plain greedy k-center as in the reference: project (float64), start at row 0, n-1 farthest-point steps."""
    proj = SparseRandomProjection(eps=0.9, random_state=seed).fit_transform(features.astype(np.float64))
    min_dist = np.linalg.norm(proj - proj[0], axis=1)
    bank = proj
    if fp16:
        # float16 values held in float32 (exactly): a float16 difference is NumPy's float32 difference rounded once
        # to float16, which the loop below does on whole arrays, several times faster than NumPy's float16 loop
        bank, min_dist = to_half_like_torch(proj).astype(np.float32), to_half_like_torch(min_dist)
    chosen, last = [0], bank[0]
    for _ in range(n - 1):
        diff = (bank - last).astype(np.float16) if fp16 else bank - last  # float16 arithmetic when fp16
        dist = np.sqrt(np.sum(diff.astype(np.float64) ** 2, axis=1))
        min_dist = np.minimum(min_dist, to_half_like_torch(dist) if fp16 else dist)
        index = int(np.argmax(min_dist))
        min_dist[index] = 0
        last = bank[index]
        chosen.append(index)
    return chosen


def default_indices(features, n: int, random_state=None, fp16: bool = True, shards: int = 1) -> torch.Tensor:
    """The default CPU coreset's indices (the automatic strategy choice), without a progress bar."""
    return default_coreset("cpu", fp16, shards).select(features, n, random_state=random_state, progress=False)


def hand_score(x: np.ndarray, bank: np.ndarray, n_reweight=3, eps=0.0, divisor=1.0) -> tuple[float, float]:
    """The reference's re-weighted image score from the full distance matrix; returns ``(score, weight)``."""
    dist = np.linalg.norm(x[:, None, :] - bank[None, :, :], axis=2)
    worst = int(np.argmax(dist.min(axis=1)))
    s_star = dist[worst].min() / divisor
    neighbour = bank[np.argmin(dist[worst])]
    knn = np.argsort(np.linalg.norm(bank - neighbour, axis=1), kind="stable")[1:n_reweight]
    deltas = np.linalg.norm(bank[knn] - x[worst], axis=1) / divisor
    d = np.sqrt(x.shape[1])
    w = 1 - np.exp(s_star / d) / (np.sum(np.exp(deltas / d)) + eps)
    return w * s_star, w
