"""The search that bounds clusters of bank rows before the projected screen, against the plain float32 search
(ExactSearch): same rows, same distances, bit for bit, on data where the clusters prune and where they cannot."""

from __future__ import annotations

import torch
from test_projected import assert_same_as_exact, copies_and_zero_rows, low_rank, tied_pairs
from test_screened import clustered, gaussian, near_rows, plain_squared_distances

from m3dm.memory.clustered import ClusteredBank, ClusteredSearch
from m3dm.memory.defaults import default_search
from m3dm.memory.search import ExactSearch, SharedEmptyRows

ROWS_PER_CLUSTER = 32  # small clusters, so that banks of a few thousand rows are clustered


def clustered_bank(bank: torch.Tensor, **args) -> ClusteredBank:
    prepared = ClusteredBank(bank, cluster_rows=ROWS_PER_CLUSTER, **args)
    assert prepared.clustered
    return prepared


def test_low_rank_data_reads_few_rows_and_gives_the_exact_result():
    bank = low_rank(1500, 512, rank=4, seed=21)
    prepared = clustered_bank(bank)
    queries = near_rows(bank, 100, noise=0.01, seed=22)
    stats = assert_same_as_exact(queries, bank, prepared)
    assert prepared.row_fallbacks == 0 and stats.plain_blocks == 0
    assert prepared.rows_read < 0.3 * queries.shape[0] * bank.shape[0]  # whole clusters skipped


def test_clusters_in_many_directions_stay_exact():
    bank = clustered(1200, 768, clusters=40, spread=0.3, seed=23)
    assert_same_as_exact(near_rows(bank, 100, noise=0.05, seed=24), bank, clustered_bank(bank))


def test_uniform_high_dimensional_data_falls_back_and_stays_exact():
    # no structure at all: the cluster bound prunes nothing, the block is screened row by row (or scored plainly)
    bank = torch.rand(1000, 512, generator=torch.Generator().manual_seed(25))
    queries = torch.rand(64, 512, generator=torch.Generator().manual_seed(26))
    prepared = clustered_bank(bank)
    stats = assert_same_as_exact(queries, bank, prepared)
    assert prepared.row_fallbacks + stats.plain_blocks > 0
    assert_same_as_exact(gaussian(64, 512, seed=27), gaussian(1000, 512, seed=28))


def test_training_rows_zero_rows_and_copies_resolve_to_the_first_index():
    # pass 2: queries that are bank rows (distance 0), empty patches (exact zero rows), and copies in the bank
    queries, bank = copies_and_zero_rows(low_rank(800, 256, rank=6, seed=29), 3, copies=500, first=200, near=80,
                                         seed=30)
    prepared = clustered_bank(bank)
    assert_same_as_exact(queries, bank, prepared)
    _, indices = prepared.search(queries)
    assert torch.equal(indices[:60], torch.arange(200, 260) + 3)  # the row itself, not its later copy
    assert (indices[-20:] == 0).all()


def test_exact_ties_go_to_the_first_row():
    queries, bank = tied_pairs(1000, seed=31)
    prepared = clustered_bank(bank)
    _, indices = prepared.search(queries)
    assert torch.equal(indices, torch.arange(40) + 500)
    assert_same_as_exact(queries, bank, prepared)


def test_far_from_the_origin_and_several_blocks():
    bank = low_rank(1200, 512, rank=8, seed=32, offset=300.0)
    queries = near_rows(bank, 150, noise=0.02, seed=33)
    stats = assert_same_as_exact(queries, bank, clustered_bank(bank, block_elements=60 * 1200))
    assert stats.blocks == 3


def test_cluster_bound_is_below_every_rows_distance_and_screen_bound():
    # the bound of a (query, cluster) pair against the plain path's float32 squared distance and the projected
    # screen's GEMM output of every row of the cluster, on data far from the origin (large norms, cancellation)
    bank = low_rank(1200, 512, rank=8, seed=34, offset=5.0)
    queries = torch.cat([near_rows(bank, 60, noise=0.01, seed=35), bank[:20], torch.zeros(2, 512)])
    prepared = clustered_bank(bank)
    query_rows, finite = prepared._prepare_rows(queries, for_queries=True)
    assert finite
    bounds = prepared._cluster_bounds(query_rows)[0]
    member = torch.repeat_interleave(torch.arange(prepared.sizes.numel()), prepared.sizes)
    in_order = prepared.order
    plain = plain_squared_distances(queries, bank)[:, in_order].double()
    screen = (query_rows @ prepared.padded.T)[:, in_order].double()
    for rows in (plain, screen):
        lowest = torch.full_like(bounds, float("inf")).scatter_reduce(1, member.expand_as(rows), rows, "amin")
        assert (bounds <= lowest).all()
    assert (bounds > 0).float().mean() > 0.5  # not vacuous: most clusters have a positive bound


def test_small_banks_are_screened_row_by_row():
    bank = low_rank(300, 256, rank=4, seed=36)
    prepared = ClusteredBank(bank)  # 300 rows: fewer than 16 clusters of 128
    assert not prepared.clustered
    assert_same_as_exact(near_rows(bank, 50, noise=0.01, seed=37), bank, prepared)


def test_projected_search_strategy_is_clustered_and_exact_with_empty_rows():
    bank = torch.cat([torch.zeros(1, 768), low_rank(2500, 768, rank=6, seed=38)])
    queries = near_rows(bank[1:], 200, noise=0.01, seed=39)
    empty = torch.zeros(200, dtype=torch.bool)
    empty[::3] = True
    queries[empty] = 0  # the empty patches: all one row
    search = default_search("cpu", "projected")
    assert isinstance(search, SharedEmptyRows) and isinstance(search.inner, ClusteredSearch)
    search.fit(bank)
    exact = SharedEmptyRows(ExactSearch()).fit(bank)
    distances, indices = search.search(queries, empty)
    expected = exact.search(queries, empty)
    assert torch.equal(indices, expected[1]) and torch.equal(distances, expected[0])
