"""The search screened in principal directions against the plain float32 search (ExactSearch): same rows, same
distances, bit for bit."""

from __future__ import annotations

import pytest
import torch
from test_screened import clustered, gaussian, near_rows

from m3dm.memory.defaults import default_search
from m3dm.memory.projected import ProjectedBank, ProjectedSearch, principal_directions
from m3dm.memory.screened import ScreeningStats
from m3dm.memory.search import ExactSearch, SharedEmptyRows


def assert_same_as_exact(queries: torch.Tensor, bank: torch.Tensor, projected: ProjectedBank | None = None,
                         **search_args) -> ScreeningStats:
    projected = projected or ProjectedBank(bank)
    distances, indices, stats = projected.search_with_stats(queries, **search_args)
    exact_distances, exact_indices = ExactSearch(search_args.get("chunk_size")).fit(bank).search(queries)
    assert distances.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices, exact_indices)
    assert torch.equal(distances, exact_distances)  # bit for bit: the candidates re-ranked by the same arithmetic
    return stats


def low_rank(rows: int, dim: int, rank: int, seed: int, noise: float = 0.02, offset: float = 1.0) -> torch.Tensor:
    """Rows near a ``rank``-dimensional subspace, off the origin: patch features concentrate in few directions."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=generator)
    return (torch.randn(rows, rank, generator=generator) @ basis / rank ** 0.5
            + noise * torch.randn(rows, dim, generator=generator) + offset)


def copies_and_zero_rows(base: torch.Tensor, zero_rows: int, copies: int, first: int, near: int, seed: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2's case: a bank of ``zero_rows`` zero rows, ``base``, a copy of its first ``copies`` rows and the zero
    rows again; queries: 60 bank rows (``base[first:first + 60]``, distance 0), ``near`` rows close to the copied
    ones, and 20 zero rows (the empty patches). Each query's first index wins."""
    zeros = torch.zeros(zero_rows, base.shape[1])
    bank = torch.cat([zeros, base, base[:copies], zeros])
    queries = torch.cat([base[first:first + 60], near_rows(base[:copies], near, noise=0.01, seed=seed),
                         zeros[:1].expand(20, -1)])
    return queries, bank


def tied_pairs(others: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """40 queries, each equidistant, exactly in float32 (small integers), from a pair of bank rows (rows
    ``others // 2 + i`` and the last 40); ``others`` rows far from both. The first of the pair must win."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randint(-4, 5, (40, 256), generator=generator).float()
    step = torch.zeros(40, 256)
    step[:, 0] = 1
    rest = torch.randint(-4, 5, (others, 256), generator=generator).float() + 20
    half = others // 2
    return queries, torch.cat([rest[:half], queries + step, rest[half:], queries - step])


@pytest.mark.parametrize("dim", [768, 1152])
def test_low_rank_data_gives_the_exact_result_with_few_candidates(dim):
    bank = low_rank(1500, dim, rank=24, seed=dim)
    stats = assert_same_as_exact(near_rows(bank, 150, noise=0.01, seed=dim + 1), bank)
    assert stats.fallback_blocks == 0 and stats.plain_blocks == 0
    assert stats.candidates / stats.screened_queries < 3  # the screen prunes: the nearest row stands out


def test_clustered_data_in_more_directions_than_screened():
    # 80 clusters in 768 dimensions: the 64 directions miss some; the residual norms still prune, and it stays exact
    bank = clustered(1500, 768, clusters=80, spread=0.3, seed=2)
    stats = assert_same_as_exact(near_rows(bank, 100, noise=0.05, seed=3), bank)
    assert stats.plain_blocks == 0


def test_training_rows_as_queries_and_duplicates_resolve_to_the_first_index():
    # pass 2: the queries are training patches, some of them bank rows (distance 0), with exact zero rows (the
    # empty patches) and exact copies in the bank
    queries, bank = copies_and_zero_rows(low_rank(800, 768, rank=16, seed=4), 2, copies=300, first=100, near=100,
                                         seed=5)
    stats = assert_same_as_exact(queries, bank)
    assert stats.plain_blocks == 0
    _, indices = ProjectedBank(bank).search(queries)
    assert torch.equal(indices[:60], torch.arange(100, 160) + 2)  # the row itself, not its later copy
    assert (indices[-20:] == 0).all()


def test_exact_ties_go_to_the_first_row():
    queries, bank = tied_pairs(800, seed=6)
    _, indices = ProjectedBank(bank).search(queries)
    assert torch.equal(indices, torch.arange(40) + 400)
    assert_same_as_exact(queries, bank)


def test_isotropic_data_stays_exact():
    # no directions stand out: the bound prunes little and the plain path scores; still the same result
    bank = gaussian(1000, 768, seed=7)
    assert_same_as_exact(gaussian(64, 768, seed=8), bank)


def test_far_from_the_origin_and_several_blocks():
    # large raw norms make the plain path's own rounding (the margin C2) large: still exact
    bank = low_rank(1000, 768, rank=20, seed=9, offset=300.0)
    queries = near_rows(bank, 250, noise=0.02, seed=10)
    stats = assert_same_as_exact(queries, bank, ProjectedBank(bank, block_elements=100 * 1000))
    assert stats.blocks == 3


def test_few_dimensions_and_non_finite_queries():
    bank = low_rank(500, 32, rank=8, seed=11)  # fewer dimensions than screened: no residual
    assert ProjectedBank(bank).directions.shape == (32, 32)
    queries = near_rows(bank, 60, noise=0.01, seed=12)
    assert_same_as_exact(queries, bank)
    queries[5, 3] = float("inf")  # a block with a non-finite query is not screened: the plain path scores it
    distances, indices, stats = ProjectedBank(bank).search_with_stats(queries)
    assert stats.plain_blocks == 1
    exact = ExactSearch().fit(bank).search(queries)
    finite = torch.arange(60) != 5  # that row's distance: NaN from the plain block, inf from ExactSearch
    assert torch.equal(indices, exact[1]) and torch.equal(distances[finite], exact[0][finite])


def test_principal_directions_are_orthonormal_and_deterministic():
    bank = low_rank(3000, 256, rank=10, seed=13)
    centre, directions = principal_directions(bank, 64)
    gram = directions.T @ directions
    assert directions.dtype == torch.float64 and torch.allclose(gram, torch.eye(64, dtype=torch.float64), atol=1e-14)
    assert torch.equal(directions, principal_directions(bank, 64)[1])
    captured = ((bank.double() - centre) @ directions).square().sum() / (bank.double() - centre).square().sum()
    assert captured > 0.99  # the data's ten directions are among the 64


def test_search_strategy_with_empty_rows_matches_the_exact_one():
    bank = torch.cat([torch.zeros(1, 768), low_rank(1000, 768, rank=16, seed=14)])
    queries = near_rows(bank[1:], 200, noise=0.01, seed=15)
    empty = torch.zeros(200, dtype=torch.bool)
    empty[::3] = True
    queries[empty] = 0  # the empty patches: all one row
    search = default_search("cpu", "projected")
    assert isinstance(search, SharedEmptyRows) and isinstance(search.inner, ProjectedSearch)
    search.fit(bank)
    exact = SharedEmptyRows(ExactSearch()).fit(bank)
    for _ in range(2):  # the bank is prepared once, at the first search
        distances, indices = search.search(queries, empty)
        expected = exact.search(queries, empty)
        assert torch.equal(indices, expected[1]) and torch.equal(distances, expected[0])
    assert search.inner.last_stats is not None and search.inner.last_stats.plain_blocks == 0
    with pytest.raises(RuntimeError, match="before fit"):
        ProjectedSearch().search(queries)
