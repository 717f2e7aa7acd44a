"""Exact nearest-neighbour search that screens the memory bank with a bfloat16 GEMM (CPU speed-up of scoring).

Scoring a sample asks, for each of its P query rows, for the nearest bank row and its Euclidean distance. The
plain path (:func:`m3dm.memory_bank.nearest_neighbours`) is a float32 ``torch.cdist`` over the whole bank and is
GEMM-bound. CPUs with native bfloat16 dot products (AVX512-BF16, AMX) run a bfloat16 GEMM about twice as fast, so
:class:`ScreenedBank` first computes every squared distance approximately in bfloat16 together with a rigorous
bound on its error (see :func:`ScreenedBank.bound_derivation`), keeps only the rows that may still be the nearest
one, and then recomputes the distances to those rows in float32 exactly as the plain path does. The result, indices
included, is the plain path's (up to the last-ulp caveat in :meth:`ScreenedBank.search`).

Which path to use is the caller's choice: :func:`bf16_matmul_is_fast` says whether this machine has native
bfloat16 GEMM; elsewhere (and on CUDA, where TF32 or bfloat16 reductions would need their own bounds) the plain
path is the one to use.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from m3dm.memory_bank import NN_BLOCK_ELEMENTS, _cdist_mode, nearest_neighbours

U_FP32 = 2.0 ** -24  # unit roundoff of float32 (round to nearest)
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
NORM_PIECES = 3  # bfloat16 pieces that carry a float32 squared norm through the GEMM (3 x 8 bits >= 24 bits)
K_ALIGN = 32  # the padded GEMM depth is rounded up to a multiple of this (zero columns add nothing)
BOUND_SAFETY = 1.25  # multiplies the whole error bound (see bound_derivation)
SQRT_TIE_SLACK = 2.0 ** -20  # squared distances this close (relative) can round to the same float32 distance
ABSOLUTE_SLACK = 1e-30  # covers flushed denormal products and underflow in the bound's own arithmetic
MAX_UNION_FRACTION = 0.25  # above this share of the bank, a query block is scored by the plain float32 path
PREPARE_ROWS = 8192  # bank rows converted at a time when building a ScreenedBank (bounds the temporaries)


def _gamma(terms: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of a float32 sum of ``n`` terms, any order."""
    return terms * U_FP32 / (1 - terms * U_FP32)


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return bool(torch.backends.mkldnn.is_available() and (avx512_bf16 or amx))


def bf16_matmul_is_fast(device: str | torch.device | None = None) -> bool:
    """Whether the screened search pays off on ``device`` (default: the CPU).

    True on a CPU with native bfloat16 dot products (AVX512-BF16 or AMX, through oneDNN), where a bfloat16 GEMM
    runs about 2.3x faster than float32 (measured on an AVX512-BF16 EPYC). Without them torch emulates bfloat16,
    which is no faster than float32. Always False on CUDA: the float32 path stays the default there. A capability
    check (cached), not a timing probe, so the answer is free and deterministic.
    """
    device = torch.device(device if device is not None else "cpu")
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


def _padded_width(dim: int) -> int:
    return -(-(dim + 2 * NORM_PIECES) // K_ALIGN) * K_ALIGN


@dataclass
class _RowTerms:
    """Per-row quantities of one side (queries or bank rows) that the error bound is made of (float64).

    ``rounded``: norm of the bfloat16 row, ``residual``: norm of (centred row - bfloat16 row), ``centred``:
    norm of the centred float32 row, ``raw``: norm of the uncentred row (what the plain path sees), ``own``: the
    terms of the bound that depend on this row alone.
    """

    rounded: torch.Tensor
    residual: torch.Tensor
    centred: torch.Tensor
    raw: torch.Tensor
    own: torch.Tensor

    NAMES = ("rounded", "residual", "centred", "raw", "own")

    def finite(self) -> bool:
        """False when a row holds NaN or inf, or overflows in bfloat16 (its norms are then not finite)."""
        return all(bool(torch.isfinite(getattr(self, name)).all()) for name in self.NAMES)


@dataclass
class ScreeningStats:
    """What one :meth:`ScreenedBank.search` did: candidates per query, union sizes, blocks that fell back."""

    queries: int = 0
    bank_rows: int = 0
    candidates: int = 0
    max_candidates: int = 0
    union_rows: list[int] = field(default_factory=list)
    fallback_blocks: int = 0
    blocks: int = 0

    @property
    def candidates_per_query(self) -> float:
        return self.candidates / max(1, self.queries)

    @property
    def mean_union_fraction(self) -> float:
        if not self.union_rows:
            return 0.0
        return sum(self.union_rows) / (len(self.union_rows) * max(1, self.bank_rows))


class ScreenedBank:
    """A fitted memory bank prepared once for exact nearest-neighbour search with bfloat16 screening.

    Holds a reference to the float32 ``bank`` (not a copy) and, per bank row: the bfloat16 rounding of the row
    centred on the bank's column mean, padded with ``NORM_PIECES`` ones and ``NORM_PIECES`` bfloat16 pieces of the
    row's squared norm (so the GEMM returns squared distances directly), plus five float64 scalars for the bound.
    Memory: ``rows x ceil32(dim + 6) x 2`` bytes for the bfloat16 copy (half the float32 bank and 0.7-3 % of
    padding: 289 MB for 125,440 x 1152, next to the 578 MB bank) and ``rows x 40`` bytes of scalars (5 MB).
    Building it reads the bank once in chunks of ``PREPARE_ROWS`` rows (a few MB of temporaries).

    Centring on the column mean changes no distance but shrinks the norms the error bound grows with.
    """

    def __init__(self, bank: torch.Tensor, block_elements: int = NN_BLOCK_ELEMENTS,
                 max_union_fraction: float = MAX_UNION_FRACTION) -> None:
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"ScreenedBank needs a non-empty (rows, dim) bank, got {tuple(bank.shape)}")
        if bank.dtype != torch.float32:
            raise ValueError(f"ScreenedBank needs a float32 bank, got {bank.dtype}")
        self.bank = bank
        self.block_elements = block_elements
        self.max_union_fraction = max_union_fraction
        self.width = _padded_width(bank.shape[1])
        self.gemm_terms = bank.shape[1] + 2 * NORM_PIECES
        self.centre = bank.mean(dim=0)  # any centre keeps the bound valid; the mean makes it small
        self.padded, self.terms = self._prepare(bank, for_queries=False)
        self.finite = self.terms.finite()
        self.max_terms = {name: getattr(self.terms, name).max() for name in _RowTerms.NAMES}

    # -- preparation (both sides) ---------------------------------------------------------------------------
    def _prepare(self, rows: torch.Tensor, for_queries: bool) -> tuple[torch.Tensor, _RowTerms]:
        """Padded bfloat16 rows and their bound terms, built in chunks of ``PREPARE_ROWS`` rows.

        A bank row ``y`` becomes ``[y~, 1, 1, 1, s1, s2, s3, 0...]`` and a query ``x`` becomes
        ``[-2 x~, s1, s2, s3, 1, 1, 1, 0...]``, where ``~`` is the bfloat16 rounding of the centred row and
        ``s1 + s2 + s3`` its squared norm, so that one GEMM gives ``|x|^2 + |y|^2 - 2 x~.y~``.
        """
        dim = rows.shape[1]
        norms_at = slice(dim, dim + NORM_PIECES) if for_queries else slice(dim + NORM_PIECES, dim + 2 * NORM_PIECES)
        ones_at = slice(dim + NORM_PIECES, dim + 2 * NORM_PIECES) if for_queries else slice(dim, dim + NORM_PIECES)
        padded = torch.zeros((rows.shape[0], self.width), dtype=torch.bfloat16, device=rows.device)
        padded[:, ones_at] = 1
        parts = []
        for start in range(0, rows.shape[0], PREPARE_ROWS):
            chunk = rows[start:start + PREPARE_ROWS]
            centred = chunk - self.centre
            rounded = centred.to(torch.bfloat16)
            target = padded[start:start + chunk.shape[0]]
            # a power-of-two scaling is exact in bfloat16
            torch.mul(rounded, -2, out=target[:, :dim]) if for_queries else target[:, :dim].copy_(rounded)
            residual = centred - rounded.to(torch.float32)  # exact: the low bits each element lost
            terms, pieces = self._row_terms(chunk, centred, rounded, residual)
            target[:, norms_at] = pieces
            parts.append(terms)
        merged = _RowTerms(*(torch.cat([getattr(p, name) for p in parts]) for name in _RowTerms.NAMES))
        return padded, merged

    def _row_terms(self, raw: torch.Tensor, centred: torch.Tensor, rounded: torch.Tensor,
                   residual: torch.Tensor) -> tuple[_RowTerms, torch.Tensor]:
        """The bound's per-row factors (float64 upper bounds) and the bfloat16 pieces of the squared norm.

        ``own`` collects every term of the bound that involves this row alone.
        """
        dim = raw.shape[1]
        centred_norm = _norm_upper(centred)
        raw_norm = _norm_upper(raw)
        squared = torch.linalg.vector_norm(centred, dim=1).square()  # float32, within g_{D+4} of |xc|^2
        pieces, leftover = _bf16_pieces(squared)
        piece_sum = pieces.to(torch.float64).abs().sum(dim=1)
        centred_squared = centred_norm.square()
        own = (_gamma(self.gemm_terms) * piece_sum  # screening GEMM: accumulation over the norm pieces
               + leftover  # what the pieces do not carry
               + _gamma(dim + 4) * centred_squared  # the float32 squared norm that went into the pieces
               + _centring_factor() * centred_squared  # rounding of (row - centre) in float32
               + _plain_norm_factor(dim) * raw_norm.square())  # the plain path's own rounding
        terms = _RowTerms(rounded=_norm_upper(rounded.to(torch.float32)), residual=_norm_upper(residual),
                          centred=centred_norm, raw=raw_norm, own=own)
        return terms, pieces

    # -- the bound ----------------------------------------------------------------------------------------------
    def _pair_bound(self, q: _RowTerms, b: _RowTerms, approx: torch.Tensor) -> torch.Tensor:
        """Bound on |approx - plain float32 squared distance| for matching query/bank terms (float64)."""
        dim = self.bank.shape[1]
        cross = (2 * (q.rounded * b.residual + q.residual * b.rounded + q.residual * b.residual)
                 + 2 * _gamma(self.gemm_terms) * q.rounded * b.rounded
                 + 2 * _centring_factor() * q.centred * b.centred
                 + 2 * _plain_cross_factor(dim) * q.raw * b.raw)
        output_rounding = U_BF16 / (1 - U_BF16) * approx.abs()
        return BOUND_SAFETY * (cross + q.own + b.own + output_rounding) + ABSOLUTE_SLACK

    def _query_bound_without_output(self, q: _RowTerms) -> torch.Tensor:
        """Per query, the largest bound over the bank, leaving out the output-rounding term (float64)."""
        m = self.max_terms
        dim = self.bank.shape[1]
        cross = (2 * (q.rounded * m["residual"] + q.residual * m["rounded"] + q.residual * m["residual"])
                 + 2 * _gamma(self.gemm_terms) * q.rounded * m["rounded"]
                 + 2 * _centring_factor() * q.centred * m["centred"]
                 + 2 * _plain_cross_factor(dim) * q.raw * m["raw"])
        return BOUND_SAFETY * (cross + q.own + m["own"]) + ABSOLUTE_SLACK

    @staticmethod
    def bound_derivation() -> str:
        """How the error bound is derived (also the documentation of :meth:`_pair_bound`).

        Notation: ``x`` a query, ``y`` a bank row (float32), ``c`` the bank's column mean, ``xc = fl(x - c)``,
        ``x~ = bf16(xc)``, ``dx = xc - x~`` (exact in float32), ``u = 2^-24``, ``g_n = n u / (1 - n u)``, ``D``
        the dimension, ``K = D + 6`` the GEMM terms. We bound ``|A - R|``, A the screened value, R the plain
        path's float32 value before ``clamp``/``sqrt``, through the exact ``E = |x - y|^2``:

        1. Centring: ``|xc - (x - c)| <= u'|xc|`` elementwise (``u' = u/(1-u)``), so with ``e`` the total
           perturbation ``|E - |xc - yc|^2| <= (2u' + u'^2)(|xc| + |yc|)^2``.
        2. bfloat16 inputs: ``xc.yc - x~.y~ = x~.dy + dx.y~ + dx.dy``, bounded by Cauchy-Schwarz with the actual
           residual norms, ``|x~||dy| + |dx||y~| + |dx||dy|``, doubled since the distance holds ``-2 x.y``.
        3. The GEMM: bfloat16 products are exact in float32, accumulated in float32 in some order (oneDNN's
           ``vdpbf16ps``): error ``<= g_K (2|x~||y~| + sum of the norm pieces)``. The squared norms enter as three
           bfloat16 pieces whose leftover (float64, exact) is added. torch returns the GEMM in bfloat16 (there is
           no float32-output bfloat16 matmul on the CPU), so the output rounding adds ``2^-8/(1-2^-8) |A|``.
        4. The plain path, ``cdist``'s ``[-2x, |x|^2, 1].[y, 1, |y|^2]`` in float32: norms ``<= g_D |x|^2``,
           product ``<= g_{D+2}(2|x||y| + (|x|^2 + |y|^2)(1 + g_D))``.
        5. The sum of 1-4 is multiplied by ``BOUND_SAFETY`` = 1.25 (covers the float64 evaluation of the bound,
           flushed denormals with ``ABSOLUTE_SLACK``, and any summation model the proof does not anticipate).

        With ``b`` that bound: ``R_min <= U = max(0, min_j A_j + b_j)``, and every row with ``A_j - b_j <= U`` is a
        candidate; the row the plain path returns is one of them, as is every row whose float32 distance ties it
        (``U`` is widened by ``SQRT_TIE_SLACK``: squared distances within ``2^-22`` can share one ``sqrt``).
        """
        return ScreenedBank.bound_derivation.__doc__ or ""

    # -- search ------------------------------------------------------------------------------------------------
    def search(self, patches: torch.Tensor, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min_dist (P,) float32, nn_idx (P,) int64)``: the contract of :func:`nearest_neighbours`.

        The distances of the candidates are recomputed with ``torch.cdist`` in the plain path's compute mode, on
        the sorted union of a block's candidates, so ties go to the first bank index. The float32 values are
        those of the plain path as long as the BLAS computes an entry the same way whatever the matrix shape
        (true of the CPU BLAS tested); if it did not, a distance could move by an ulp and an exact float32 tie
        between two different rows could resolve differently.
        """
        return self.search_with_stats(patches, chunk_size)[:2]

    def search_with_stats(self, patches: torch.Tensor, chunk_size: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, ScreeningStats]:
        """:meth:`search`, plus what the screening did (candidates per query, union sizes, fallbacks)."""
        n_patches, n_bank = patches.shape[0], self.bank.shape[0]
        stats = ScreeningStats(queries=n_patches, bank_rows=n_bank)
        mode = _cdist_mode(n_patches, n_bank)
        if not self._can_screen(patches, mode):
            min_dist, nn_idx = nearest_neighbours(patches, self.bank, chunk_size=chunk_size)
            stats.fallback_blocks = stats.blocks = 1
            return min_dist, nn_idx, stats
        if chunk_size is None:
            chunk_size = max(1, min(n_patches, self.block_elements // n_bank))
        min_dist = torch.empty(n_patches, dtype=torch.float32, device=patches.device)
        nn_idx = torch.empty(n_patches, dtype=torch.long, device=patches.device)
        for start in range(0, n_patches, chunk_size):
            block = patches[start:start + chunk_size]
            value, index = self._search_block(block, mode, stats)
            min_dist[start:start + block.shape[0]] = value
            nn_idx[start:start + block.shape[0]] = index
        return min_dist, nn_idx, stats

    def _can_screen(self, patches: torch.Tensor, mode: str) -> bool:
        if patches.ndim != 2 or patches.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries {tuple(patches.shape)} do not match the bank's dim {self.bank.shape[1]}")
        if patches.device != self.bank.device:
            raise ValueError(f"queries on {patches.device}, bank on {self.bank.device}")
        return (patches.dtype == torch.float32 and mode == "use_mm_for_euclid_dist" and self.finite
                and patches.shape[0] > 0 and _screening_is_rigorous(patches.device))

    def _search_block(self, block: torch.Tensor, mode: str, stats: ScreeningStats
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Screen one block of queries against the whole bank, then re-rank its candidates in float32."""
        stats.blocks += 1
        query_rows, query_terms = self._prepare(block, for_queries=True)
        if not query_terms.finite():
            stats.fallback_blocks += 1
            return torch.cdist(block, self.bank, compute_mode=mode).min(dim=1)
        approx = query_rows @ self.padded.T  # (queries, bank) squared distances, bfloat16
        rows, cols = self._candidates(approx, query_terms)
        stats.candidates += rows.numel()
        stats.max_candidates = max(stats.max_candidates,
                                   int(torch.bincount(rows, minlength=block.shape[0]).max()))
        del approx
        union = torch.unique(cols)  # sorted: the first of tied rows comes first, as in the plain argmin
        stats.union_rows.append(union.numel())
        if union.numel() > self.max_union_fraction * self.bank.shape[0]:
            stats.fallback_blocks += 1
            distances = torch.cdist(block, self.bank, compute_mode=mode)
            return distances.min(dim=1)
        distances = torch.cdist(block, self.bank.index_select(0, union), compute_mode=mode)
        value, position = distances.min(dim=1)
        return value, union[position]

    def _candidates(self, approx: torch.Tensor, q: _RowTerms) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query, bank row)`` index pairs that may hold a query's plain-path nearest row.

        A coarse pass over the whole block uses, per query, the largest bound over the bank; the pairs that pass
        it are refined with their own bound, against an upper bound ``U`` tightened on the way.
        """
        best_value, best_col = approx.min(dim=1)
        all_rows = torch.arange(approx.shape[0], device=approx.device)
        upper = self._upper(best_value, all_rows, best_col, q)
        # coarse: for approx >= 0, approx - b <= U needs approx (1 - 2^-8/(1-2^-8)) <= U + max_j(b without output)
        shrink = 1 - U_BF16 / (1 - U_BF16)
        coarse = (upper + self._query_bound_without_output(q)) / shrink
        coarse_bf16 = (coarse * (1 + 2 * U_BF16)).to(torch.float32).to(torch.bfloat16)  # rounded up, never down
        rows, cols = (approx <= coarse_bf16.unsqueeze(1)).nonzero(as_tuple=True)
        values = approx[rows, cols].to(torch.float64)
        bound = self._pair_bound(_select(q, rows), _select(self.terms, cols), values)
        tighter = torch.full_like(upper, math.inf).scatter_reduce(0, rows, values + bound, reduce="amin")
        upper = torch.minimum(upper, self._widen(tighter))
        keep = values - bound <= upper[rows]
        return rows[keep], cols[keep]

    def _upper(self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, q: _RowTerms) -> torch.Tensor:
        """Per query, an upper bound on the plain path's smallest (clamped) squared distance, from one pair."""
        values = values.to(torch.float64)
        return self._widen(values + self._pair_bound(_select(q, rows), _select(self.terms, cols), values))

    @staticmethod
    def _widen(upper: torch.Tensor) -> torch.Tensor:
        """Clamp at 0 (the plain path clamps) and widen by the sqrt-tie slack."""
        return upper.clamp_min(0) * (1 + SQRT_TIE_SLACK) + ABSOLUTE_SLACK


def screened_nearest_neighbours(patches: torch.Tensor, bank: torch.Tensor | ScreenedBank,
                                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_neighbours` with bfloat16 screening; pass a :class:`ScreenedBank` to prepare it once."""
    screened = bank if isinstance(bank, ScreenedBank) else ScreenedBank(bank)
    return screened.search(patches, chunk_size=chunk_size)


def _select(terms: _RowTerms, index: torch.Tensor) -> _RowTerms:
    return _RowTerms(*(getattr(terms, name)[index] for name in _RowTerms.NAMES))


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
    """Coefficient of ``|x|^2`` in the plain path's error: its norm sum and the GEMM over it (step 4)."""
    return _gamma(dim + 2) * (1 + _gamma(dim)) + _gamma(dim)


def _plain_cross_factor(dim: int) -> float:
    """Coefficient of ``2|x||y|`` in the plain path's error (step 4)."""
    return _gamma(dim + 2)
