"""DBSCAN that returns exactly Open3D's ``cluster_dbscan`` labels, fast on dense scans.

Open3D computes every point's full radius neighbourhood (thousands of points on an 800x800 scan, tens of
seconds per cloud). The labels only depend on:

* core points: at least ``min_points`` points (itself included) within ``eps``;
* clusters: connected components of core points (two cores are linked when closer than ``eps``), numbered
  in the order Open3D discovers them, i.e. by the smallest point index in each component;
* border points: a non-core point within ``eps`` of a core point joins the first-numbered such cluster;
* everything else is noise (-1).

Here points are binned into cubic cells of side ``eps/√3`` (any two points of a cell are within ``eps``), so
every point of a cell holding ``min_points`` points is a core point without a search, cores of one cell are
connected, and only pairs of nearby cells not yet known to be connected need a nearest-neighbour check.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.spatial import cKDTree

NOISE = -1
_REACH = 2  # cells of side eps/√3: a point within eps lies at most 2 cells away along each axis


def _cell_offsets() -> np.ndarray:
    offsets = np.array(list(itertools.product(range(-_REACH, _REACH + 1), repeat=3)))
    offsets = offsets[np.lexsort(offsets.T[::-1])]
    nearest_first = np.argsort(np.abs(offsets).sum(1), kind="stable")
    return offsets[nearest_first][1:]  # without (0, 0, 0)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _cells(points: np.ndarray, side: float):
    """Cell id of every point, the integer coordinates of every cell, and points grouped by cell."""
    coords = np.floor((points - points.min(0)) / side).astype(np.int64)
    dims = coords.max(0) + 1 + 2 * _REACH
    keys = ((coords[:, 0] + _REACH) * dims[1] + coords[:, 1] + _REACH) * dims[2] + coords[:, 2] + _REACH
    cell_keys, cell_of_point = np.unique(keys, return_inverse=True)
    order = np.argsort(cell_of_point, kind="stable")
    starts = np.searchsorted(cell_of_point[order], np.arange(len(cell_keys) + 1))
    members = [order[starts[c]:starts[c + 1]] for c in range(len(cell_keys))]
    return cell_of_point, cell_keys, dims, members


def _neighbour_cell_pairs(cell_keys: np.ndarray, dims: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """All (a, b), a < b, of the given cells lying within reach of each other, nearest offsets first."""
    offsets = _cell_offsets()
    key_offsets = (offsets[:, 0] * dims[1] + offsets[:, 1]) * dims[2] + offsets[:, 2]
    candidate = cell_keys[cells][None, :] + key_offsets[:, None]  # (offsets, cells)
    position = np.clip(np.searchsorted(cell_keys, candidate), 0, len(cell_keys) - 1)
    found = cell_keys[position] == candidate
    a = np.broadcast_to(cells[None, :], candidate.shape)[found]
    b = position[found]
    keep = a < b
    return np.stack([a[keep], b[keep]], axis=1)


def dbscan_labels(points: np.ndarray, eps: float, min_points: int) -> np.ndarray:
    """Labels identical to Open3D's ``PointCloud.cluster_dbscan(eps, min_points)`` for ``(N, 3)`` points."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if n == 0:
        return np.zeros(0, np.int64)
    side = eps / np.sqrt(3) * (1 - 1e-9)
    cell_of_point, cell_keys, dims, members = _cells(points, side)
    cell_sizes = np.array([len(m) for m in members])
    tree = cKDTree(points)

    core = cell_sizes[cell_of_point] >= min_points
    sparse = np.flatnonzero(~core)
    if len(sparse):
        counts = tree.query_ball_point(points[sparse], r=eps, return_length=True)
        core[sparse] = counts >= min_points
    if not core.any():
        return np.full(n, NOISE, np.int64)

    core_members = [m[core[m]] for m in members]
    core_cells = np.flatnonzero([len(m) > 0 for m in core_members])
    components = _UnionFind(len(cell_keys))
    trees: dict[int, cKDTree] = {}
    for a, b in _neighbour_cell_pairs(cell_keys, dims, core_cells):
        if components.find(a) == components.find(b):
            continue
        if b not in trees:
            trees[b] = cKDTree(points[core_members[b]])
        distances, _ = trees[b].query(points[core_members[a]], k=1, distance_upper_bound=eps)
        if np.isfinite(distances).any():
            components.union(a, b)

    labels = np.full(n, NOISE, np.int64)
    core_index = np.flatnonzero(core)
    roots = np.array([components.find(c) for c in cell_of_point[core_index]])
    # Open3D numbers clusters in the order of their first (lowest-index) core point
    _, first = np.unique(roots, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(core_index[first])] = np.arange(len(first))
    _, root_id = np.unique(roots, return_inverse=True)
    labels[core_index] = rank[root_id]

    border_candidates = np.flatnonzero(~core)
    if len(border_candidates):
        core_tree = cKDTree(points[core_index])
        for point, near in zip(border_candidates, core_tree.query_ball_point(points[border_candidates], r=eps)):
            if near:
                labels[point] = labels[core_index[near]].min()
    return labels
