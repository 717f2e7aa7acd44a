"""Pure-PyTorch point operations used by the point backbone (docs/original.md: Point backbone, grouping; quirk 17).

Farthest point sampling reproduces the semantics of the ``pointnet2_ops`` CUDA kernel, k-nearest neighbours
replaces ``KNN_CUDA``; both run on CPU and GPU. When the original CUDA extensions are importable and the data
is on a CUDA device they are used instead (they are not required).
"""

from __future__ import annotations

import torch
from torch import Tensor

from m3dm.runtime import cpu_threads

try:  # optional CUDA extensions used by the reference
    from pointnet2_ops import pointnet2_utils as _pointnet2_utils
except Exception:
    _pointnet2_utils = None

try:
    from knn_cuda import KNN as _CudaKNN
except Exception:
    _CudaKNN = None

FPS_INITIAL_DISTANCE = 1e10
FPS_MIN_SQUARED_NORM = 1e-3  # points this close to the origin are never chosen by the kernel
KNN_CHUNK_BYTES = 64 * 2**20


def farthest_point_sample(points: Tensor, n_samples: int) -> Tensor:
    """``(B, N, 3)`` -> ``(B, n_samples)`` int64 indices, with the semantics of pointnet2_ops' FPS kernel.

    First centre is index 0; a running minimum of squared distances (initialised to 1e10) is kept for every
    point whose squared norm exceeds 1e-3 (the others are never selected); the next centre is the argmax of
    that running minimum (ties -> lowest index); with no selectable point at all the kernel answers index 0.
    """
    if points.is_cuda and _pointnet2_utils is not None and points.dtype == torch.float32:
        return _pointnet2_utils.furthest_point_sample(points.contiguous(), n_samples).long()
    batch = points.shape[0]
    x, y, z = (coord.contiguous() for coord in points.unbind(-1))
    # the kernel compares a float magnitude with the double literal 1e-3, so compare in float64
    selectable = (x * x + y * y + z * z).double() > FPS_MIN_SQUARED_NORM
    # unselectable points carry -1, below every real distance: argmax never picks them unless all are -1,
    # in which case argmax returns index 0 -- exactly the kernel's fallback
    running = torch.where(selectable, FPS_INITIAL_DISTANCE, -1.0).to(points.dtype)
    chosen = torch.zeros(batch, n_samples, dtype=torch.long, device=points.device)
    current = torch.zeros(batch, 1, dtype=torch.long, device=points.device)
    dist, part = torch.empty_like(x), torch.empty_like(x)  # reused: a thousand short steps, no allocations
    with cpu_threads(1, points.device):  # a thousand tiny steps: one thread (runtime.cpu_threads)
        for j in range(1, n_samples):
            # ((dx² + dy²) + dz²), in the kernel's order
            torch.sub(x, x.gather(1, current), out=dist).square_()
            dist.add_(torch.sub(y, y.gather(1, current), out=part).square_())
            dist.add_(torch.sub(z, z.gather(1, current), out=part).square_())
            torch.minimum(running, dist, out=running)
            current = running.argmax(dim=1, keepdim=True)
            chosen[:, j : j + 1] = current
    return chosen


def _default_knn_chunk(batch: int, n_points: int, element_size: int) -> int:
    return max(1, KNN_CHUNK_BYTES // max(1, batch * n_points * element_size))


def _squared_distances(query: Tensor, points: Tensor) -> Tensor:
    """``(B, M, 3)``, ``(B, N, 3)`` -> ``(B, M, N)`` from direct coordinate differences (no cancellation)."""
    dist = (query[..., 0, None] - points[..., None, :, 0]).square_()
    for axis in (1, 2):
        dist.add_((query[..., axis, None] - points[..., None, :, axis]).square_())
    return dist


def _sort_ties_by_index(dist: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder each row of a top-k result so that equal distances come in ascending index order."""
    by_index = idx.argsort(dim=-1)
    dist, idx = dist.gather(-1, by_index), idx.gather(-1, by_index)
    by_distance = dist.argsort(dim=-1, stable=True)
    return dist.gather(-1, by_distance), idx.gather(-1, by_distance)


def knn(query: Tensor, points: Tensor, k: int, chunk_size: int | None = None,
        lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``k`` nearest ``points`` of each query: ``(B, M, 3)``, ``(B, N, 3)`` -> squared distances and indices.

    Both outputs are ``(B, M, k)``, sorted by ascending distance (equal distances by ascending index). Work is
    chunked over the queries so that one chunk's distance matrix stays around 64 MB. ``lengths (B,)``: only the
    first ``lengths[b]`` points of cloud ``b`` are candidates (padded batches, ``pad_clouds``).
    """
    padded = lengths is not None and bool((lengths < points.shape[1]).any())
    if query.is_cuda and _CudaKNN is not None and query.dtype == torch.float32 and not padded:
        dist, idx = _CudaKNN(k=k, transpose_mode=True)(points.contiguous(), query.contiguous())
        return dist.square(), idx.long()  # KNN_CUDA returns Euclidean distances
    batch, n_queries, _ = query.shape
    if chunk_size is None:
        chunk_size = _default_knn_chunk(batch, points.shape[1], points.element_size())
    dists, indices = [], []
    if padded and lengths is not None:
        padding = torch.arange(points.shape[1], device=points.device)[None, :] >= lengths.to(points.device)[:, None]
    for start in range(0, n_queries, chunk_size):
        dist = _squared_distances(query[:, start : start + chunk_size], points)
        if padded:  # padding is never a neighbour: the top-k of the real points, in the same order
            dist.masked_fill_(padding[:, None, :], float("inf"))
        top_dist, top_idx = dist.topk(k, dim=-1, largest=False, sorted=True)
        del dist
        top_dist, top_idx = _sort_ties_by_index(top_dist, top_idx)
        dists.append(top_dist)
        indices.append(top_idx)
    return torch.cat(dists, dim=1), torch.cat(indices, dim=1)


def gather_points(points: Tensor, idx: Tensor) -> Tensor:
    """``points (B, N, C)`` indexed per batch by ``idx (B, *S)`` -> ``(B, *S, C)``."""
    batch, channels = points.shape[0], points.shape[-1]
    flat = idx.reshape(batch, -1, 1).expand(-1, -1, channels)
    return points.gather(1, flat).reshape(*idx.shape, channels)


def pad_clouds(clouds: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Clouds of different sizes ``(N_b, 3)`` as one batch ``(B, max N_b, 3)`` and their lengths ``(B,)``.

    Each cloud is padded with copies of its own point 0, the first FPS centre: a copy is at distance 0 from it,
    so FPS picks no copy while a real point is farther (and when none is, picks the real point of lowest
    index first), giving the indices of the cloud on its own; ``knn`` leaves the padding out via ``lengths``.
    """
    lengths = torch.tensor([len(c) for c in clouds], dtype=torch.long)
    longest = int(lengths.max())
    padded = torch.stack([torch.cat([c, c[:1].expand(longest - len(c), -1)]) if len(c) < longest else c
                          for c in clouds])
    return padded, lengths


def group_points(points: Tensor, num_group: int, group_size: int,
                 lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Point-MAE grouping: FPS centres and their ``group_size`` nearest points, relative to the centre.

    ``(B, N, 3)`` -> neighbourhoods ``(B, num_group, group_size, 3)``, centres ``(B, num_group, 3)``.
    ``lengths``: a batch from ``pad_clouds`` (same groups as each cloud grouped alone).
    """
    smallest = int(lengths.min()) if lengths is not None else points.shape[1]
    if smallest < group_size:
        raise ValueError(f"a cloud of {smallest} points cannot form groups of {group_size} points")
    centres = gather_points(points, farthest_point_sample(points, num_group))
    _, neighbour_idx = knn(centres, points, group_size, lengths=lengths)
    neighbourhoods = gather_points(points, neighbour_idx) - centres.unsqueeze(2)
    return neighbourhoods, centres
