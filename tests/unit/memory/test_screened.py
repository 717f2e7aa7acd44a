"""The screened (bfloat16 + float32 re-rank) nearest-neighbour search against the plain float32 search."""

from __future__ import annotations

import pytest
import torch

from m3dm.memory.screened import (
    BOUND_FACTORS,
    NORM_PIECES,
    OUTPUT_ROUNDING,
    ScreenedBank,
    ScreenedSearch,
    ScreeningStats,
    bf16_matmul_is_fast,
)
from m3dm.memory.search import nearest_neighbours


def gaussian(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def clustered(rows: int, dim: int, clusters: int, spread: float, seed: int, offset: float = 1.5) -> torch.Tensor:
    """Tight clusters (``spread`` per element) around centres drawn with unit spread, all shifted by ``offset``
    (features are not centred on the origin)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    members = torch.randint(0, clusters, (rows,), generator=generator)
    return centres[members] + spread * torch.randn(rows, dim, generator=generator) + offset


def near_rows(bank: torch.Tensor, queries: int, noise: float, seed: int) -> torch.Tensor:
    """Queries next to random bank rows, as test patches sit next to training patches."""
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randint(0, bank.shape[0], (queries,), generator=generator)
    return bank[picked] + noise * torch.randn(queries, bank.shape[1], generator=generator)


def assert_same_as_plain(queries: torch.Tensor, bank: torch.Tensor, screened: ScreenedBank | None = None,
                         **search_args) -> ScreeningStats:
    screened = screened or ScreenedBank(bank)
    distances, indices, stats = screened.search_with_stats(queries, **search_args)
    plain_distances, plain_indices = nearest_neighbours(queries, bank, chunk_size=search_args.get("chunk_size"))
    assert distances.dtype == torch.float32 and indices.dtype == torch.int64
    assert distances.shape == indices.shape == (queries.shape[0],)
    torch.testing.assert_close(indices, plain_indices, rtol=0, atol=0)
    torch.testing.assert_close(distances, plain_distances, rtol=1e-6, atol=0)
    return stats


# -- agreement with the plain search --------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [768, 1152, 1920])
def test_gaussian_data_gives_the_plain_result(dim):
    # isotropic data is the hard case for screening (all distances alike): a block may fall back, still exact
    bank, queries = gaussian(3000, dim, seed=dim), gaussian(200, dim, seed=dim + 1)
    assert_same_as_plain(queries, bank)


@pytest.mark.parametrize("dim", [768, 1152, 1920])
def test_clustered_data_gives_the_plain_result_with_few_candidates(dim):
    bank = clustered(4000, dim, clusters=40, spread=0.3, seed=dim)
    stats = assert_same_as_plain(near_rows(bank, 300, noise=0.03, seed=dim), bank)
    assert stats.fallback_blocks == 0 and stats.plain_blocks == 0
    assert stats.candidates / stats.screened_queries < 3  # the screening does prune: the nearest row stands out


def test_duplicated_rows_resolve_to_the_first_index():
    base = clustered(1500, 1152, clusters=20, spread=0.2, seed=1)
    zeros = torch.zeros(3, 1152)  # exact zero rows, as the reference's appended zero row (quirk 28)
    bank = torch.cat([zeros, base, base[:500], base[200:300], zeros])
    queries = torch.cat([near_rows(base[:500], 150, noise=0.02, seed=2), base[250:260], zeros[:2]])
    stats = assert_same_as_plain(queries, bank)
    assert stats.plain_blocks == 0  # screened and re-ranked, not handed to the plain path
    _, indices = ScreenedBank(bank).search(queries)
    assert (indices < 3 + 1500).all()  # never a later copy
    assert (indices[-2:] == 0).all()  # zero queries: distance 0 to the first zero row


def test_near_ties_that_bfloat16_alone_ranks_wrongly():
    generator = torch.Generator().manual_seed(3)
    dim, pairs = 1152, 64
    # y1 is exactly representable in bfloat16; y2 = y1 + delta with |delta| a quarter of a bfloat16 ulp, so
    # both round to y1 in bfloat16: bfloat16 cannot tell them apart, float32 can
    y1 = torch.randn(pairs, dim, generator=generator).bfloat16().float()
    ulp = torch.finfo(torch.bfloat16).eps * y1.abs()
    sign = torch.randint(0, 2, (pairs, dim), generator=generator) * 2 - 1
    y2 = y1 + 0.25 * ulp * sign
    assert torch.equal(y2.bfloat16(), y1.bfloat16())
    others = torch.randn(2000, dim, generator=generator)
    bank = torch.cat([y1, others, y2])  # y1 first: a tie goes to it
    # each query is y2 plus noise much smaller than |delta|, so y2 is the nearest row by a clear margin
    queries = y2 + 1e-4 * torch.randn(pairs, dim, generator=generator)
    truth = torch.arange(pairs) + pairs + 2000

    bf16_distances = torch.cdist(queries.bfloat16().double(), bank.bfloat16().double())
    assert (bf16_distances.argmin(dim=1) == torch.arange(pairs)).all()  # plain bfloat16 picks y1: wrong

    _, indices, stats = ScreenedBank(bank).search_with_stats(queries)
    assert stats.plain_blocks == 0 and torch.equal(indices, truth)
    assert_same_as_plain(queries, bank)


def test_bank_smaller_than_a_block():
    bank = clustered(300, 1152, clusters=10, spread=0.1, seed=4)
    queries = near_rows(bank, 500, noise=0.05, seed=5)
    stats = assert_same_as_plain(queries, bank)
    assert stats.blocks == 1  # the queries cover the whole bank: re-ranking does not pay, the plain path scores
    forced = assert_same_as_plain(queries, bank, ScreenedBank(bank, max_rerank_share=1e9))
    assert forced.plain_blocks == 0 and forced.union_rows


def test_several_query_blocks():
    bank = clustered(2000, 768, clusters=30, spread=0.3, seed=6)
    queries = near_rows(bank, 450, noise=0.03, seed=7)
    stats = assert_same_as_plain(queries, bank, ScreenedBank(bank, block_elements=100 * 2000))
    assert stats.blocks == 5 and stats.plain_blocks == 0  # 450 queries in blocks of 100
    assert len(stats.union_rows) > stats.blocks  # unions above 2000/32 rows: re-ranked in groups of queries
    stats = assert_same_as_plain(queries, bank, chunk_size=64)
    assert stats.blocks == 8 and stats.plain_blocks == 1  # the last block has 2 queries: too few to screen


def test_costly_reranking_falls_back_to_the_plain_path_exactly():
    # Rows far from the origin that differ by far less than float32 resolves at that magnitude: the plain
    # path's own rounding dominates, every row stays a candidate, and the plain path scores the block; the
    # blocks after it skip the screening
    generator = torch.Generator().manual_seed(8)
    bank = 1000 + 1e-3 * torch.randn(400, 1152, generator=generator)
    queries = 1000 + 1e-3 * torch.randn(60, 1152, generator=generator)
    stats = assert_same_as_plain(queries, bank, ScreenedBank(bank, block_elements=20 * 400))
    assert stats.blocks == 3 and stats.fallback_blocks == 1 and stats.plain_blocks == 3
    assert stats.candidates == 20 * 400  # the one screened block kept every row of the bank


def test_searches_after_a_fallback_back_off_from_screening():
    generator = torch.Generator().manual_seed(8)
    flat = ScreenedBank(1000 + 1e-3 * torch.randn(400, 1152, generator=generator))
    queries = 1000 + 1e-3 * torch.randn(40, 1152, generator=generator)
    screened = []
    for _ in range(8):
        _, _, stats = flat.search_with_stats(queries)
        screened.append(stats.candidates > 0)
    # fallback, skip 1, fallback, skip 2, fallback, skip 4 (the first two of them shown)
    assert screened == [True, False, True, False, False, True, False, False]


def test_rerank_share_decides_between_reranking_and_the_plain_path():
    bank = clustered(2000, 768, clusters=20, spread=0.3, seed=18)
    queries = near_rows(bank, 200, noise=0.03, seed=19)
    never = assert_same_as_plain(queries, bank, ScreenedBank(bank, max_rerank_share=0.0))
    assert never.fallback_blocks == 1 and never.plain_blocks == 1 and never.union_rows == []
    always = assert_same_as_plain(queries, bank, ScreenedBank(bank, max_rerank_share=1e9))
    assert always.fallback_blocks == 0 and always.plain_blocks == 0 and always.union_rows


def test_screened_search_strategy_gives_the_plain_result():
    bank = clustered(1500, 768, clusters=12, spread=0.2, seed=20)
    queries = near_rows(bank, 120, noise=0.05, seed=21)
    for block_rows in (None, 32):
        search = ScreenedSearch(block_rows).fit(bank)
        for _ in range(2):  # prepared once, at the first search
            distances, indices = search.search(queries, empty=torch.zeros(120, dtype=torch.bool))
            plain = nearest_neighbours(queries, bank, chunk_size=block_rows)
            assert torch.equal(indices, plain[1]) and torch.equal(distances, plain[0])
    with pytest.raises(RuntimeError, match="before fit"):
        ScreenedSearch().search(queries)


def test_tiny_problems_use_the_plain_path():
    bank = gaussian(20, 64, seed=11)  # <= 25 rows on both sides: cdist's direct mode, not the GEMM one
    queries = gaussian(10, 64, seed=12)
    distances, indices, stats = ScreenedBank(bank).search_with_stats(queries)
    plain = nearest_neighbours(queries, bank)
    assert stats.plain_blocks == 1 and torch.equal(indices, plain[1]) and torch.equal(distances, plain[0])


# -- the error bound and its assumptions --------------------------------------------------------------------

def test_float32_distances_do_not_depend_on_the_gemm_shape_above_the_minimum():
    # the re-ranking reproduces the plain path's float32 values bit for bit only if the BLAS computes an entry
    # the same way in a (queries x union) GEMM as in the (block x bank) one; this holds with both sides >= 16
    generator = torch.Generator().manual_seed(14)
    bank = clustered(3000, 1152, clusters=30, spread=0.3, seed=14)
    queries = near_rows(bank, 300, noise=0.03, seed=15)
    full = torch.cdist(queries, bank, compute_mode="use_mm_for_euclid_dist")
    for rows, cols in [(16, 16), (17, 40), (32, 300), (300, 16), (100, 2000)]:
        first = int(torch.randint(0, 300 - rows + 1, (1,), generator=generator))
        picked = torch.randperm(3000, generator=generator)[:cols].sort().values
        part = torch.cdist(queries[first:first + rows], bank[picked], compute_mode="use_mm_for_euclid_dist")
        assert torch.equal(part, full[first:first + rows][:, picked]), (rows, cols)


def test_bfloat16_matmul_accumulates_in_float32_and_returns_bfloat16():
    # 1 + 1024 terms of 2^-9: a float32 accumulator gives 3, a bfloat16 one would stay at 1
    left = torch.cat([torch.ones(1, 1), torch.full((1, 1024), 2.0 ** -9)], dim=1).bfloat16()
    product = left @ torch.ones(1025, 1).bfloat16()
    assert product.dtype == torch.bfloat16
    assert product.item() == 3.0


def plain_squared_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The plain path's float32 squared distances before clamp and sqrt: torch.cdist's matrix-product formula."""
    def padded(rows, norms_last):
        norms, ones = rows.pow(2).sum(-1, keepdim=True), torch.ones(rows.shape[0], 1)
        return torch.cat([rows, ones, norms] if norms_last else [rows.mul(-2), norms, ones], dim=-1)
    return padded(queries, False) @ padded(bank, True).T


def check_bounds(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Assert ``L - e|L| <= R <= A + B`` for every pair; return ``|A - R| / B`` (how much of the bound is used)."""
    screened = ScreenedBank(bank)
    query_rows, finite = screened._prepare(queries, for_queries=True)
    assert finite
    lower = (query_rows @ screened.padded.T).double()
    split = screened.dim + 2 * NORM_PIECES
    factors = slice(split, split + BOUND_FACTORS)
    approx = query_rows[:, :split].double() @ screened.padded[:, :split].double().T
    bound = -query_rows[:, factors].double() @ screened.padded[:, factors].double().T
    plain = plain_squared_distances(queries, bank).double()
    assert (lower - OUTPUT_ROUNDING * lower.abs() <= plain).all()
    assert (plain <= approx + bound).all()
    return (approx - plain).abs() / bound


def test_bound_covers_the_screening_error_with_adversarial_rounding():
    generator = torch.Generator().manual_seed(13)
    # every element 7/16 of a bfloat16 ulp above a bfloat16 value: rounding errors all of one sign, so the
    # residual dot products add up coherently, the worst case of the Cauchy-Schwarz step
    magnitudes = (torch.rand(200, 1152, generator=generator) * 2.5 + 0.5).bfloat16().float()
    ulp = torch.ldexp(torch.ones_like(magnitudes), torch.frexp(magnitudes).exponent - 8)
    rows = magnitudes + 0.4375 * ulp
    bank = torch.cat([rows[:75], -rows[:75]])  # column means exactly 0: centring keeps the rounding pattern
    assert not ScreenedBank(bank).centre.any()
    assert check_bounds(rows[150:], bank).max() > 0.5  # not vacuous: the error reaches a good part of it


def test_bound_covers_the_screening_error_at_the_full_block_shape():
    # 267 queries x 4096 rows, the GEMM shape class of a real block (oneDNN picks kernels by shape), on
    # features far from the origin (large cancellation between the norms and the dot product)
    bank = clustered(4096, 1152, clusters=64, spread=0.3, seed=16, offset=3.0)
    check_bounds(near_rows(bank, 267, noise=0.05, seed=17), bank)


def test_bf16_matmul_is_fast_is_a_capability_check():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert bf16_matmul_is_fast() == (native and torch.backends.mkldnn.is_available())
    assert bf16_matmul_is_fast("cpu") == bf16_matmul_is_fast()
    ampere = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    assert bf16_matmul_is_fast("cuda") == ampere
