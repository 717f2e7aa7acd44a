"""Exact nearest-neighbour search that screens the memory bank with a bfloat16 GEMM (CPU speed-up of scoring).

Scoring a sample asks, for each of its P query rows, for the nearest bank row and its Euclidean distance. The
plain path (:func:`m3dm.memory.search.nearest_neighbours`) is a float32 ``torch.cdist`` over the whole bank and is
GEMM-bound. CPUs with native bfloat16 dot products (AVX512-BF16, AMX) run a bfloat16 GEMM about twice as fast, so
:class:`ScreenedBank` runs one bfloat16 GEMM that gives, for every (query, bank row) pair, a rigorous lower bound
on the plain path's squared distance; every row whose lower bound does not exceed an upper bound on the query's
smallest plain-path distance stays a candidate, and the candidates' distances are then computed in float32
exactly as the plain path computes them. The result, indices included, is the plain path's (see
:meth:`ScreenedBank.search` for the one assumption about the BLAS).

Error bound. Notation: ``x`` a query, ``y`` a bank row (float32), ``c`` the bank's column mean, ``xc = fl(x - c)``,
``x~ = bf16(xc)``, ``dx = xc - x~`` (exact in float32), ``u = 2^-24``, ``g_n = n u / (1 - n u)`` (Higham's bound
for a float32 sum or dot product of ``n`` terms in any order), ``D`` the dimension, ``K`` the padded GEMM depth.
``A = sx + sy - 2 x~.y~`` (exact arithmetic, ``sx`` the float32 squared norm of ``xc``) approximates the plain
path's float32 squared distance ``R`` (before its ``clamp``/``sqrt``); through the exact ``E = |x - y|^2``:

1. Centring: ``|xc - (x - c)| <= u'|xc|`` elementwise (``u' = u / (1 - u)``), so
   ``|E - |xc - yc|^2| <= (2u' + u'^2)(|xc| + |yc|)^2``.
2. bfloat16 inputs: ``xc.yc - x~.y~ = x~.dy + dx.y~ + dx.dy``, bounded by Cauchy-Schwarz with the actual residual
   norms, ``|x~||dy| + |dx||y~| + |dx||dy|``, doubled since the distance holds ``-2 x.y``. ``sx`` is a float32
   sum of squares: ``|sx - |xc|^2| <= g_{D+4} |xc|^2``.
3. The plain path, ``cdist``'s ``[-2x, |x|^2, 1].[y, 1, |y|^2]`` in float32: norms ``<= g_D |x|^2``, product
   ``<= g_{D+2} (2|x||y| + (|x|^2 + |y|^2)(1 + g_D))``.
4. The sum ``beta`` of 1-3 bounds ``|A - R|``. Every term is a product of a query factor and a bank factor (norms
   inflated by ``1 + g_{D+2}`` to be upper bounds), so ``beta`` is a dot product of two short vectors, and the
   GEMM computes ``A - B`` with ``B >= beta`` directly: the query row is ``[-2x~, sx, 1, -f(x)]`` and the bank row
   ``[y~, 1, sy, f(y)]`` (squared norms as three bfloat16 pieces, 24 bits; bound factors rounded up to bfloat16).
   ``B`` also covers the GEMM's own error: bfloat16 products are exact in float32 and summed in float32 (oneDNN's
   ``vdpbf16ps``; checked by a test), ``<= g_K (2|x~||y~| + sx + sy + B)``, plus ``2^-126`` per flushed denormal.
   So ``R >= A - beta >= S``, the GEMM's float32 sum, and its bfloat16 output ``L`` gives ``R >= L - e|L|``
   with ``e = 2^-8 / (1 - 2^-8)``.
5. Every factor is multiplied by ``BOUND_SAFETY`` = 1.25, which also covers the float64 evaluation of the norms.

The upper bound: ``U = A + B`` at the row with the smallest ``L``, computed in float64 from the same bfloat16 rows
(exact products), clamped at 0 like the plain path and widened by ``2^-20`` relative, because squared distances
within ``2^-22`` can round to the same float32 ``sqrt`` and so tie in the plain path. Every row with
``L - e|L| <= U`` is a candidate: the row the plain path returns is one of them, and so is every row tying it.

Which path to use is the caller's choice: :func:`bf16_matmul_is_fast` says whether this machine has native
bfloat16 GEMM; elsewhere (and on CUDA, where TF32 or bfloat16 reductions would need their own bounds) the plain
path is the one to use. :class:`ScreenedSearch` is the search strategy (:mod:`m3dm.memory.search`) built on it.

One module past 400 lines on purpose: the error bound above and the code that relies on it (the bank's and the
queries' padded rows, the thresholds) must be read and changed together.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch

from m3dm.memory.search import MIN_GEMM_SIDE, NN_BLOCK_ELEMENTS, cdist_mode, nearest_neighbours, query_block_rows

U_FP32 = 2.0 ** -24  # unit roundoff of float32 (round to nearest)
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
OUTPUT_ROUNDING = U_BF16 / (1 - U_BF16)  # |bf16(s) - s| <= this times |bf16(s)|
NORM_PIECES = 3  # bfloat16 pieces that carry a float32 squared norm through the GEMM (3 x 8 bits >= 24 bits)
BOUND_FACTORS = 6  # columns of the bound's factors (4 products of norms, then each side's own terms)
K_ALIGN = 32  # the padded GEMM depth is rounded up to a multiple of this (zero columns add nothing)
BOUND_SAFETY = 1.25  # multiplies the whole error bound (see the module docstring)
SQRT_TIE_SLACK = 2.0 ** -20  # squared distances this close (relative) can round to the same float32 distance
SMALLEST_NORMAL = 2.0 ** -126  # float32 and bfloat16: below this, vdpbf16ps flushes inputs and results to zero
ABSOLUTE_SLACK = 1e-30  # covers underflow in the bound's own arithmetic
# A block is re-ranked only if that costs at most MAX_RERANK_SHARE of scoring it by the plain path (else the plain
# path scores it, and the rest of the search). Cost of scoring M queries against R rows: (M + PASS_ROWS) R, where
# PASS_ROWS stands for the memory passes over each row (gather, cdist's norms and concatenation), which cost as
# much as a few hundred query rows of float32 GEMM work (measured: benchmarks/README.md).
MAX_RERANK_SHARE = 0.25
PASS_ROWS = 256
MAX_SKIPPED_SEARCHES = 16  # after fallbacks, searches skip the screening for 1, 2, 4, ... up to this many
# Re-ranking: a block whose candidates span more than min(2048, bank/32) rows is re-ranked in groups of queries
# sized so that each group's union is about that large (one float32 GEMM per group, at least 32 queries).
GROUP_UNION_ROWS = 2048
GROUP_UNION_BANK_SHARE = 32
MIN_GROUP_ROWS = 32
# Re-ranking GEMMs keep both sides >= MIN_GEMM_SIDE (m3dm.memory.search), so that the BLAS computes each of their
# entries as in the plain path's GEMM.
PREPARE_ROWS = 8192  # rows converted at a time when preparing a bank or a query block (bounds the temporaries)


def _gamma(terms: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of a float32 sum of ``n`` terms, any order."""
    return terms * U_FP32 / (1 - terms * U_FP32)


@functools.cache
def _cpu_has_native_bf16() -> bool:
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return bool(torch.backends.mkldnn.is_available() and (avx512_bf16 or amx))


def bf16_matmul_is_fast(device: str | torch.device | None = None) -> bool:
    """Whether the screened search pays off on ``device`` (default: the CPU).

    True on a CPU with native bfloat16 dot products (AVX512-BF16 or AMX, through oneDNN), where a bfloat16 GEMM
    runs about twice as fast as float32 (benchmarks/README.md). Without them torch emulates bfloat16, which is no
    faster than float32. On CUDA: True from compute capability 8.0 (Ampere) on, whose tensor cores multiply
    bfloat16 an order of magnitude faster than float32 without TF32. A capability check (cached), not a timing
    probe, so the answer is free and deterministic.
    """
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and _cpu_has_native_bf16()


def _screening_is_rigorous(device: torch.device) -> bool:
    """The bound assumes IEEE float32 products in the plain path and float32 accumulation of bfloat16 products.

    That holds for the CPU at the default ``torch.get_float32_matmul_precision() == "highest"``. On CUDA it needs
    TF32 off and bfloat16 reductions in float32. Otherwise the search falls back to the plain path.
    """
    if torch.get_float32_matmul_precision() != "highest":
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        return not matmul.allow_tf32 and not matmul.allow_bf16_reduced_precision_reduction
    return False


@dataclass
class ScreeningStats:
    """What one :meth:`ScreenedBank.search` did.

    ``candidates``: (query, bank row) pairs kept by the screening of ``screened_queries`` queries;
    ``union_rows``: rows re-ranked per group of queries; ``fallback_blocks``: blocks screened but then scored by
    the plain path (re-ranking too costly); ``plain_blocks``: blocks scored by the plain path (those, too small or
    non-finite blocks, the blocks after a fallback, or a whole search that could not be screened).
    """

    queries: int = 0
    bank_rows: int = 0
    screened_queries: int = 0
    candidates: int = 0
    max_candidates: int = 0
    union_rows: list[int] = field(default_factory=list)
    fallback_blocks: int = 0
    plain_blocks: int = 0
    blocks: int = 0


class ScreenedBank:
    """A fitted memory bank prepared once for exact nearest-neighbour search with bfloat16 screening.

    Holds a reference to the float32 ``bank`` (not a copy) and one bfloat16 row per bank row: the row centred on
    the bank's column mean, rounded, then ``NORM_PIECES`` ones, ``NORM_PIECES`` pieces of its squared norm and
    ``BOUND_FACTORS`` factors of the error bound (see the module docstring). Memory: ``rows x ceil32(dim + 12) x 2``
    bytes, half the float32 bank plus 2-4 % of padding (297 MB for 125,440 x 1152, next to the 578 MB bank).
    Building it reads the bank once in chunks of ``PREPARE_ROWS`` rows (a few tens of MB of temporaries).

    Centring changes no distance but shrinks the norms the error bound grows with.
    """

    def __init__(self, bank: torch.Tensor, block_elements: int = NN_BLOCK_ELEMENTS,
                 max_rerank_share: float = MAX_RERANK_SHARE) -> None:
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"ScreenedBank needs a non-empty (rows, dim) bank, got {tuple(bank.shape)}")
        if bank.dtype != torch.float32:
            raise ValueError(f"ScreenedBank needs a float32 bank, got {bank.dtype}")
        self.bank = bank
        self.dim = bank.shape[1]
        self.block_elements = block_elements
        self.max_rerank_share = max_rerank_share
        self.group_union_rows = max(4 * MIN_GEMM_SIDE, min(GROUP_UNION_ROWS, bank.shape[0] // GROUP_UNION_BANK_SHARE))
        self.finite = self._prepare_screen()
        self._skip_searches, self._backoff = 0, 1  # searches to run plain after fallbacks (data too flat)

    # -- the screen: a subclass may replace these two methods (m3dm.memory.projected) ---------------------------
    def _prepare_screen(self) -> bool:
        """Prepare the bank for screening, once (here its padded bfloat16 rows); whether all of it is finite."""
        self.width = -(-(self.dim + 2 * NORM_PIECES + BOUND_FACTORS) // K_ALIGN) * K_ALIGN
        self.centre = self.bank.mean(dim=0)  # any centre keeps the bound valid; the mean makes it small
        self.padded, finite = self._prepare(self.bank, for_queries=False)
        return finite

    def _screen(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(query, bank row)`` index pairs, sorted by query, among which every query's plain-path nearest row
        and the rows tying it are; None when the block cannot be screened (non-finite queries)."""
        query_rows, finite = self._prepare(block, for_queries=True)
        return self._candidates(query_rows) if finite else None

    # -- preparation (both sides) -----------------------------------------------------------------------------
    def _prepare(self, rows: torch.Tensor, for_queries: bool) -> tuple[torch.Tensor, bool]:
        """The padded bfloat16 rows (see the module docstring, step 4) and whether they are all finite.

        A bank row ``y`` becomes ``[y~, 1, 1, 1, sy1, sy2, sy3, f(y), 0...]`` and a query ``x`` becomes
        ``[-2 x~, sx1, sx2, sx3, 1, 1, 1, -f(x), 0...]``, so that one GEMM gives ``A - B``.
        """
        dim = self.dim
        ones_at = slice(dim + NORM_PIECES, dim + 2 * NORM_PIECES) if for_queries else slice(dim, dim + NORM_PIECES)
        norms_at = slice(dim, dim + NORM_PIECES) if for_queries else slice(dim + NORM_PIECES, dim + 2 * NORM_PIECES)
        factors_at = slice(dim + 2 * NORM_PIECES, dim + 2 * NORM_PIECES + BOUND_FACTORS)
        padded = torch.zeros((rows.shape[0], self.width), dtype=torch.bfloat16, device=rows.device)
        padded[:, ones_at] = 1
        finite = True
        for start in range(0, rows.shape[0], PREPARE_ROWS):
            chunk = rows[start:start + PREPARE_ROWS]
            target = padded[start:start + chunk.shape[0]]
            centred = chunk - self.centre
            rounded = centred.to(torch.bfloat16)
            if for_queries:
                torch.mul(rounded, -2, out=target[:, :dim])  # a power-of-two scaling is exact in bfloat16
            else:
                target[:, :dim] = rounded
            squared = torch.linalg.vector_norm(centred, dim=1).square()  # float32, within g_{D+4} of |xc|^2
            pieces, leftover = _bf16_pieces(squared)
            target[:, norms_at] = pieces
            factors = _round_up_bf16(self._bound_factors(chunk, centred, rounded, pieces, leftover, for_queries))
            finite = finite and bool(torch.isfinite(factors).all())  # NaN, inf or overflow anywhere in the row
            target[:, factors_at] = factors.neg_() if for_queries else factors
        return padded, finite

    def _bound_factors(self, raw: torch.Tensor, centred: torch.Tensor, rounded: torch.Tensor,
                       pieces: torch.Tensor, leftover: torch.Tensor, for_queries: bool) -> torch.Tensor:
        """``(rows, BOUND_FACTORS)`` non-negative float64 factors: ``B = f(x) . f(y)`` bounds the error.

        Query factors: ``|x~|, |dx|, |xc|, |x|, own(x), 1``; bank factors: the matching coefficients
        ``2(|dy| + g_K |y~|), 2(|y~| + |dy|), 2(2u'+u'^2)|yc|, 2 g_{D+2} |y|, 1, own(y)``, all times
        ``BOUND_SAFETY (1 + 2 g_K)`` (the last covers the GEMM's error on ``B`` itself). ``own`` gathers the terms
        of one row alone: norm rounding and leftover, centring, the plain path's norm terms, the GEMM's error on
        the norm pieces, flushed denormals.
        """
        dim, width = self.dim, self.width
        gemm = _gamma(width)
        scale = BOUND_SAFETY * (1 + 2 * gemm)
        rounded_norm = _norm_upper(rounded.to(torch.float32))
        residual_norm = _norm_upper(centred - rounded.to(torch.float32))  # exact residual: the dropped low bits
        centred_norm, raw_norm = _norm_upper(centred), _norm_upper(raw)
        centring = _centring_factor()
        own = scale * (gemm * pieces.to(torch.float64).abs().sum(dim=1)  # the GEMM over the norm pieces
                       + leftover  # what the pieces do not carry
                       + (_gamma(dim + 4) + centring) * centred_norm.square()  # squared norm, centring
                       + _plain_norm_factor(dim) * raw_norm.square()  # the plain path's norm terms
                       + SMALLEST_NORMAL * (4 * width ** 0.5 * rounded_norm + 2 * width)) + ABSOLUTE_SLACK
        ones = torch.ones_like(own)
        if for_queries:
            columns = [rounded_norm, residual_norm, centred_norm, raw_norm, own, ones]
        else:
            columns = [scale * 2 * (residual_norm + gemm * rounded_norm), scale * 2 * (rounded_norm + residual_norm),
                       scale * 2 * centring * centred_norm, scale * 2 * _gamma(dim + 2) * raw_norm, ones, own]
        return torch.stack(columns, dim=1)

    # -- search -----------------------------------------------------------------------------------------------
    def search(self, patches: torch.Tensor, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min_dist (P,) float32, nn_idx (P,) int64)``, equal to ``nearest_neighbours(patches, bank,
        chunk_size)``: same distances bit for bit, same indices (first index on ties).

        The candidates' distances are recomputed with ``torch.cdist`` in the plain path's compute mode on the
        sorted union of their rows. That reproduces the plain path's float32 values as long as the BLAS computes
        an entry the same way whatever the matrix shape, which the CPU BLAS does above a minimum shape
        (``MIN_GEMM_SIDE``, kept by padding; checked by a test). Were it not so, a distance could move by an ulp
        and an exact float32 tie between two different rows could resolve differently.
        """
        return self.search_with_stats(patches, chunk_size)[:2]

    def search_with_stats(self, patches: torch.Tensor, chunk_size: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, ScreeningStats]:
        """:meth:`search`, plus what the screening did (candidates per query, union sizes, fallbacks).

        Once a block falls back to the plain path (re-ranking would cost too much: the data are too flat for the
        bound to prune), the rest of the search takes the plain path directly, so that such data cost about one
        wasted screening GEMM, not one per block. After such a search the next 1, 2, 4, ... (at most
        ``MAX_SKIPPED_SEARCHES``) searches skip the screening; a search that screens successfully resets that.
        """
        n_patches, n_bank = patches.shape[0], self.bank.shape[0]
        stats = ScreeningStats(queries=n_patches, bank_rows=n_bank)
        mode = cdist_mode(n_patches, n_bank)
        if not self._can_screen(patches, mode):
            min_dist, nn_idx = nearest_neighbours(patches, self.bank, chunk_size=chunk_size)
            stats.plain_blocks = stats.blocks = 1
            return min_dist, nn_idx, stats
        if chunk_size is None:
            chunk_size = query_block_rows(n_patches, n_bank, self.block_elements)
        min_dist = torch.empty(n_patches, dtype=torch.float32, device=patches.device)
        nn_idx = torch.empty(n_patches, dtype=torch.long, device=patches.device)
        skip = self._skip_searches > 0
        self._skip_searches = max(0, self._skip_searches - 1)
        for start in range(0, n_patches, chunk_size):
            block = patches[start:start + chunk_size]
            stats.blocks += 1
            screen = not skip and stats.fallback_blocks == 0 and block.shape[0] >= MIN_GEMM_SIDE
            result = self._search_block(block, mode, stats) if screen else None
            value, index = result if result is not None else self._plain_block(block, mode, stats)
            min_dist[start:start + block.shape[0]] = value
            nn_idx[start:start + block.shape[0]] = index
        self._update_backoff(stats, skip)
        return min_dist, nn_idx, stats

    def _update_backoff(self, stats: ScreeningStats, skipped: bool) -> None:
        """Double the number of searches to skip after a fallback; reset it after a screened search."""
        if stats.fallback_blocks:
            self._skip_searches = self._backoff
            self._backoff = min(2 * self._backoff, MAX_SKIPPED_SEARCHES)
        elif not skipped and stats.union_rows:
            self._backoff = 1

    def _can_screen(self, patches: torch.Tensor, mode: str) -> bool:
        if patches.ndim != 2 or patches.shape[1] != self.dim:
            raise ValueError(f"queries {tuple(patches.shape)} do not match the bank's dim {self.dim}")
        if patches.device != self.bank.device:
            raise ValueError(f"queries on {patches.device}, bank on {self.bank.device}")
        # a bank so large that the plain path splits it (one query row > block_elements) is left to the plain path
        fits = self.bank.shape[0] * MIN_GEMM_SIDE <= self.block_elements
        return (patches.dtype == torch.float32 and mode == "use_mm_for_euclid_dist" and self.finite and fits
                and self.bank.shape[0] >= MIN_GEMM_SIDE and patches.shape[0] > 0
                and _screening_is_rigorous(patches.device))

    def _search_block(self, block: torch.Tensor, mode: str, stats: ScreeningStats
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Screen one block of queries against the whole bank and re-rank its candidates in float32; None when
        the block is better scored by the plain path (non-finite queries, or re-ranking too costly)."""
        pairs = self._screen(block)
        if pairs is None:
            return None
        rows, cols = pairs
        counts = torch.bincount(rows, minlength=block.shape[0])
        stats.screened_queries += block.shape[0]
        stats.candidates += rows.numel()
        stats.max_candidates = max(stats.max_candidates, int(counts.max()))
        groups = self._rerank_plan(counts, cols)
        rerank_cost = sum((last - first + PASS_ROWS) * union.numel() for first, last, union in groups)
        if rerank_cost > self.max_rerank_share * (block.shape[0] + PASS_ROWS) * self.bank.shape[0]:
            stats.fallback_blocks += 1
            return None
        value = torch.empty(block.shape[0], dtype=torch.float32, device=block.device)
        index = torch.empty(block.shape[0], dtype=torch.long, device=block.device)
        for first, last, union in groups:
            stats.union_rows.append(union.numel())
            distances = torch.cdist(block[first:last], self.bank.index_select(0, union), compute_mode=mode)
            best, position = distances.min(dim=1)
            value[first:last], index[first:last] = best, union[position]
        return value, index

    def _candidates(self, query_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query, bank row)`` index pairs that may hold a query's plain-path nearest row, sorted by query.

        One bfloat16 GEMM gives the lower bounds ``L`` (module docstring, step 4); the upper bound ``U`` is taken
        at each query's smallest ``L``; the pairs with ``L - e|L| <= U`` are kept.
        """
        lower = query_rows @ self.padded.T  # (queries, bank) bfloat16
        nearest = lower.min(dim=1).indices  # any row gives a valid U; min is 4x faster than argmin on bf16
        upper = self._upper_bound(query_rows, self.padded.index_select(0, nearest))
        # L - e|L| <= U holds for every L < 0 (U >= 0) and means L <= U / (1 - e) for L >= 0
        threshold = _round_up_bf16(upper / (1 - OUTPUT_ROUNDING))
        rows, cols = (lower <= threshold.unsqueeze(1)).nonzero(as_tuple=True)
        return rows, cols

    def _upper_bound(self, query_rows: torch.Tensor, bank_rows: torch.Tensor) -> torch.Tensor:
        """``U = A + B`` for matching query and bank rows, in float64 (the bfloat16 products are exact there),
        clamped at 0 and widened by the sqrt-tie slack."""
        products = query_rows.to(torch.float64) * bank_rows.to(torch.float64)
        split = self.dim + 2 * NORM_PIECES
        approx = products[:, :split].sum(dim=1)
        bound = -products[:, split:split + BOUND_FACTORS].sum(dim=1)  # the query's factors are stored negated
        return (approx + bound).clamp_min(0) * (1 + SQRT_TIE_SLACK) + ABSOLUTE_SLACK

    def _rerank_plan(self, counts: torch.Tensor, cols: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """``(first, last, union)``: query ranges re-ranked together and the bank rows they are re-ranked on.

        The whole block at once when its union is small; otherwise groups of queries sized so that each group's
        union is about ``group_union_rows`` (at least ``MIN_GROUP_ROWS`` queries per group).
        """
        queries, bank_rows = counts.numel(), self.bank.shape[0]
        union = _union(cols, bank_rows)
        if union.numel() <= self.group_union_rows:
            return [(0, queries, union)]
        ends = [0] + torch.cumsum(counts, 0).tolist()  # pairs come sorted by query from nonzero
        size = max(MIN_GROUP_ROWS, queries * self.group_union_rows // union.numel())
        return [(first, last, _union(cols[ends[first]:ends[last]], bank_rows))
                for first, last in _groups(queries, size)]

    def _plain_block(self, block: torch.Tensor, mode: str, stats: ScreeningStats
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain path on one block: the same call, hence the same values, as ``nearest_neighbours``."""
        stats.plain_blocks += 1
        return torch.cdist(block, self.bank, compute_mode=mode).min(dim=1)


class ScreenedSearch:
    """The search strategy (:class:`m3dm.memory.search.NeighbourSearch`) of the bfloat16-screened search: the
    plain search's results, faster where the screening prunes (CPUs with native bfloat16, see
    :func:`bf16_matmul_is_fast`). The bank is prepared (:class:`ScreenedBank`) at the first search after ``fit``;
    ``block_rows`` queries per block (None: as the plain search), ``max_rerank_share`` as in ScreenedBank."""

    prepared_type: type[ScreenedBank] = ScreenedBank  # the bank's preparation, hence its screen

    def __init__(self, block_rows: int | None = None, max_rerank_share: float = MAX_RERANK_SHARE) -> None:
        self.block_rows = block_rows
        self.max_rerank_share = max_rerank_share
        self.bank: torch.Tensor | None = None
        self._prepared: ScreenedBank | None = None
        self.last_stats: ScreeningStats | None = None  # what the last search's screen did

    def fit(self, bank: torch.Tensor) -> ScreenedSearch:
        self.bank, self._prepared = bank, None
        return self

    def search(self, queries: torch.Tensor, empty: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank is None:
            raise RuntimeError("ScreenedSearch.search before fit")
        if self._prepared is None:
            self._prepared = self.prepared_type(self.bank, max_rerank_share=self.max_rerank_share)
        distances, indices, self.last_stats = self._prepared.search_with_stats(queries, chunk_size=self.block_rows)
        return distances, indices


def _union(cols: torch.Tensor, bank_rows: int) -> torch.Tensor:
    """Sorted distinct candidate rows (of tied rows the first comes first), padded with the bank's first rows to
    at least ``MIN_GEMM_SIDE`` rows so that the re-ranking GEMM has the shape class of the plain path's. Extra
    real rows cannot beat the nearest one, which is a candidate. A mask over the bank, not a sort: linear."""
    mask = torch.zeros(bank_rows, dtype=torch.bool, device=cols.device)
    mask[cols] = True
    mask[:MIN_GEMM_SIDE] = True
    return mask.nonzero().squeeze(1)


def _groups(queries: int, size: int) -> list[tuple[int, int]]:
    """``[first, last)`` ranges of ``size`` queries, none shorter than ``MIN_GEMM_SIDE`` (a short tail joins the
    group before it)."""
    bounds = list(range(0, queries, size)) + [queries]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_GEMM_SIDE:
        del bounds[-2]
    return list(itertools.pairwise(bounds))


def _bf16_pieces(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split float32 ``values`` into ``NORM_PIECES`` bfloat16 columns summing to them, and the leftover (float64).

    Each piece takes the bfloat16 rounding of what the previous ones left (each subtraction is exact: it drops
    the leading bits), so three pieces carry all 24 bits and the leftover is zero; it is still measured and
    bounded. A squared norm thus enters the GEMM with float32 accuracy although every GEMM input is bfloat16.
    """
    pieces, rest = [], values
    for _ in range(NORM_PIECES):
        piece = rest.to(torch.bfloat16)
        pieces.append(piece)
        rest = rest - piece.to(torch.float32)
    return torch.stack(pieces, dim=1), rest.to(torch.float64).abs()


def _round_up_bf16(values: torch.Tensor) -> torch.Tensor:
    """bfloat16 values never below the non-negative float64 ``values``: ``(1 + 2^-7)`` outweighs the two
    round-to-nearest steps (to float32, ``2^-24``, and to bfloat16, ``2^-8``)."""
    return (values * (1 + 2 * U_BF16)).to(torch.float32).to(torch.bfloat16)


def _norm_upper(rows: torch.Tensor) -> torch.Tensor:
    """Row norms (float64) that are never below the exact ones.

    torch's float32 norm is within ``g_{D+2}`` of the exact one (a float32 sum of ``D`` squares, then ``sqrt``)
    in any summation order; inflating by that much makes it an upper bound.
    """
    return torch.linalg.vector_norm(rows, dim=1).to(torch.float64) * (1 + _gamma(rows.shape[1] + 2))


def _centring_factor() -> float:
    """``2u' + u'^2``: relative effect of rounding ``x - c`` in float32 on a squared distance (step 1)."""
    u = U_FP32 / (1 - U_FP32)
    return 2 * u + u * u


def _plain_norm_factor(dim: int) -> float:
    """Coefficient of ``|x|^2`` in the plain path's error: its norm sum and the GEMM over it (step 3)."""
    return _gamma(dim + 2) * (1 + _gamma(dim)) + _gamma(dim)
