"""Exact nearest-neighbour search of test patches in a memory bank, the search strategies, the re-weighted score.

The plain search (:func:`nearest_neighbours`) is ``torch.cdist`` (float32) on blocks of queries; the compute mode
is fixed from the full problem size, so blocks use the same formula as the reference's single call. A search
strategy (:class:`NeighbourSearch`) is fitted on one bank and then searches it: :class:`ExactSearch` (the plain
search), :class:`SharedEmptyRows` (wraps another: the row of empty patches searched once) and
:class:`m3dm.memory.screened.ScreenedSearch` (bfloat16 screening, same results);
:func:`m3dm.memory.defaults.default_search` makes the automatic choice.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

NN_BLOCK_ELEMENTS = 2**25  # distances per test-time block (128 MiB of float32)
CDIST_MM_THRESHOLD = 25  # torch.cdist switches to the matrix-product formula above this many rows
# The CPU float32 BLAS computes a distance bit for bit the same way in every matrix product whose sides both have
# at least this many rows (smaller ones take other kernels; the shapes measured are in benchmarks/README.md), so
# a row's distances do not depend on the block it is searched in (checked by a test).
MIN_GEMM_SIDE = 16


def cdist_mode(n_patches: int, n_bank: int) -> str:
    """The compute mode ``torch.cdist`` picks by default for the full problem (kept for every block)."""
    if n_patches > CDIST_MM_THRESHOLD or n_bank > CDIST_MM_THRESHOLD:
        return "use_mm_for_euclid_dist"
    return "donot_use_mm_for_euclid_dist"


def query_block_rows(n_patches: int, n_bank: int, block_elements: int) -> int:
    """Queries per block: as few blocks as keep each within ``block_elements`` distances, of equal size (so no
    short tail block: the BLAS computes an entry the same way in any block of more than a few rows)."""
    limit = max(1, min(n_patches, block_elements // max(n_bank, 1)))
    blocks = -(-n_patches // limit)
    return max(1, -(-n_patches // blocks))


def nearest_neighbours(patches: torch.Tensor, bank: torch.Tensor, chunk_size: int | None = None,
                       bank_chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance of every patch to its nearest bank row, and that row's index.

    Same result as ``torch.cdist(patches, bank).min(dim=1)`` (first index on ties) without the full matrix:
    blocks of ``chunk_size`` patches × ``bank_chunk_size`` bank rows (by default whole-bank blocks of at most
    2^25 distances; the bank is split only when a single patch row exceeds that). Blocking over patches keeps the
    values bit-identical on the CPU BLAS tested; blocking over the bank may move them by an ulp.
    """
    n_patches, n_bank = patches.shape[0], bank.shape[0]
    if n_bank == 0:
        raise ValueError("nearest_neighbours: the bank is empty")
    if chunk_size is None:
        chunk_size = query_block_rows(n_patches, n_bank, NN_BLOCK_ELEMENTS)
    if bank_chunk_size is None:
        fits = chunk_size * n_bank <= NN_BLOCK_ELEMENTS
        bank_chunk_size = n_bank if fits else max(1, NN_BLOCK_ELEMENTS // chunk_size)
    mode = cdist_mode(n_patches, n_bank)
    min_dist = torch.full((n_patches,), math.inf, dtype=patches.dtype, device=patches.device)
    nn_idx = torch.zeros(n_patches, dtype=torch.long, device=patches.device)
    for p0 in range(0, n_patches, chunk_size):
        best, best_idx = min_dist[p0:p0 + chunk_size], nn_idx[p0:p0 + chunk_size]
        for b0 in range(0, n_bank, bank_chunk_size):
            dist = torch.cdist(patches[p0:p0 + chunk_size], bank[b0:b0 + bank_chunk_size], compute_mode=mode)
            value, index = dist.min(dim=1)
            closer = value < best  # strict: an earlier block keeps ties, as a single argmin would
            best[closer] = value[closer]
            best_idx[closer] = index[closer] + b0
    return min_dist, nn_idx


def reweighted_score(patches: torch.Tensor, bank: torch.Tensor, min_dist: torch.Tensor, nn_idx: torch.Tensor,
                     n_reweight: int = 3, eps: float = 0.0, divisor: float = 1.0) -> float:
    """Image score ``w · s*`` of the reference (docs/original.md: Memory banks), in float32 like the reference.

    ``s*`` is the largest nearest-neighbour distance, ``w = 1 − exp(s*/D) / (Σ_j exp(δ_j/D) + eps)`` with ``δ_j``
    the distances from that patch to the ``n_reweight − 1`` bank rows nearest to its neighbour (the first of the
    ``n_reweight`` found, normally the neighbour itself, is dropped) and ``D = sqrt(dim)``. ``divisor``
    (1000 in DINO+Point_MAE, quirk 29) divides ``s*`` and every ``δ_j`` first, so the result is ``w · s*/divisor``.
    """
    if bank.shape[0] < 2:
        raise ValueError("reweighted_score needs a bank with at least two rows")
    worst = torch.argmax(min_dist)
    s_star = min_dist[worst] / divisor
    m_test = patches[worst].unsqueeze(0)
    m_star = bank[nn_idx[worst]].unsqueeze(0)
    _, knn = torch.topk(torch.cdist(m_star, bank), k=min(n_reweight, bank.shape[0]), largest=False)
    deltas = torch.linalg.norm(m_test - bank[knn[0, 1:]], dim=1) / divisor
    scale = torch.sqrt(torch.tensor(float(patches.shape[1]), dtype=torch.float32, device=patches.device))
    weight = 1 - torch.exp(s_star / scale) / (torch.sum(torch.exp(deltas / scale)) + eps)
    return float(weight * s_star)


class NeighbourSearch(Protocol):
    """Nearest bank row of every query: ``fit`` once on a bank (one strategy object per bank), then ``search``."""

    def fit(self, bank: torch.Tensor) -> NeighbourSearch:
        """Search ``bank`` (float32 ``(rows, dim)``, held by reference) from now on; returns the strategy."""
        ...

    def search(self, queries: torch.Tensor, empty: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min_dist (P,) float32, nn_idx (P,) int64)``, equal to :func:`nearest_neighbours` of the fitted bank.
        ``empty`` (optional, ``(P,)`` bool) flags queries that are all one row (the empty patches)."""
        ...


class ExactSearch:
    """The plain search, :func:`nearest_neighbours`, in blocks of ``block_rows`` queries (None: as few equal
    blocks of at most ``NN_BLOCK_ELEMENTS`` distances as possible)."""

    def __init__(self, block_rows: int | None = None) -> None:
        self.block_rows = block_rows
        self.bank: torch.Tensor | None = None

    def fit(self, bank: torch.Tensor) -> ExactSearch:
        self.bank = bank
        return self

    def search(self, queries: torch.Tensor, empty: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank is None:
            raise RuntimeError("ExactSearch.search before fit")
        return nearest_neighbours(queries, self.bank, chunk_size=self.block_rows)


class SharedEmptyRows:
    """Searches the row that every empty patch is once per bank, and the other queries with ``inner``.

    Empty patches (no point behind them: about 80 % of an xyz sample) all normalise to one constant row, so its
    nearest neighbour is searched once per bank and reused. The values are the same as ``inner`` searching every
    row: whatever the block, the search computes a row's distances with the same float32 arithmetic (blocks of at
    least ``MIN_GEMM_SIDE`` rows on both sides; so ``inner``'s blocks, if it is given a size, must have at least
    that many rows; on CUDA, where cuBLAS picks its kernel by shape, they may differ in the last bit, as the
    blocking itself already makes them). Without ``empty`` flags, or when sharing would not pay, ``inner``
    searches every row.
    """

    def __init__(self, inner: NeighbourSearch) -> None:
        self.inner = inner
        self.bank: torch.Tensor | None = None
        self._empty_neighbour: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def rows_remembered(self) -> int:
        """How many distinct empty rows have been searched on their own (and remembered) since ``fit``."""
        return len(self._empty_neighbour)

    def fit(self, bank: torch.Tensor) -> SharedEmptyRows:
        self.inner.fit(bank)
        self.bank = bank
        self._empty_neighbour.clear()
        return self

    def search(self, queries: torch.Tensor, empty: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank is None:
            raise RuntimeError("SharedEmptyRows.search before fit")
        n_empty = 0 if empty is None else int(empty.sum())
        n_filled = queries.shape[0] - n_empty
        if (empty is None or n_empty < 2 or n_filled < MIN_GEMM_SIDE
                or self.bank.shape[0] <= max(MIN_GEMM_SIDE, CDIST_MM_THRESHOLD)):
            return self.inner.search(queries)
        filled = (~empty).nonzero().squeeze(1)
        min_dist = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
        nn_idx = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
        min_dist[filled], nn_idx[filled] = self.inner.search(queries[filled])
        empty_row = queries[int(empty.nonzero()[0, 0])]
        min_dist[empty], nn_idx[empty] = self._empty_row_neighbour(empty_row)
        return min_dist, nn_idx

    def _empty_row_neighbour(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest bank row of the constant row of empty patches, searched in a block of ``MIN_GEMM_SIDE`` copies
        (so with the arithmetic of any full block) and remembered per value."""
        key = row.cpu().numpy().tobytes()
        if key not in self._empty_neighbour:
            block = row.unsqueeze(0).expand(MIN_GEMM_SIDE, -1).contiguous()
            dist, idx = self.inner.search(block)
            self._empty_neighbour[key] = (dist[0], idx[0])
        return self._empty_neighbour[key]
