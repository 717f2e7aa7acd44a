"""Exact search that bounds whole clusters of bank rows before the projected screen (fewer bank rows read).

:class:`m3dm.memory.projected.ProjectedBank` bounds every (query, bank row) pair from ``d`` principal directions:
one GEMM of depth ``d + 5`` over the whole bank per block of queries, so its cost still grows with the bank, and
pass 2 (every training sample against a bank that grows with the samples) stays quadratic. This search first
bounds clusters of bank rows, and screens only the rows of the clusters that may hold a query's nearest row. The
rows it then re-ranks, hence the result, are the projected screen's: the plain search's rows and distances, bit
for bit.

The bound. In the projected screen's terms (:mod:`m3dm.memory.projected`), the GEMM of a query ``x`` and a bank
row ``y`` sums the products of their stored float32 rows ``[-2a, -2rx, qc, qr, own_x, 1]`` and ``[b, ry, cn_y,
rn_y, 1, own_y]`` (``qc = -2 C1 |xc|``, ``qr = -2 C2 |x|``, both ``<= 0``; ``cn_y``, ``rn_y`` the norms). With
``zx = (a, rx)`` and ``zy = (b, ry)`` (points in ``d + 1`` dimensions, read exactly from the stored values), its
exact sum is

    S(x, y) = |zx - zy|^2 + e_x + e_y + qc cn_y + qr rn_y,    e_x = own_x - |zx|^2,  e_y = own_y - |zy|^2,

and every GEMM output is at most the plain path's squared distance (the projected screen's bound), so ``S`` minus
the GEMM's rounding ``g_K sum|products| <= g_K G`` is too, with ``G = |zx|^2 + |own_x| + |zy|^2 + |own_y| + |qc|
cn_y + |qr| rn_y``. The rows of a cluster ``k`` are partitioned once (k-means on the ``zy``, from a fixed start:
the partition only makes the bound tight, any partition keeps it valid); each cluster keeps a centre ``m`` and a
radius ``rho >= max |zy - m|``, the largest ``cn_y``, ``rn_y`` and ``|zy|^2 + |own_y|`` of its rows, and the
smallest ``e_y``. The triangle inequality, ``|zx - zy| >= |zx - m| - rho``, then gives for every row of the cluster

    plain(x, y) >= max(0, |zx - m| - rho)^2 + e_x + min e_y + qc max cn_y + qr max rn_y - 2.5 g_K max G,

computed in float64 with every quantity rounded the safe way (``ETA`` relative, far above float64's rounding).

Per block of queries: the bound of every (query, cluster) pair (a float64 product of depth ``d + 1`` with the
centres); the rows of each query's best cluster screened by the projected GEMM, whose smallest bound gives the
query's upper bound ``U`` (as the projected screen computes it); then only the clusters whose bound is not above
``U`` have their rows screened, cluster by cluster, and the pairs whose bound is not above ``U`` are the
candidates. A pruned cluster's rows are all above ``U``, as are the rows the projected screen drops: the
candidates hold every row the plain path could return or tie, and the re-ranking
(:class:`m3dm.memory.screened.ScreenedBank`) is the same. Where too many clusters survive (features spread over
many directions) the block is screened row by row, as by the projected screen.
"""

from __future__ import annotations

import torch

from m3dm.memory.projected import ETA, PROJECTED_DIMS, PROJECTED_RERANK_SHARE, ProjectedBank, ProjectedSearch
from m3dm.memory.screened import BOUND_SAFETY, U_FP32, _gamma
from m3dm.memory.search import NN_BLOCK_ELEMENTS

CLUSTER_ROWS = 128  # bank rows per cluster, on average
MIN_CLUSTERS = 16  # a smaller bank is screened row by row
KMEANS_STEPS = 10
KMEANS_ROWS_PER_CLUSTER = 32  # the centres are fitted on at most this many evenly spaced rows per cluster
# A block is screened cluster by cluster only while the rows of its surviving clusters stay below this share of
# the (queries x bank rows) pairs of the row-by-row screen: beyond it, the cluster loop costs more than it saves.
MAX_SURVIVING_SHARE = 0.3
ASSIGN_ROWS = 16384  # rows assigned to their centre at a time (bounds the temporaries)


class ClusteredBank(ProjectedBank):
    """A memory bank prepared once for exact search screened cluster by cluster, then row by row (module
    docstring). On top of :class:`ProjectedBank`'s rows: the GEMM rows again, sorted by cluster (6 % of the bank's
    memory at 1152 dimensions), and a few float64 values per cluster."""

    def __init__(self, bank: torch.Tensor, dims: int = PROJECTED_DIMS, block_elements: int = NN_BLOCK_ELEMENTS,
                 max_rerank_share: float = PROJECTED_RERANK_SHARE, cluster_rows: int = CLUSTER_ROWS) -> None:
        self.cluster_rows = cluster_rows
        self.clustered = False
        self.row_fallbacks = 0  # blocks screened row by row although the bank is clustered
        self.rows_read = 0  # (query, bank row) bounds computed cluster by cluster
        self.queries_screened = 0  # queries screened cluster by cluster
        super().__init__(bank, dims, block_elements, max_rerank_share)

    def _prepare_screen(self) -> bool:
        finite = super()._prepare_screen()
        clusters = self.bank.shape[0] // self.cluster_rows
        if finite and clusters >= MIN_CLUSTERS:
            self._prepare_clusters(clusters)
        return finite

    def _prepare_clusters(self, clusters: int) -> None:
        d = self.directions.shape[1]
        points = self.padded[:, :d + 1]  # zy = (b, ry), float32 as the GEMM reads them
        assignment = _assign(points, _kmeans(points, clusters))
        self.order = torch.argsort(assignment, stable=True)
        sizes = torch.bincount(assignment, minlength=clusters)
        sizes = sizes[sizes > 0]
        self.sizes = sizes
        ends = torch.cumsum(sizes, 0)
        self.spans = list(zip((ends - sizes).tolist(), ends.tolist()))  # each cluster's rows in sorted_rows
        self.sorted_rows = self.padded.index_select(0, self.order)
        member = torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), sizes)
        self._cluster_summaries(self.sorted_rows, member, sizes.numel())
        self.clustered = True

    def _cluster_summaries(self, rows: torch.Tensor, member: torch.Tensor, clusters: int) -> None:
        """Each cluster's centre, radius and the extremes of its rows' terms (module docstring), in float64."""
        d = self.directions.shape[1]
        z = rows[:, :d + 1].to(torch.float64)
        own = rows[:, d + 4].to(torch.float64)
        squared = z.square().sum(dim=1)
        counts = torch.bincount(member, minlength=clusters).to(torch.float64)
        self.centres = z.new_zeros(clusters, d + 1).index_add_(0, member, z) / counts[:, None]
        self.centre_squared = self.centres.square().sum(dim=1)
        spread = torch.linalg.vector_norm(z - self.centres[member], dim=1)  # differences: no cancellation
        self.radius = _segment(spread, member, clusters, "amax") * (1 + ETA)
        self.max_centred_norm = _segment(rows[:, d + 1].to(torch.float64), member, clusters, "amax")
        self.max_raw_norm = _segment(rows[:, d + 2].to(torch.float64), member, clusters, "amax")
        self.max_size = _segment(squared + own.abs(), member, clusters, "amax")
        self.min_own = _segment(own - squared - ETA * (own.abs() + squared), member, clusters, "amin")

    # -- search -----------------------------------------------------------------------------------------------
    def _screen(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        query_rows, finite = self._prepare_rows(block, for_queries=True)
        if not finite:
            return None
        if not self.clustered:
            return self._screen_every_row(block, query_rows)
        bounds, centre_distance = self._cluster_bounds(query_rows)
        # the cluster of the nearest centre most likely holds the nearest row (any row gives a valid U)
        best = centre_distance.argmin(dim=1)
        upper = self._upper_bound(block, self._nearest_in_best_cluster(query_rows, best))
        surviving = bounds <= upper.unsqueeze(1)  # the other clusters' rows are all above U
        rows_read = (surviving.to(torch.float64) @ self.sizes.to(torch.float64)).sum()
        if rows_read > MAX_SURVIVING_SHARE * block.shape[0] * self.bank.shape[0]:
            self.row_fallbacks += 1
            return self._screen_every_row(block, query_rows)
        self.rows_read += int(rows_read)
        self.queries_screened += block.shape[0]
        threshold = (upper * (1 + 4 * U_FP32)).to(torch.float32)  # as the projected screen's
        return self._screen_clusters(query_rows, surviving, threshold)

    def _cluster_bounds(self, query_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(queries, clusters)`` float64 lower bounds of the plain path's squared distance to any row of each
        cluster (module docstring), and lower bounds of the distances ``|zx - m|`` to the centres."""
        d = self.directions.shape[1]
        stored = query_rows.to(torch.float64)
        z = stored[:, :d + 1] * -0.5  # exact: the query's GEMM row holds -2 zx
        centred_factor, raw_factor, own = stored[:, d + 1:d + 2], stored[:, d + 2:d + 3], stored[:, d + 3:d + 4]
        squared = z.square().sum(dim=1, keepdim=True)
        scale = squared + self.centre_squared
        distance = (scale - 2 * z @ self.centres.T - ETA * scale).clamp_min(0).sqrt() * (1 - ETA)
        gap = (distance - self.radius).clamp_min(0)
        size = squared + own.abs() + self.max_size + centred_factor.abs() * self.max_centred_norm \
            + raw_factor.abs() * self.max_raw_norm
        slack = BOUND_SAFETY * 2 * _gamma(self.width) + 4 * ETA
        bounds = (gap.square() * (1 - ETA) + (own - squared) + self.min_own + centred_factor * self.max_centred_norm
                  + raw_factor * self.max_raw_norm - slack * size)
        return bounds, distance

    def _nearest_in_best_cluster(self, query_rows: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        """Per query, the bank row (original index) with the smallest projected bound in cluster ``best[i]``."""
        nearest = torch.empty_like(best)
        order = torch.argsort(best, stable=True)
        clusters, counts = torch.unique_consecutive(best[order], return_counts=True)
        for cluster, queries in zip(clusters.tolist(), torch.split(order, counts.tolist())):
            start, end = self.spans[cluster]
            lower = query_rows.index_select(0, queries) @ self.sorted_rows[start:end].T
            nearest[queries] = self.order[start + lower.min(dim=1).indices]
        return nearest

    def _screen_clusters(self, query_rows: torch.Tensor, surviving: torch.Tensor, threshold: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate pairs from the rows of every surviving (query, cluster) pair, sorted by query."""
        clusters, queries = surviving.T.nonzero(as_tuple=True)  # sorted by cluster
        present, counts = torch.unique_consecutive(clusters, return_counts=True)
        found_queries, found_rows = [], []
        for cluster, members in zip(present.tolist(), torch.split(queries, counts.tolist())):
            start, end = self.spans[cluster]
            lower = query_rows.index_select(0, members) @ self.sorted_rows[start:end].T
            hit_query, hit_row = (lower <= threshold.index_select(0, members).unsqueeze(1)).nonzero(as_tuple=True)
            found_queries.append(members[hit_query])
            found_rows.append(self.order[start + hit_row])
        rows, cols = torch.cat(found_queries), torch.cat(found_rows)
        by_query = torch.argsort(rows, stable=True)
        return rows[by_query], cols[by_query]


def _kmeans(points: torch.Tensor, clusters: int) -> torch.Tensor:
    """``clusters`` centres (float32) of ``points`` by Lloyd's steps from evenly spaced rows (deterministic), on
    at most ``KMEANS_ROWS_PER_CLUSTER`` evenly spaced rows per cluster."""
    step = max(1, points.shape[0] // (clusters * KMEANS_ROWS_PER_CLUSTER))
    sample = points[::step]
    centres = points[torch.linspace(0, points.shape[0] - 1, clusters).long()].clone()
    for _ in range(KMEANS_STEPS):
        assignment = _assign(sample, centres)
        sums = torch.zeros_like(centres).index_add_(0, assignment, sample)
        counts = torch.bincount(assignment, minlength=clusters)
        filled = counts > 0  # an emptied cluster keeps its centre
        centres[filled] = sums[filled] / counts[filled].unsqueeze(1).to(sums.dtype)
    return centres


def _assign(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of each point's nearest centre (float32; ties and rounding only move rows between clusters)."""
    centre_squared = centres.square().sum(dim=1)
    out = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    for start in range(0, points.shape[0], ASSIGN_ROWS):
        chunk = points[start:start + ASSIGN_ROWS]
        out[start:start + chunk.shape[0]] = (centre_squared - 2 * chunk @ centres.T).argmin(dim=1)
    return out


def _segment(values: torch.Tensor, member: torch.Tensor, clusters: int, reduce: str) -> torch.Tensor:
    """Per cluster, the max (``"amax"``) or min (``"amin"``) of ``values`` over its rows."""
    return values.new_zeros(clusters).scatter_reduce_(0, member, values, reduce, include_self=False)


class ClusteredSearch(ProjectedSearch):
    """The search strategy of the cluster-then-row screen (:class:`ClusteredBank`): the plain search's rows and
    distances, with fewer bank rows read per query where the bank's rows cluster (``--bank_search projected``)."""

    prepared_type = ClusteredBank
