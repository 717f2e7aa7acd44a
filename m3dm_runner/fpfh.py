"""BTF's FPFH point features in NumPy: what ``m3dm.features.fpfh`` computes with Open3D, for the runner.

The steps follow Open3D's documented algorithm (``estimate_normals`` then ``compute_fpfh_feature``, both with a
``KDTreeSearchParamHybrid``), written vectorised over the points:

- **neighbourhoods**: the ``max_nn`` nearest points (the point itself first) whose squared distance is below
  ``radius²``, exact float64 distances ``(dx² + dy²) + dz²``, from a grid of cells (candidates: the cells around
  a point's, near its group of queries) with a brute force for the points it cannot settle;
- **normals**: the covariance of each neighbourhood (at least 3 points, else the identity) from its raw moments
  ``E[x xᵀ] − E[x] E[x]ᵀ``, and the eigenvector of its smallest eigenvalue by the closed-form 3 × 3 solver Open3D
  uses (Geometric Tools' robust symmetric eigensolver), whose sign choice is the normal's orientation (the cloud is
  not oriented afterwards); a zero normal becomes ``(0, 0, 1)``;
- **SPFH**: for each neighbour after the first, the Darboux-frame angles ``(α, φ, θ)`` of the pair (the frame at
  the point whose normal makes the smaller angle with the line), each put in 11 bins of ``[−π, π]`` or ``[−1, 1]``
  with weight ``100 / (neighbours − 1)``;
- **FPFH**: the point's SPFH plus the sum of its neighbours' SPFH weighted by ``1 / squared distance``, each
  11-bin block of that sum scaled to total 100 (neighbours at distance 0 skipped).

Sums run in Open3D's order (neighbour by neighbour), so the features agree with Open3D's to float round-off except
where two neighbours tie in distance at the ``max_nn`` boundary (the k-d tree and this search may keep different
ones) or a pair's angle lies on a bin edge to round-off.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from m3dm_runner.pointops import valid_points

FPFH_DIM = 33  # 3 angles x 11 bins
BINS = 11
NORMAL_MIN_NEIGHBOURS = 3
_SEARCH_CHUNK_BYTES = 32 * 2**20
_PAIR_CHUNK_POINTS = 128  # the pairs' temporaries (3 x 128 x 99 floats) stay in cache
_ROW_CHUNK = 1024  # the histogram sums' rows: their (36, rows) arrays stay in the CPU's cache
_MAX_THREADS = 8
_GRID_MIN_POINTS = 2000  # below, one brute-force search is as fast
_CELL_SAMPLE = 64
_CELL_MARGIN = 1 - 1e-9  # the cells are found by float division
_MARGIN_CELLS = 0.8  # per ring: candidates within this many cells of a query group's bounding box
_QUERY_ROWS = 64  # queries of a cell searched together: their distance block stays in the CPU's cache
_TWO_THIRDS_PI = 2.09439510239319549

Components = Sequence[np.ndarray] | np.ndarray  # a vector's three components: arrays, or a (3, ...) array


@dataclass(frozen=True)
class FPFHParams:
    """Neighbourhoods (``m3dm.features.fpfh.FPFHParams``): normals within ``normal_radius`` (at most
    ``normal_max_nn`` points), histograms within ``feature_radius`` (at most ``feature_max_nn``)."""

    normal_radius: float = 0.1
    normal_max_nn: int = 30
    feature_radius: float = 0.25
    feature_max_nn: int = 100


@dataclass(frozen=True)
class Neighbourhoods:
    """Each point's neighbours, nearest first (the point itself, or a copy of it, first): ``index (N, K)`` and
    ``dist2 (N, K)`` squared distances, valid where the column is below ``count (N,)``."""

    index: np.ndarray
    dist2: np.ndarray
    count: np.ndarray

    def valid(self) -> np.ndarray:
        return np.arange(self.index.shape[1])[None, :] < self.count[:, None]

    def narrowed(self, radius: float, max_nn: int) -> Neighbourhoods:
        """The neighbourhoods of a smaller search (``radius`` and ``max_nn`` at most this one's): a prefix."""
        dist2 = self.dist2[:, :max_nn]
        return Neighbourhoods(self.index[:, :max_nn], dist2, np.minimum((dist2 < radius * radius).sum(axis=1),
                                                                        self.count))


def default_threads() -> int:
    """The FPFH's worker threads: the CPU count, at most 8 (NumPy releases the GIL inside its loops)."""
    return max(1, min(os.cpu_count() or 1, _MAX_THREADS))


def _over_chunks(work: Callable[[slice], object], total: int, chunk: int, threads: int | None) -> list:
    """``work(rows)`` for consecutive ``chunk``-row slices of ``range(total)``, on ``threads`` threads (the default
    count when ``None``); results in order. Each chunk's arithmetic is the same whichever thread runs it."""
    slices = [slice(start, min(start + chunk, total)) for start in range(0, total, chunk)]
    threads = default_threads() if threads is None else threads
    if threads <= 1 or len(slices) <= 1:
        return [work(rows) for rows in slices]
    with ThreadPoolExecutor(min(threads, len(slices))) as pool:
        return list(pool.map(work, slices))


def squared_distances(queries: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``(Q, 3)``, ``(N, 3)`` float64 -> ``(Q, N)``, summed ``(dx² + dy²) + dz²`` as a k-d tree's L2 metric."""
    dist = np.subtract(queries[:, None, 0], points[None, :, 0])
    np.square(dist, out=dist)
    term = np.empty_like(dist)  # one temporary for both other axes
    for axis in (1, 2):
        np.subtract(queries[:, None, axis], points[None, :, axis], out=term)
        dist += np.square(term, out=term)
    return dist


def _nearest_rows(dist: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of ``candidates (C,)`` (sorted by index) per row of ``dist (Q, C)``, nearest first, equal
    distances in index order: ``(indices (Q, k), squared distances (Q, k))``.

    The k-th smallest distance of each row (a partition of the values, cheaper than of their positions) picks the
    row's nearest in index order; a row with several candidates at its k-th distance keeps the lower indices."""
    rows, width = dist.shape
    if k < width:
        kth = np.partition(dist, k - 1, axis=1)[:, k - 1:k]
        chosen = dist <= kth
        tied = np.flatnonzero(np.count_nonzero(chosen, axis=1) > k)
        if len(tied):  # of the candidates at the k-th distance, these rows take the lowest indices only
            at_kth = dist[tied] == kth[tied]
            short = k - np.count_nonzero(dist[tied] < kth[tied], axis=1)
            chosen[tied] &= ~at_kth | (np.cumsum(at_kth, axis=1) <= short[:, None])
        flat = np.flatnonzero(chosen).reshape(rows, k)  # in index order within each row
    else:
        flat = np.arange(rows * width).reshape(rows, width)
    near_dist = np.take(dist, flat)
    order = np.argsort(near_dist, axis=1, kind="stable")
    flat = np.take_along_axis(flat, order, axis=1)
    return candidates[flat % width], np.take(dist, flat)


def _brute_force(points: np.ndarray, queries: np.ndarray, k: int, index: np.ndarray, dist2: np.ndarray,
                 threads: int | None) -> None:
    """The ``k`` nearest points of the points at ``queries``, written into rows ``queries`` of ``index``/``dist2``."""
    everyone = np.arange(len(points))

    def search(chunk: slice) -> None:
        rows = queries[chunk]
        index[rows], dist2[rows] = _nearest_rows(squared_distances(points[rows], points), everyone, k)

    _over_chunks(search, len(queries), max(1, _SEARCH_CHUNK_BYTES // (8 * len(points))), threads)


def _cell_size(points: np.ndarray, k: int) -> float:
    """A cell edge for the grid search: twice the median distance to the k-th neighbour of up to 64 points."""
    sample = points[np.linspace(0, len(points) - 1, min(len(points), _CELL_SAMPLE)).astype(np.int64)]
    kth = np.sqrt(np.partition(squared_distances(sample, points), k - 1, axis=1)[:, k - 1])
    return float(2.0 * np.median(kth))


def _grid_search(points: np.ndarray, k: int, radius: float, index: np.ndarray, dist2: np.ndarray,
                 threads: int | None, ring: int = 1, among: np.ndarray | None = None) -> np.ndarray:
    """Each point's ``k`` nearest among the points of the cells up to ``ring`` cells from its own (3 x 3 x 3 for
    1) that lie near its group of queries, for all points or those at ``among``; returns the points whose result
    is not provably exact (the k-th distance, or the radius when smaller, not inside their cell block, or not
    below the margin kept around their group)."""
    size = _cell_size(points, k)
    if not size > 0:
        return np.arange(len(points)) if among is None else among
    wanted = None if among is None else np.isin(np.arange(len(points)), among)
    cells = np.floor((points - points.min(axis=0)) / size).astype(np.int64)
    span = cells.max(axis=0) + 2 * ring + 1
    key = ((cells[:, 0] + ring) * span[1] + cells[:, 1] + ring) * span[2] + cells[:, 2] + ring
    order = np.argsort(key, kind="stable")
    sorted_keys = key[order]
    occupied, first = np.unique(sorted_keys, return_index=True)
    last = np.append(first[1:], len(order))
    steps = range(-ring, ring + 1)
    shifts = np.array([(dx * span[1] + dy) * span[2] + dz for dx in steps for dy in steps for dz in steps])
    # a point outside a query's block is farther than the query's distance to the block's faces
    low = points - ((cells - ring) * size + points.min(axis=0))
    high = (cells + ring + 1) * size + points.min(axis=0) - points
    reach = _CELL_MARGIN * np.minimum(low, high).min(axis=1)
    margin = _MARGIN_CELLS * ring * size  # most points' k-th neighbour is nearer (the cell: twice the median's)

    def search_cells(cells_slice: slice) -> list[np.ndarray]:  # each cell writes only its own points' rows
        unsure = []
        for cell, begin, end in zip(occupied[cells_slice], first[cells_slice], last[cells_slice]):
            queries = order[begin:end] if wanted is None else order[begin:end][wanted[order[begin:end]]]
            if not len(queries):
                continue
            slots = np.searchsorted(occupied, cell + shifts)
            slots = slots[(slots < len(occupied)) & (occupied[np.minimum(slots, len(occupied) - 1)] == cell + shifts)]
            block = np.sort(np.concatenate([order[first[s]:last[s]] for s in slots]))
            for start in range(0, len(queries), _QUERY_ROWS):
                unsure.append(search_near(queries[start:start + _QUERY_ROWS], block))
        return unsure

    def search_near(queries: np.ndarray, block: np.ndarray) -> np.ndarray:
        """The queries' nearest among the block's points within ``margin`` of their bounding box (a point farther
        is farther than ``margin`` from each query); returns the queries not settled."""
        low, high = points[queries].min(axis=0) - margin, points[queries].max(axis=0) + margin
        coords = points[block]
        candidates = block[((coords >= low) & (coords <= high)).all(axis=1)]
        found = min(k, len(candidates))
        rows_index, rows_dist = _nearest_rows(squared_distances(points[queries], points[candidates]),
                                              candidates, found)
        kth = np.sqrt(rows_dist[:, -1]) if found == k else np.full(len(queries), np.inf)
        exact = np.minimum(kth, radius) < np.minimum(reach[queries], _CELL_MARGIN * margin)
        index[queries[exact], :found], dist2[queries[exact], :found] = rows_index[exact], rows_dist[exact]
        return queries[~exact]

    groups = _over_chunks(search_cells, len(occupied), max(1, -(-len(occupied) // (4 * _MAX_THREADS))), threads)
    unsure = [queries for group in groups for queries in group]
    return np.concatenate(unsure) if unsure else np.zeros(0, dtype=np.int64)


def hybrid_search(points: np.ndarray, radius: float, max_nn: int, threads: int | None = None) -> Neighbourhoods:
    """Open3D's hybrid search for every point of ``(N, 3)`` float64 ``points``: its ``max_nn`` nearest neighbours,
    cut to those at squared distance below ``radius²``. Equal distances keep the lower index first.

    Exact: a grid of cells answers the points whose neighbours provably lie in the cells around theirs, then in
    the cells up to two away, a brute force over all points the others (sparse regions, small clouds). Row
    chunks run on ``threads`` threads (``default_threads()`` when ``None``), with the same results."""
    k = min(max_nn, len(points))
    index = np.zeros((len(points), k), dtype=np.int64)
    dist2 = np.full((len(points), k), np.inf)
    rest = np.arange(len(points))
    if len(points) > _GRID_MIN_POINTS:
        rest = _grid_search(points, k, radius, index, dist2, threads)
        if len(rest):
            rest = _grid_search(points, k, radius, index, dist2, threads, ring=2, among=rest)
    _brute_force(points, rest, k, index, dist2, threads)
    return Neighbourhoods(index, dist2, (dist2 < radius * radius).sum(axis=1))


def neighbourhood_covariances(points: np.ndarray, near: Neighbourhoods) -> np.ndarray:
    """``(N, 3, 3)``: each neighbourhood's covariance from its raw moments, accumulated neighbour by neighbour;
    the identity where fewer than 3 points."""
    valid = near.valid()
    moments = np.zeros((len(points), 9))  # x, y, z, xx, xy, xz, yy, yz, zz
    for column in range(near.index.shape[1]):
        p = points[near.index[:, column]] * valid[:, column, None]
        moments += np.stack([p[:, 0], p[:, 1], p[:, 2], p[:, 0] * p[:, 0], p[:, 0] * p[:, 1], p[:, 0] * p[:, 2],
                             p[:, 1] * p[:, 1], p[:, 1] * p[:, 2], p[:, 2] * p[:, 2]], axis=1)
    moments /= np.maximum(near.count, 1)[:, None].astype(np.float64)
    mean = moments[:, :3]
    pairs = ((0, 0, 3), (0, 1, 4), (0, 2, 5), (1, 1, 6), (1, 2, 7), (2, 2, 8))
    cov = np.empty((len(points), 3, 3))
    for row, col, moment in pairs:
        cov[:, row, col] = cov[:, col, row] = moments[:, moment] - mean[:, row] * mean[:, col]
    cov[near.count < NORMAL_MIN_NEIGHBOURS] = np.eye(3)
    return cov


def _cross(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """The cross product of vectors whose components lie along ``axis``."""
    a, b = np.moveaxis(a, axis, 0), np.moveaxis(b, axis, 0)
    return np.stack([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]], axis=axis)


def _dot(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """The dot product ``(a₀b₀ + a₁b₁) + a₂b₂`` of vectors whose components lie along ``axis``."""
    a, b = np.moveaxis(a, axis, 0), np.moveaxis(b, axis, 0)
    return (a[0] * b[0] + a[1] * b[1]) + a[2] * b[2]


def _times(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``A v`` of symmetric ``(N, 3, 3)`` ``A``, each row summed left to right."""
    return np.stack([_dot(matrix[:, row], vector) for row in range(3)], axis=1)


def _eigenvector_by_rows(a: np.ndarray, value: np.ndarray) -> np.ndarray:
    """The eigenvector of ``value``: the largest cross product of two rows of ``A − value·I`` (first on ties)."""
    shifted = a - value[:, None, None] * np.eye(3)
    crosses = [_cross(shifted[:, 0], shifted[:, 1]), _cross(shifted[:, 0], shifted[:, 2]),
               _cross(shifted[:, 1], shifted[:, 2])]
    lengths = np.stack([_dot(c, c) for c in crosses], axis=1)
    best = np.zeros(len(a), dtype=np.int64)
    best[lengths[:, 1] > lengths[:, 0]] = 1
    best[lengths[:, 2] > np.maximum(lengths[:, 0], lengths[:, 1])] = 2
    picked = np.stack(crosses, axis=1)[np.arange(len(a)), best]
    return picked / np.sqrt(lengths[np.arange(len(a)), best])[:, None]


def _second_eigenvector(a: np.ndarray, first: np.ndarray, value: np.ndarray) -> np.ndarray:
    """The eigenvector of ``value`` orthogonal to ``first``: the 2 × 2 problem in a basis ``(u, v)`` of the plane
    orthogonal to ``first``, solved by the larger of its rows."""
    x_larger = np.abs(first[:, 0]) > np.abs(first[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_xz = 1 / np.sqrt(first[:, 0] * first[:, 0] + first[:, 2] * first[:, 2])
        inv_yz = 1 / np.sqrt(first[:, 1] * first[:, 1] + first[:, 2] * first[:, 2])
        zeros = np.zeros(len(a))
        u = np.where(x_larger[:, None], np.stack([-first[:, 2] * inv_xz, zeros, first[:, 0] * inv_xz], axis=1),
                     np.stack([zeros, first[:, 2] * inv_yz, -first[:, 1] * inv_yz], axis=1))
        v = _cross(first, u)
        au, av = _times(a, u), _times(a, v)
        m00, m01, m11 = _dot(u, au) - value, _dot(u, av), _dot(v, av) - value
        a00, a01, a11 = np.abs(m00), np.abs(m01), np.abs(m11)
        # rows (m00, m01) when |m00| >= |m11|, else (m01, m11): the solution is (c, -s) or (s, -c) in (u, v)
        use_first_row = a00 >= a11
        big = np.where(use_first_row, a00, a11)
        by_diagonal = big >= a01
        diagonal, other = np.where(use_first_row, m00, m11), m01
        ratio = np.where(by_diagonal, other / diagonal, diagonal / other)
        scale = 1 / np.sqrt(1 + ratio * ratio)
        along = np.where(by_diagonal, scale, ratio * scale)  # the diagonal's share, normalised
        across = np.where(by_diagonal, ratio * scale, scale)  # the off-diagonal's share
        coef_u = np.where(use_first_row, across, along)
        coef_v = np.where(use_first_row, along, across)
        vector = coef_u[:, None] * u - coef_v[:, None] * v
    degenerate = np.maximum(big, a01) <= 0
    return np.where(degenerate[:, None], u, vector)


def smallest_eigenvectors(cov: np.ndarray) -> np.ndarray:
    """``(N, 3, 3)`` symmetric -> ``(N, 3)``: the unit eigenvector of the smallest eigenvalue by the closed-form
    solver (eigenvalues from the trigonometric solution of the characteristic cubic, on the matrix scaled by its
    largest entry), with its sign; zero where the matrix is zero."""
    n = len(cov)
    largest = cov.reshape(n, 9).max(axis=1)
    safe = np.where(largest == 0, 1.0, largest)
    a = cov / safe[:, None, None]
    a00, a11, a22, a01, a02, a12 = a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2]
    off = a01 * a01 + a02 * a02 + a12 * a12
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (a00 + a11 + a22) / 3
        b00, b11, b22 = a00 - q, a11 - q, a22 - q
        p = np.sqrt((b00 * b00 + b11 * b11 + b22 * b22 + off * 2) / 6)
        c00, c01, c02 = b11 * b22 - a12 * a12, a01 * b22 - a12 * a02, a01 * a12 - b11 * a02
        half_det = np.clip((b00 * c00 - a01 * c01 + a02 * c02) / (p * p * p) * 0.5, -1.0, 1.0)
        angle = np.arccos(half_det) / 3.0
        beta2 = np.cos(angle) * 2
        beta0 = np.cos(angle + _TWO_THIRDS_PI) * 2
        beta1 = -(beta0 + beta2)
        eval0, eval1, eval2 = q + p * beta0, q + p * beta1, q + p * beta2
        positive = half_det >= 0  # the solver starts from the eigenvalue farthest from the others
        start_value = np.where(positive, eval2, eval0)
        first = _eigenvector_by_rows(a, start_value)
        second = _second_eigenvector(a, first, eval1)
        third = np.where(positive[:, None], _cross(second, first), _cross(first, second))
    others = np.where(positive, eval0, eval2)
    first_smallest = (start_value < others) & (start_value < eval1)
    second_smallest = (eval1 < eval0) & (eval1 < eval2)
    general = np.where(first_smallest[:, None], first, np.where(second_smallest[:, None], second, third))
    diagonal = np.zeros((n, 3))  # a diagonal matrix: the axis of the smallest entry (z on ties)
    x_least = (a00 < a11) & (a00 < a22)
    y_least = ~x_least & (a11 < a00) & (a11 < a22)
    diagonal[x_least, 0], diagonal[y_least, 1], diagonal[~x_least & ~y_least, 2] = 1.0, 1.0, 1.0
    vectors = np.where((off > 0)[:, None], general, diagonal)
    vectors[largest == 0] = 0.0
    return vectors


def estimate_normals(points: np.ndarray, near: Neighbourhoods) -> np.ndarray:
    """``(N, 3)`` float64 and their neighbourhoods -> ``(N, 3)`` unit normals as Open3D's ``estimate_normals`` on a
    cloud without normals."""
    normals = smallest_eigenvectors(neighbourhood_covariances(points, near))
    normals[np.sqrt(_dot(normals, normals)) == 0] = (0.0, 0.0, 1.0)
    return normals


def _dot_of(a: Components, b: Components) -> np.ndarray:
    """``(a₀b₀ + a₁b₁) + a₂b₂`` of vectors given as three component arrays (no stacking, sums in place)."""
    out = a[0] * b[0]
    out += a[1] * b[1]
    out += a[2] * b[2]
    return out


def _cross_of(a: Components, b: Components) -> list[np.ndarray]:
    """The cross product of vectors given as three component arrays."""
    out = []
    for i, j in ((1, 2), (2, 0), (0, 1)):
        term = a[i] * b[j]
        term -= a[j] * b[i]
        out.append(term)
    return out


def pair_features(p1: Components, n1: Components, p2: Components,
                  n2: Components) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs as three (broadcastable) component arrays each -> angles ``(α, φ, θ)`` in the Darboux frame of the
    source point (the one whose normal is closer to the line between them); zeros for coincident points or a
    normal along the line. The line itself is negated on a swap, as Open3D does (negating the results instead
    would turn a cancelled +0 into −0, and ``atan2`` tells them apart)."""
    line = [np.subtract(b, a) for a, b in zip(p1, p2)]
    length = np.sqrt(_dot_of(line, line))
    with np.errstate(divide="ignore", invalid="ignore"):
        angle1 = _dot_of(n1, line)
        angle1 /= length
        angle2 = _dot_of(n2, line)
        angle2 /= length
        # Open3D swaps when acos|cos1| > acos|cos2|: acos decreases, and its comparison follows the cosines' own
        # order even where they differ by one ulp (NumPy's arccos may round two such cosines to one value)
        swap = np.abs(angle1) < np.abs(angle2)
        source = [np.where(swap, b, a) for a, b in zip(n1, n2)]
        target = [np.where(swap, a, b) for a, b in zip(n1, n2)]
        for component in line:
            np.negative(component, out=component, where=swap)
        theta = np.where(swap, np.negative(angle2, out=angle2), angle1)
        v = _cross_of(line, source)
        v_norm = np.sqrt(_dot_of(v, v))
        for component in v:
            component /= v_norm
        w = _cross_of(source, v)
        phi = _dot_of(v, target)
        alpha = np.arctan2(_dot_of(w, target), _dot_of(source, target))
    degenerate = (length == 0) | (v_norm == 0)
    for angle in (alpha, phi, theta):
        angle[degenerate] = 0.0
    return alpha, phi, theta


def histogram_columns(alpha: np.ndarray, phi: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Angles -> ``(3, ...)`` histogram columns (0-32): 11 bins of α over [−π, π], of φ and θ over [−1, 1].
    Overwrites the angles."""
    columns = np.empty((3, *alpha.shape), dtype=np.int64)
    np.add(alpha, np.pi, out=alpha)
    alpha *= BINS
    alpha /= 2.0 * np.pi
    for i, angle in enumerate((alpha, phi, theta)):
        if i:
            angle += 1.0
            angle *= BINS
            angle *= 0.5
        np.floor(angle, out=angle)
        np.clip(angle, 0, BINS - 1, out=angle)
        columns[i] = angle
        columns[i] += i * BINS
    return columns


def repeated_sums(max_count: int, max_terms: int, total: float = 100.0) -> np.ndarray:
    """``table[m, c]``: ``total / m`` added ``c`` times one after the other (a histogram bin that ``c`` of a point's
    ``m`` pairs fall in, accumulated as Open3D does)."""
    increment = total / np.maximum(np.arange(max_count + 1), 1).astype(np.float64)
    terms = np.broadcast_to(increment[:, None], (max_count + 1, max_terms))
    return np.concatenate([np.zeros((max_count + 1, 1)), np.cumsum(terms, axis=1)], axis=1)


def spfh(points: np.ndarray, normals: np.ndarray, near: Neighbourhoods, threads: int | None = None) -> np.ndarray:
    """``(N, 33)``: each point's histogram of its pairs with its neighbours after the first, weights summing to
    100 per angle; zeros for a point without neighbours."""
    k = near.index.shape[1]
    table = repeated_sums(k - 1, k - 1)
    valid = near.valid()
    coords, directions = np.ascontiguousarray(points.T), np.ascontiguousarray(normals.T)

    def histograms(rows: slice) -> np.ndarray:  # a few MB of pair temporaries per chunk
        others = near.index[rows, 1:]
        columns = histogram_columns(*pair_features(coords[:, rows, None], directions[:, rows, None],
                                                   coords[:, others], directions[:, others]))
        columns += (np.arange(len(others)) * FPFH_DIM)[:, None]
        unused = len(others) * FPFH_DIM  # the pairs past a point's neighbours count in one extra bin, dropped
        np.copyto(columns, unused, where=~valid[rows, 1:])
        counts = np.bincount(columns.ravel(), minlength=unused + 1)[:unused]
        return table[np.maximum(near.count[rows] - 1, 0)[:, None], counts.reshape(-1, FPFH_DIM)]

    chunks = _over_chunks(histograms, len(points), _PAIR_CHUNK_POINTS, threads)
    return np.concatenate(chunks) if chunks else np.zeros((0, FPFH_DIM))


def _with_sum_slots(own: np.ndarray) -> np.ndarray:
    """``(N, 33)`` SPFH -> ``(36, N)``: per 11-bin block, a zero row (the slot for the block's running sum) then
    the block's bins, so that one reduction adds a neighbour's 11 bins to the running sum in order."""
    slotted = np.zeros((3, BINS + 1, len(own)))
    slotted[:, 1:] = own.T.reshape(3, BINS, len(own))
    return slotted.reshape(3 * (BINS + 1), len(own))


def _fpfh_rows(own: np.ndarray, slotted: np.ndarray, near: Neighbourhoods, rows: slice) -> np.ndarray:
    """``fpfh_features`` of the points at ``rows``: their neighbours' SPFH (``slotted``: ``_with_sum_slots``)
    summed neighbour by neighbour, bin by bin, as Open3D sums (the arrays of a chunk of rows stay in cache through
    all the neighbours; rows of a chunk along the arrays' last axis, so each bin is contiguous)."""
    index, count = near.index[rows].T, near.count[rows]
    dist2 = near.dist2[rows].T
    # a skipped neighbour (outside the radius, or at distance 0) divides by infinity: exactly 0 (SPFH is finite)
    divisors = np.where((np.arange(len(index))[:, None] < count) & (dist2 != 0), dist2, np.inf)
    weighted = np.zeros((len(slotted), len(count)))
    block_sums = np.zeros((3, len(count)))
    values = np.empty_like(weighted)
    blocks = values.reshape(3, BINS + 1, len(count))
    for column in range(1, int(count.max(initial=0))):  # later columns are all skipped: adding zeros
        np.take(slotted, index[column], axis=1, out=values, mode="clip")  # "raise" would buffer the copy
        np.divide(values, divisors[column], out=values)
        weighted += values
        blocks[:, 0] = block_sums  # each block's running sum then takes its 11 bins in order (an outer-axis
        np.add.reduce(blocks, axis=1, out=block_sums)  # reduction adds one slice after the other)
    with np.errstate(divide="ignore"):
        scale = np.where(block_sums != 0, 100.0 / block_sums, 0.0)
    features = weighted.reshape(3, BINS + 1, len(count))[:, 1:] * scale[:, None]
    features = features.reshape(FPFH_DIM, len(count)).T + own[rows]
    features[count <= 1] = 0.0
    return features


def fpfh_features(points: np.ndarray, normals: np.ndarray, near: Neighbourhoods,
                  threads: int | None = None) -> np.ndarray:
    """``(N, 33)`` float64 FPFH: a point's SPFH plus its neighbours' weighted by ``1 / squared distance``, each
    11-bin block of the weighted sum scaled to 100. Row chunks run on ``threads`` threads, with the same bits."""
    own = spfh(points, normals, near, threads)
    slotted = _with_sum_slots(own)
    chunks = _over_chunks(lambda rows: _fpfh_rows(own, slotted, near, rows), len(points), _ROW_CHUNK, threads)
    return np.concatenate(chunks) if chunks else np.zeros((0, FPFH_DIM))


def fpfh_of_points(points: np.ndarray, params: FPFHParams = FPFHParams(), threads: int | None = None) -> np.ndarray:
    """``(N, 3)`` points -> ``(N, 33)`` float64 FPFH, normals estimated first (``m3dm.features.fpfh``), on
    ``threads`` threads (``default_threads()`` when ``None``; the same bits for any count)."""
    points = np.asarray(points, dtype=np.float64)
    # one search serves both: the normals' neighbourhood is a prefix of the larger one (same distance order)
    near = hybrid_search(points, max(params.normal_radius, params.feature_radius),
                         max(params.normal_max_nn, params.feature_max_nn), threads)
    normals = estimate_normals(points, near.narrowed(params.normal_radius, params.normal_max_nn))
    return fpfh_features(points, normals, near.narrowed(params.feature_radius, params.feature_max_nn), threads)


def local_average(maps: np.ndarray, aligned: bool) -> np.ndarray:
    """``(C, H, W)`` -> 3 x 3 means: ``(C, H-2, W-2)`` without padding (the reference), or ``(C, H, W)`` averaged
    over the pixels present at the borders (``aligned``, ``--fix_quirks``)."""
    if aligned:
        padded = np.pad(maps, ((0, 0), (1, 1), (1, 1)))
        present = np.pad(np.ones(maps.shape[1:]), 1)
    else:
        padded, present = maps, np.ones(maps.shape[1:])
    height, width = padded.shape[1] - 2, padded.shape[2] - 2
    total, count = np.zeros((len(maps), height, width)), np.zeros((height, width))
    for r in range(3):
        for c in range(3):
            total += padded[:, r:r + height, c:c + width]
            count += present[r:r + height, c:c + width]
    return total / count


def adaptive_windows(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's adaptive average pooling windows along one axis: ``(starts, ends)``, each ``(size_out,)``."""
    cells = np.arange(size_out)
    return (cells * size_in) // size_out, -((-(cells + 1) * size_in) // size_out)


def pooled_patches(feature_map: np.ndarray, grid: int, aligned: bool) -> np.ndarray:
    """``(C, S, S)`` float64 map -> ``(grid², C)`` float32 patches, row-major (``m3dm.features.fpfh``'s pooling).

    Each window is summed as PyTorch's CPU kernel sums it (row by row, left to right, one running sum, then divided
    by its height and then its width), so the float64 patches are PyTorch's to the bit. No matrix product: BLAS's
    worker threads would spin on a loaded machine for a few million multiply-adds."""
    local = local_average(feature_map, aligned)
    channels, height, width = local.shape
    (top, bottom), (left, right) = adaptive_windows(height, grid), adaptive_windows(width, grid)
    tall, wide = bottom - top, right - left
    flat = np.concatenate([local.reshape(channels, -1), np.zeros((channels, 1))], axis=1)  # last: a zero to add
    total = np.zeros((channels, grid * grid))
    for row in range(int(tall.max())):
        for col in range(int(wide.max())):
            inside = (row < tall)[:, None] & (col < wide)[None, :]
            pixel = (top + row)[:, None] * width + (left + col)[None, :]
            total += np.take(flat, np.where(inside, pixel, height * width).ravel(), axis=1)
    pooled = total / np.repeat(tall, grid).astype(np.float64) / np.tile(wide, grid).astype(np.float64)
    return np.ascontiguousarray(pooled.T, dtype=np.float32)


def fpfh_patches(points: np.ndarray, pixels: np.ndarray, size: int, grid: int, aligned: bool,
                 params: FPFHParams = FPFHParams(), threads: int | None = None) -> np.ndarray:
    """A part's valid ``points (N, 3)`` at flat ``pixels (N,)`` of its ``size`` x ``size`` organized cloud ->
    ``(grid², 33)`` float32 FPFH patches: each point's histogram at its pixel (zeros elsewhere), pooled."""
    feature_map = np.zeros((size * size, FPFH_DIM))
    if len(points):
        feature_map[pixels] = fpfh_of_points(points, params, threads)
    return pooled_patches(feature_map.T.reshape(FPFH_DIM, size, size), grid, aligned)


def fpfh_batch(clouds: np.ndarray, settings: dict, threads: int | None = None) -> np.ndarray:
    """``(B, 3, S, S)`` organized clouds -> ``(B, grid², 33)`` float32 FPFH patches, with the neighbourhoods and
    pooling an exported model's metadata records (``fpfh``: grid, aligned, radii, neighbour caps), each cloud's
    rows on ``threads`` threads (``default_threads()`` when ``None``)."""
    params = FPFHParams(settings["normal_radius"], settings["normal_max_nn"], settings["feature_radius"],
                        settings["feature_max_nn"])
    patches = []
    for cloud in clouds:
        points, pixels = valid_points(cloud)
        patches.append(fpfh_patches(points, pixels, cloud.shape[-1], settings["grid"], settings["aligned"], params,
                                    threads))
    return np.stack(patches)
