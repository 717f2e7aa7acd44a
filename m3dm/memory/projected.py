"""Exact nearest-neighbour search that screens the bank in a few principal directions (fewer multiply-adds).

The plain search (:func:`m3dm.memory.search.nearest_neighbours`) computes every (query, bank row) distance in the
full dimension ``D``: ``P x rows x D`` multiply-adds, near the CPU's float32 GEMM peak already. This search
computes, for every pair, a rigorous lower bound on the plain path's squared distance from ``d`` principal
directions of the bank (``d = 64`` of ``D = 1152``): one float32 GEMM of depth ``d + 5``. Only the rows whose
bound does not exceed an upper bound on the query's nearest distance are re-ranked, with the plain path's own
float32 arithmetic, by :class:`m3dm.memory.screened.ScreenedBank` (candidates, re-ranking on their union, the
fallback to the plain path when too many survive, statistics): the same rows and the same distances, bit for bit
(same assumption about the BLAS as there). Opt-in (``--bank_search projected``); it pays where the features
concentrate in few directions, as patch features do, and falls back to the plain path where they do not.

The bound. ``V`` (``D x d``, orthonormal columns, float64) holds the top eigenvectors of the covariance of (a
sample of) the bank rows about their mean ``c``. For a query ``x`` and a bank row ``y``, with ``xc = x - c``,
``a = V^T xc`` and ``rx = |xc - V a|`` (the part outside the ``d`` directions), and ``b``, ``ry`` likewise:

    |x - y|^2 = |a - b|^2 + |(xc - V a) - (yc - V b)|^2 >= |a - b|^2 + (rx - ry)^2 = sx + sy - 2 a.b - 2 rx ry

(Pythagoras, then the reverse triangle inequality; ``sx = |xc|^2 = |a|^2 + rx^2``). The GEMM's query row is
``[-2a, -2rx, -2 C1 |xc|, -2 C2 |x|, sx - C1 sx - C2 |x|^2, 1]`` and its bank row ``[b, ry, |yc|, |y|, 1, sy - C1 sy
- C2 |y|^2]``, so it gives that bound minus the margin ``C1 (|xc| + |yc|)^2 + C2 (|x| + |y|)^2``:

* ``C1`` covers the rounding of the screen: the float64 projection (``ETA`` relative, ``V``'s distance from
  orthonormal checked to be far below it), the float32 rounding of its values (``u = 2^-24``) and the float32 GEMM
  (``g_K``, Higham's bound for ``K`` terms, times the sum of the absolute products, at most ``2(|xc| + |yc|)^2``);
* ``C2`` covers the plain path's own error: ``cdist`` computes ``|x|^2 + |y|^2 - 2 x.y`` in float32, within
  ``g_{D+2} (2|x||y| + (|x|^2 + |y|^2)(1 + g_D)) + g_D (|x|^2 + |y|^2) <= C2 (|x| + |y|)^2`` of the exact value
  (the bfloat16 screen's step 3, :mod:`m3dm.memory.screened`).

Both are multiplied by ``BOUND_SAFETY``. So every GEMM output is at most the plain path's squared distance of its
pair. The upper bound ``U`` of a query is the exact squared distance (float64) to the row with the smallest
bound, plus ``C2 (|x| + |y|)^2``, widened by the square-root tie slack: every row the plain path could return
(or that ties it) has a bound ``<= U`` and is a candidate.
"""

from __future__ import annotations

import torch

from m3dm.memory.screened import (
    ABSOLUTE_SLACK,
    BOUND_SAFETY,
    PREPARE_ROWS,
    SMALLEST_NORMAL,
    SQRT_TIE_SLACK,
    U_FP32,
    ScreenedBank,
    ScreenedSearch,
    _gamma,
    _plain_norm_factor,
)
from m3dm.memory.search import NN_BLOCK_ELEMENTS

PROJECTED_DIMS = 64  # principal directions screened (of 1152 or 768: 5.6-8.3 % of the plain path's MACs)
PCA_ROWS = 4096  # bank rows (evenly spaced) whose covariance gives the directions: any directions keep it exact
SUBSPACE_STEPS = 6  # of the subspace iteration that finds them
U_FP64 = 2.0 ** -53
ETA = 1e-10  # relative error allowed to the float64 projection (measured: about 1e-14; D u64 is 1.3e-13)
EXTRA_COLUMNS = 5  # the residual, the two margin norms, each side's own terms (see the module docstring)
WIDTH_ALIGN = 8
# Re-rank a block whenever that costs less than the plain path by ScreenedBank's cost model (the screen is paid
# by then; at 0.25, the bfloat16 screen's share, the RGB bank of a 20-sample class fell back on most blocks)
PROJECTED_RERANK_SHARE = 1.0


def principal_directions(bank: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centre (D,), V (D, dims))`` in float64: the bank's column mean and an orthonormal basis of (about) its
    top ``dims`` principal directions.

    The bound holds for any orthonormal ``V``; the principal directions only make it tight. So they are found
    cheaply: the covariance of at most ``PCA_ROWS`` evenly spaced rows in float32, a few steps of subspace
    iteration from a fixed random start (deterministic), and a float64 QR factorisation that makes the columns
    orthonormal to float64 rounding (checked by the caller).
    """
    centre = _chunked_mean(bank)
    sample = (bank[::-(-bank.shape[0] // PCA_ROWS)] - centre.to(bank.dtype)).to(torch.float32)
    covariance = sample.T @ sample
    dims = min(dims, bank.shape[1])
    basis = torch.randn(bank.shape[1], dims, generator=torch.Generator().manual_seed(0)).to(covariance.device)
    for _ in range(SUBSPACE_STEPS):
        basis = torch.linalg.qr(covariance @ basis).Q
    return centre, torch.linalg.qr(basis.to(torch.float64)).Q.contiguous()


def _chunked_mean(bank: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(bank.shape[1], dtype=torch.float64, device=bank.device)
    for start in range(0, bank.shape[0], PREPARE_ROWS):
        total += bank[start:start + PREPARE_ROWS].to(torch.float64).sum(dim=0)
    return total / bank.shape[0]


class ProjectedBank(ScreenedBank):
    """A memory bank prepared once for exact search screened in ``dims`` principal directions (module docstring).

    Holds a reference to the float32 ``bank`` and one float32 row of ``ceil8(dims + 5)`` values per bank row (72
    for 64 dims: 6 % of the bank's memory at 1152 dimensions). The search, its candidates' re-ranking, fallback and
    statistics are :class:`ScreenedBank`'s.
    """

    def __init__(self, bank: torch.Tensor, dims: int = PROJECTED_DIMS, block_elements: int = NN_BLOCK_ELEMENTS,
                 max_rerank_share: float = PROJECTED_RERANK_SHARE) -> None:
        self.dims = dims
        super().__init__(bank, block_elements, max_rerank_share)

    def _prepare_screen(self) -> bool:
        self.centre, self.directions = principal_directions(self.bank, self.dims)
        d = self.directions.shape[1]
        self.width = -(-(d + EXTRA_COLUMNS) // WIDTH_ALIGN) * WIDTH_ALIGN
        gemm = _gamma(self.width)
        # C1: the projection's float64 error, the float32 rounding of its values, the GEMM over 2(|xc|+|yc|)^2
        residual_rounding = (4 * (self.dim + d) * U_FP64) ** 0.5  # relative to |xc|, from the square root
        self.screen_factor = BOUND_SAFETY * (8 * (U_FP32 + 2 * ETA) + 4 * U_FP32 + 3 * gemm + 3 * residual_rounding)
        self.plain_factor = BOUND_SAFETY * (1 + 2 * gemm) * _plain_norm_factor(self.dim)  # C2, its GEMM error too
        gram = self.directions.T @ self.directions
        orthonormal = bool((gram - torch.eye(d, dtype=gram.dtype, device=gram.device)).abs().max() < ETA / 100)
        self.padded, finite = self._prepare_rows(self.bank, for_queries=False)
        return finite and orthonormal

    def _prepare_rows(self, rows: torch.Tensor, for_queries: bool) -> tuple[torch.Tensor, bool]:
        """The float32 GEMM rows of ``rows`` (module docstring) and whether they are all finite."""
        d = self.directions.shape[1]
        padded = torch.zeros((rows.shape[0], self.width), dtype=torch.float32, device=rows.device)
        finite = True
        for start in range(0, rows.shape[0], PREPARE_ROWS):
            raw = rows[start:start + PREPARE_ROWS].to(torch.float64)
            centred = raw - self.centre
            projected = centred @ self.directions
            squared = centred.square().sum(dim=1)
            # |xc|^2 - |a|^2 loses to cancellation at most ~D u64 |xc|^2: the residual's error, residual_rounding
            residual = (squared - projected.square().sum(dim=1)).clamp_min(0).sqrt()
            centred_norm = squared.sqrt() * (1 + ETA)  # upper bounds of the norms
            raw_norm = torch.linalg.vector_norm(raw, dim=1) * (1 + ETA)
            own = (centred_norm.square() * (1 - self.screen_factor) - self.plain_factor * raw_norm.square()
                   - 2 * self.width * SMALLEST_NORMAL - ABSOLUTE_SLACK)  # the last two: flushed denormals
            if for_queries:
                columns = [-2 * projected, -2 * residual[:, None], -2 * self.screen_factor * centred_norm[:, None],
                           -2 * self.plain_factor * raw_norm[:, None], own[:, None], torch.ones_like(own)[:, None]]
            else:
                columns = [projected, residual[:, None], centred_norm[:, None], raw_norm[:, None],
                           torch.ones_like(own)[:, None], own[:, None]]
            target = padded[start:start + raw.shape[0]]
            target[:, :d + EXTRA_COLUMNS] = torch.cat(columns, dim=1)
            finite = finite and bool(torch.isfinite(target).all())
        return padded, finite

    def _screen(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        query_rows, finite = self._prepare_rows(block, for_queries=True)
        return self._screen_every_row(block, query_rows) if finite else None

    def _screen_every_row(self, block: torch.Tensor, query_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate ``(query, bank row)`` pairs of ``block`` (its GEMM rows ``query_rows``), from the bound
        of every pair."""
        lower = query_rows @ self.padded.T  # (queries, bank) float32: at most the plain path's squared distances
        nearest = lower.min(dim=1).indices
        upper = self._upper_bound(block, nearest)
        threshold = (upper * (1 + 4 * U_FP32)).to(torch.float32)  # rounding to float32 cannot take it below U
        rows, cols = (lower <= threshold.unsqueeze(1)).nonzero(as_tuple=True)
        return rows, cols

    def _upper_bound(self, block: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per query, an upper bound (float64) on the plain path's squared distance to bank row ``rows[i]``,
        widened so that every row whose float32 distance could tie or beat it stays below it."""
        queries = block.to(torch.float64)
        chosen = self.bank.index_select(0, rows).to(torch.float64)
        exact = (queries - chosen).square().sum(dim=1) * (1 + ETA)
        norms = torch.linalg.vector_norm(queries, dim=1) + torch.linalg.vector_norm(chosen, dim=1)
        plain = exact + self.plain_factor * norms.square() * (1 + ETA)
        return plain * (1 + SQRT_TIE_SLACK) + ABSOLUTE_SLACK


class ProjectedSearch(ScreenedSearch):
    """The search strategy (:class:`m3dm.memory.search.NeighbourSearch`) of the projected screen: the plain
    search's rows and distances, fewer multiply-adds where the bank's rows concentrate in few directions
    (``--bank_search projected``). The bank is prepared (:class:`ProjectedBank`) at the first search after
    ``fit``."""

    prepared_type = ProjectedBank

    def __init__(self, block_rows: int | None = None, max_rerank_share: float = PROJECTED_RERANK_SHARE) -> None:
        super().__init__(block_rows, max_rerank_share)
