"""Point Feature Alignment (PFA): point-group features -> image-aligned patch features (docs/original.md, quirk 18).

The reference path interpolates the group features to every valid point, scatters them into a zero
``(C, S, S)`` grid, applies a 3×3 average pool (stride 1, no padding) and an adaptive average pool to
``out_size``². Every step is linear, and both poolings are separable, so the fast path folds them into
one ``(out_size², G)`` matrix ``M`` and computes ``patches = M @ group_features`` without ever building the
grid or the per-point features. All functions work on one sample (samples differ in their number of points).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

INTERPOLATION_NEIGHBOURS = 3
INTERPOLATION_EPS = 1e-8
CHUNK_BYTES = 64 * 2**20


def valid_points(organized_pc: Tensor) -> tuple[Tensor, Tensor]:
    """``(3, S, S)`` organized cloud -> valid points ``(Nv, 3)`` (row-major order) and their flat indices.

    A pixel is valid when all three coordinates are non-zero.
    """
    flat = organized_pc.permute(1, 2, 0).reshape(-1, 3)
    flat_index = (flat != 0).all(dim=1).nonzero().squeeze(1)
    return flat[flat_index], flat_index


def _rows_per_chunk(row_elements: int, element_size: int) -> int:
    return max(1, CHUNK_BYTES // max(1, row_elements * element_size))


def _nearest_centre_distances(points: Tensor, centres: Tensor, clamp: bool, k: int) -> tuple[Tensor, Tensor]:
    """Squared distances / indices of the ``k`` nearest centres, expansion formula as in the reference."""
    centre_sq = torch.sum(centres**2, -1)
    chunk = _rows_per_chunk(centres.shape[0], points.element_size())
    dists, indices = [], []
    for start in range(0, points.shape[0], chunk):
        part = points[start : start + chunk]
        dist = -2 * (part @ centres.T)
        dist += torch.sum(part**2, -1)[:, None]
        dist += centre_sq[None, :]
        if clamp:  # FIX+FLAG (quirk 18): cancellation can make a centre's distance to itself negative
            dist.clamp_(min=0)
        top_dist, top_idx = dist.topk(k, dim=-1, largest=False, sorted=True)
        dists.append(top_dist)
        indices.append(top_idx)
    return torch.cat(dists), torch.cat(indices)


def interpolation_weights(points: Tensor, centres: Tensor, clamp: bool = False) -> tuple[Tensor, Tensor]:
    """Indices ``(Nv, 3)`` of the 3 nearest centres of each point and their normalised inverse-squared weights.

    Weights are ``1 / (d² + 1e-8)`` normalised to sum 1. With fewer than 3 centres all are used (the
    reference's single-centre branch is broken, quirk 18; here one centre simply gets weight 1).
    """
    k = min(INTERPOLATION_NEIGHBOURS, centres.shape[0])
    dist, idx = _nearest_centre_distances(points, centres, clamp, k)
    reciprocal = 1.0 / (dist + INTERPOLATION_EPS)
    return idx, reciprocal / torch.sum(reciprocal, dim=1, keepdim=True)


def interpolate_to_points(points: Tensor, centres: Tensor, group_features: Tensor, clamp: bool = False) -> Tensor:
    """Inverse-squared-distance interpolation of ``group_features (G, C)`` to ``points (Nv, 3)`` -> ``(Nv, C)``."""
    idx, weight = interpolation_weights(points, centres, clamp)
    chunk = _rows_per_chunk(idx.shape[1] * group_features.shape[1], group_features.element_size())
    parts = [
        torch.sum(group_features[idx[start : start + chunk]] * weight[start : start + chunk, :, None], dim=1)
        for start in range(0, points.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else group_features.new_zeros(0, group_features.shape[1])


def project_to_patches(point_features: Tensor, flat_index: Tensor, img_size: int, out_size: int = 56) -> Tensor:
    """Reference projection: scatter to a zero grid, 3×3 avg pool, adaptive avg pool -> ``(out², C)``."""
    channels = point_features.shape[1]
    grid = point_features.new_zeros(channels, img_size * img_size)
    grid[:, flat_index] = point_features.T
    grid = grid.view(1, channels, img_size, img_size)
    pooled = F.adaptive_avg_pool2d(F.avg_pool2d(grid, kernel_size=3, stride=1), out_size)
    return pooled.reshape(channels, out_size * out_size).T.contiguous()


def pooling_matrix(img_size: int, out_size: int) -> Tensor:
    """1-D matrix ``R (out_size, img_size)`` (float64) of avg-pool(3, stride 1) followed by adaptive avg pool.

    Windows follow PyTorch exactly: the 3-wide pool gives ``img_size - 2`` cells, adaptive cell ``i`` averages
    cells ``[floor(i·L/out), ceil((i+1)·L/out))``. The 2-D pooling of a grid X is ``R X Rᵀ``.
    """
    if img_size < 3:
        raise ValueError(f"img_size must be at least 3 for a 3x3 pool, got {img_size}")
    pooled_len = img_size - 2
    box = torch.zeros(pooled_len, img_size, dtype=torch.float64)
    for offset in range(3):
        box[torch.arange(pooled_len), torch.arange(pooled_len) + offset] = 1.0 / 3.0
    adaptive = torch.zeros(out_size, pooled_len, dtype=torch.float64)
    for i in range(out_size):
        start = (i * pooled_len) // out_size
        end = -((-(i + 1) * pooled_len) // out_size)
        adaptive[i, start:end] = 1.0 / (end - start)
    return adaptive @ box


@functools.lru_cache(maxsize=16)  # the same few tables for every sample of a run
def _pooling_table(img_size: int, out_size: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """For every input row/column: the output cells it feeds and their weights, ``(img_size, T)`` each.

    ``T`` is the largest number of output cells one input coordinate reaches; shorter lists are padded
    with weight 0.
    """
    matrix = pooling_matrix(img_size, out_size)
    nonzero = matrix != 0
    width = max(1, int(nonzero.sum(dim=0).max()))
    cells = nonzero.to(torch.int8).argsort(dim=0, descending=True, stable=True)[:width]
    weights = matrix.gather(0, cells)
    return cells.T.contiguous().to(device), weights.T.contiguous().to(device=device, dtype=dtype)


def patch_matrix(points: Tensor, flat_index: Tensor, centres: Tensor, img_size: int, out_size: int = 56,
                 clamp: bool = False) -> Tensor:
    """The ``(out², G)`` matrix M of the whole PFA map, so that ``patches = M @ group_features``.

    Each valid pixel contributes (row weight × column weight of the combined pooling) × (its interpolation
    weight) to its output cells and its 3 centres.
    """
    n_centres = centres.shape[0]
    centre_idx, centre_w = interpolation_weights(points, centres, clamp)
    cells, cell_w = _pooling_table(img_size, out_size, points.device, centre_w.dtype)
    rows, cols = flat_index // img_size, flat_index % img_size
    out_cell = cells[rows][:, :, None] * out_size + cells[cols][:, None, :]  # (Nv, T, T)
    target = out_cell[..., None] * n_centres + centre_idx[:, None, None, :]  # (Nv, T, T, k)
    value = (cell_w[rows][:, :, None] * cell_w[cols][:, None, :])[..., None] * centre_w[:, None, None, :]
    matrix = centre_w.new_zeros(out_size * out_size * n_centres)
    target, value = target.reshape(-1), value.reshape(-1)
    if matrix.is_cuda:
        # index_add_ sums with float atomics on a GPU, in a different order each run; the accumulating
        # index_put_ sorts the targets (stably) and sums each one's values in that order, as the CPU's
        # sequential index_add_ does
        matrix.index_put_((target,), value, accumulate=True)
    else:
        matrix.index_add_(0, target, value)
    return matrix.view(out_size * out_size, n_centres)


def pfa_patches(points: Tensor, flat_index: Tensor, centres: Tensor, group_features: Tensor, img_size: int,
                out_size: int = 56, clamp: bool = False) -> Tensor:
    """Fast PFA: ``(out², C)`` patches equal to :func:`pfa_patches_reference`, via one ``(out², G)`` matmul."""
    return patch_matrix(points, flat_index, centres, img_size, out_size, clamp) @ group_features


def pfa_patches_reference(points: Tensor, flat_index: Tensor, centres: Tensor, group_features: Tensor,
                          img_size: int, out_size: int = 56, clamp: bool = False) -> Tensor:
    """Reference PFA path: interpolate to every valid point, then project to the patch grid -> ``(out², C)``."""
    point_features = interpolate_to_points(points, centres, group_features, clamp)
    return project_to_patches(point_features, flat_index, img_size, out_size)


def rgb_to_patch_grid(rgb_map: Tensor, out_size: int = 56) -> Tensor:
    """``(B, C, h, w)`` -> adaptive avg pool to ``out_size``² -> ``(B, out_size², C)`` row-major."""
    pooled = F.adaptive_avg_pool2d(rgb_map, out_size)
    return pooled.flatten(2).transpose(1, 2)
