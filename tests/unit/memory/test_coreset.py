"""The coreset strategies against a straightforward NumPy greedy k-center loop, and against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from memory_oracles import clustered, default_indices, numpy_coreset, to_half_like_torch
from sklearn.random_projection import SparseRandomProjection

import m3dm.memory.coreset as coreset_module
from m3dm.memory.coreset import (
    DropCopies,
    GreedyCoreset,
    PlainGreedy,
    PrunedGreedy,
    ShardedGreedy,
    ShardPairwise,
    first_occurrences,
)
from m3dm.memory.defaults import default_coreset
from m3dm.runtime import cpu_threads


def test_half_conversion_goes_through_float32():
    rng = np.random.default_rng(0)
    values = rng.normal(0, 5, 100_000)
    lower = values.astype(np.float16).astype(np.float64)
    upper = np.nextafter(values.astype(np.float16), np.float16(np.inf)).astype(np.float64)
    near_midpoints = (lower + upper) / 2 * (1 + 1e-12)
    probe = np.concatenate([values, near_midpoints])
    np.testing.assert_array_equal(torch.from_numpy(probe).half().numpy(), to_half_like_torch(probe))


# -- the automatic choice --------------------------------------------------------------------------------------

def test_default_coreset_is_todays_automatic_choice():
    cpu = torch.device("cpu")
    assert default_coreset("cpu") == GreedyCoreset(DropCopies(PrunedGreedy()), cpu, fp16=True)
    assert default_coreset("cpu", fp16=False) == GreedyCoreset(DropCopies(PlainGreedy()), cpu, fp16=False)
    assert default_coreset("cpu", shards=4).selection == ShardedGreedy(DropCopies(PrunedGreedy()), 4)
    assert default_coreset("meta").selection == DropCopies(PlainGreedy())  # any other device: the plain loop
    with pytest.raises(ValueError, match="CPU float16"):
        GreedyCoreset(PrunedGreedy(), "cpu", fp16=False).select(clustered(0), 10, random_state=0, progress=False)
    with pytest.raises(ValueError):
        PlainGreedy(block_rows=0)


# -- the reference's selection ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("seed,duplicates,n", [(0, 0, 60), (1, 25, 80), (2, 0, 1)])
def test_coreset_equals_numpy_greedy_k_center(fp16, seed, duplicates, n):
    x = clustered(seed, duplicates=duplicates)
    expected = numpy_coreset(x, n, seed, fp16)
    got = default_indices(torch.from_numpy(x), n, random_state=seed, fp16=fp16)
    assert got.dtype == torch.long
    assert got.tolist() == expected
    plain = GreedyCoreset(PlainGreedy(), "cpu", fp16).select(x, n, random_state=seed, progress=False)
    assert plain.tolist() == expected  # the reference's loop on every row, no copy dropping, no pruning


def projected_ties(seed: int, rows: int = 600, dim: int = 256) -> np.ndarray:
    """Rows whose projections lie on a sphere (radius 10 ± 1e-4) around row 0's, far from the origin.

    The float16 rounding of the projected coordinates (~80 each) moves the distances by far more than their
    spread, so the float16 distance to row 0 and the rounded exact one disagree for most rows."""
    projector = SparseRandomProjection(eps=0.9, random_state=seed).fit(np.zeros((rows, dim)))
    components = projector.components_.toarray()
    rng = np.random.default_rng(seed)
    directions = rng.normal(0, 1, (rows, components.shape[0]))
    radii = 10 * (1 + rng.uniform(-1e-4, 1e-4, (rows, 1)))
    targets = directions / np.linalg.norm(directions, axis=1, keepdims=True) * radii
    targets[0] = 0
    targets += rng.normal(0, 1, components.shape[0]) * 1000 / np.sqrt(components.shape[0])
    return (targets @ np.linalg.pinv(components).T).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coreset_float16_ties_follow_the_reference(seed):
    # ties in float16 make the selection depend on every rounding step, including the reference's redundant
    # first iteration (the minimum of the rounded exact and the float16 distance to row 0)
    x = projected_ties(seed)
    got = default_indices(torch.from_numpy(x), 40, random_state=seed)
    assert got.tolist() == numpy_coreset(x, 40, seed, fp16=True)


def test_coreset_block_size_does_not_change_the_selection():
    x = torch.from_numpy(clustered(4))
    whole = default_indices(x, 20, random_state=3)  # 20 steps: blocks of one row take one operation per row each
    for block_rows in (None, 1, 37, 599):
        for selection in (PlainGreedy(block_rows), DropCopies(PlainGreedy(block_rows))):
            coreset = GreedyCoreset(selection, "cpu")
            assert torch.equal(coreset.select(x, 20, random_state=3, progress=False), whole)


def test_coreset_is_a_k_center_sequence():
    x = clustered(5, duplicates=10)
    selected = default_indices(torch.from_numpy(x), 70, random_state=11, fp16=False)
    proj = SparseRandomProjection(eps=0.9, random_state=11).fit_transform(x.astype(np.float64))
    chosen = selected.tolist()
    assert chosen[0] == 0 and len(set(chosen)) == len(chosen)
    min_dist = np.linalg.norm(proj - proj[0], axis=1)
    for index in chosen[1:]:
        assert min_dist[index] == pytest.approx(min_dist.max(), rel=1e-12)  # farthest from those chosen so far
        assert index == int(np.flatnonzero(min_dist >= min_dist.max() * (1 - 1e-12))[0])  # first on ties
        min_dist = np.minimum(min_dist, np.linalg.norm(proj - proj[index], axis=1))


def test_coreset_fp16_selection_is_a_near_k_center_sequence():
    x = clustered(6)
    chosen = default_indices(x, 40, random_state=0).tolist()
    proj = SparseRandomProjection(eps=0.9, random_state=0).fit_transform(x.astype(np.float64))
    min_dist = np.linalg.norm(proj - proj[0], axis=1)
    for index in chosen[1:]:
        assert min_dist[index] >= min_dist.max() * (1 - 2e-3)  # float16 keeps ~3 decimal digits
        min_dist = np.minimum(min_dist, np.linalg.norm(proj - proj[index], axis=1))


def test_coreset_seeds():
    x = torch.from_numpy(clustered(7))
    run = lambda seed: default_indices(x, 40, random_state=seed)
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    np.random.seed(0)
    first = default_indices(x, 40)
    np.random.seed(0)
    assert torch.equal(default_indices(x, 40), first)
    assert torch.equal(first, run(np.random.RandomState(0)))


def test_coreset_without_projection_still_a_k_center_sequence():
    x = clustered(8, rows=300, dim=32)
    chosen = default_indices(x, 30, random_state=0, fp16=False).tolist()
    data = x.astype(np.float64)
    min_dist = np.linalg.norm(data - data[0], axis=1)
    assert chosen[0] == 0 and len(set(chosen)) == 30
    for index in chosen[1:]:
        assert min_dist[index] == pytest.approx(min_dist.max(), rel=1e-5)
        min_dist = np.minimum(min_dist, np.linalg.norm(data - data[index], axis=1))


@pytest.mark.parametrize("selection", [PlainGreedy(), PrunedGreedy(), DropCopies(PrunedGreedy()),
                                       ShardedGreedy(DropCopies(PrunedGreedy()), 3), ShardPairwise(50)])
def test_coreset_smaller_than_one_row_gives_row_zero(selection):
    coreset = GreedyCoreset(selection, "cpu")
    assert coreset.select(clustered(9), 0, random_state=0, progress=False).tolist() == [0]


def test_coreset_needs_a_non_empty_bank():
    with pytest.raises(ValueError, match="non-empty"):
        default_coreset("cpu").select(torch.zeros(0, 8), 3)


# -- the fast exact selections: the same indices as the plain loop ---------------------------------------------

@pytest.mark.parametrize("seed,offset,size,n", [pytest.param(0, 0.0, 6000, 700, marks=pytest.mark.slow),
                                                 (1, 0.0, 3000, 300), (2, 300.0, 3000, 300)])
def test_pruned_cpu_coreset_selects_exactly_what_the_plain_loop_selects(seed, offset, size, n, monkeypatch):
    """The triangle-inequality pruning (CPU default) must not change a single index, also where the rows lie
    far from the origin compared with their spread (float32 rounding of the centre screen is largest there)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, 256, generator=generator) * 3
    rows = centres[torch.randint(0, 40, (size,), generator=generator)] + offset
    rows = rows + 0.3 * torch.randn(size, 256, generator=generator)
    rows[::7] = 0  # empty patches, as in xyz banks
    rows[1::11] = rows[2::11][: len(rows[1::11])]  # duplicates
    select = lambda selection: GreedyCoreset(selection, "cpu").select(
        rows, n, random_state=seed, progress=False)
    pruned = default_indices(rows, n, random_state=seed)
    assert torch.equal(pruned, select(DropCopies(PlainGreedy(block_rows=1024))))  # several blocks
    computed = []  # rows whose distance to the newest centre the pruned loop computes
    distances = coreset_module.row_distances
    monkeypatch.setattr(coreset_module, "row_distances",
                        lambda block, last: (computed.append(len(block)), distances(block, last))[1])
    every_row_pruned = select(PrunedGreedy())
    monkeypatch.undo()
    assert torch.equal(every_row_pruned, select(PlainGreedy()))  # every row, copies included
    assert sum(computed) < 0.25 * size * (n - 1)  # the pruning skipped most rows: it was put to the test


def test_pruned_coreset_selecting_most_rows_selects_exactly_what_the_plain_loop_selects():
    """Past half of the distinct rows (as DINO+Point_MAE's xyz bank, 10 % of every patch but ~19 % distinct):
    clusters shrink to a row or none, several open at once, and the centre screen is on (over 512 centres)."""
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(30, 256, generator=generator) * 3
    rows = centres[torch.randint(0, 30, (900,), generator=generator)] + 0.3 * torch.randn(900, 256,
                                                                                          generator=generator)
    select = lambda selection: GreedyCoreset(selection, "cpu").select(rows, 600, random_state=3, progress=False)
    assert torch.equal(select(PrunedGreedy()), select(PlainGreedy()))


def test_cpu_selection_loops_run_on_one_thread_and_restore_the_callers_count(monkeypatch):
    seen = []
    distances = coreset_module.row_distances
    monkeypatch.setattr(coreset_module, "row_distances",
                        lambda rows, last: (seen.append(torch.get_num_threads()), distances(rows, last))[1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x = clustered(3)
        for selection in (PlainGreedy(), PrunedGreedy()):
            GreedyCoreset(selection, "cpu").select(x, 20, random_state=0, progress=False)
            assert torch.get_num_threads() == 2
        assert seen and set(seen) == {coreset_module.LOOP_THREADS}  # the pruned loop's distances
        with pytest.raises(RuntimeError), cpu_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError
        assert torch.get_num_threads() == 2
        with cpu_threads(1, torch.device("cuda")):  # a GPU's work leaves the CPU threads alone
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def banks_with_copies(seed: int, rows: int = 3000, dim: int = 200) -> torch.Tensor:
    """Mostly empty (all-zero) rows, as xyz banks, plus exact copies of other rows."""
    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn(rows, dim, generator=generator) * torch.rand(rows, 1, generator=generator) * 4
    bank[torch.rand(rows, generator=generator) < 0.8] = 0
    bank[5::13] = bank[4::13][: len(bank[5::13])]
    return bank


def test_first_occurrences_are_exactly_the_rows_without_an_earlier_copy():
    bank = banks_with_copies(0).half()
    seen, expected = set(), []
    for index, row in enumerate(bank.tolist()):
        if tuple(row) not in seen:
            seen.add(tuple(row))
            expected.append(index)
    assert first_occurrences(bank).tolist() == expected
    assert first_occurrences(torch.randn(500, 20).half()) is None  # no copies: nothing to drop
    assert first_occurrences(bank, min_share=2.0) is None  # fewer copies than asked for: nothing to drop


@pytest.mark.parametrize("fp16", [True, False])
# 800 > the ~600 distinct rows: row 0 repeats at the end
@pytest.mark.parametrize("seed,n", [(1, 200), pytest.param(2, 800, marks=pytest.mark.slow)])
def test_dropping_exact_copies_keeps_the_selection(fp16, seed, n):
    bank = banks_with_copies(seed)
    fast = default_indices(bank, n, random_state=seed, fp16=fp16)
    assert fast.tolist() == numpy_coreset(bank.numpy(), n, seed, fp16)
    every_row = GreedyCoreset(PrunedGreedy() if fp16 else PlainGreedy(), "cpu", fp16)  # copies kept
    assert torch.equal(every_row.select(bank, n, random_state=seed, progress=False), fast)


# -- the sharded selection (not the reference's) ---------------------------------------------------------------

def test_sharded_coreset_selects_each_blocks_share_greedily():
    x = torch.from_numpy(clustered(8, rows=900, dim=256))
    assert torch.equal(default_indices(x, 60, random_state=1, shards=1), default_indices(x, 60, random_state=1))
    chosen = default_indices(x, 60, random_state=1, fp16=False, shards=3)
    assert len(chosen) == 60 and len(set(chosen.tolist())) == 60
    proj = SparseRandomProjection(eps=0.9, random_state=1).fit_transform(x.numpy().astype(np.float64))
    for block in range(3):
        picked = chosen[block * 20:(block + 1) * 20].tolist()
        assert all(block * 300 <= i < (block + 1) * 300 for i in picked)
        rows = proj[block * 300:(block + 1) * 300]
        local = [i - block * 300 for i in picked]
        assert local[0] == 0
        min_dist = np.linalg.norm(rows - rows[0], axis=1)
        for index in local[1:]:  # each next pick is the block row farthest from the block's picks so far
            assert min_dist[index] == pytest.approx(min_dist.max(), rel=1e-12)
            min_dist = np.minimum(min_dist, np.linalg.norm(rows - rows[index], axis=1))


def test_sharded_coreset_with_float16_blocks_selects_like_the_plain_loop_per_block():
    x = torch.from_numpy(clustered(10, rows=900, dim=256, duplicates=30))
    fast = default_indices(x, 60, random_state=2, shards=3)
    plain = GreedyCoreset(ShardedGreedy(PlainGreedy(), 3), "cpu").select(x, 60, random_state=2, progress=False)
    assert torch.equal(fast, plain)


# -- the pairwise sharded selection (approximate mode, not the reference's) --------------------------------------

@pytest.mark.parametrize("shard_rows,n", [(150, 97), (1000, 40), (7, 200)])
def test_pairwise_shards_select_like_the_sharded_loop_over_the_distinct_rows(shard_rows, n):
    # float64 rows with distinct distances: the pairwise expansion's rounding cannot reorder them
    g = torch.Generator().manual_seed(shard_rows)
    x = torch.randn(600, 16, generator=g, dtype=torch.float64)
    x[100:300] = x[5]  # exact copies, left out before the shards are cut
    kept = first_occurrences(x)
    shards = -(-kept.shape[0] // shard_rows)

    def run(selection, rows):
        return selection.run(rows, torch.linalg.norm(rows - rows[:1], dim=1), n, False)

    got = run(ShardPairwise(shard_rows), x)
    assert torch.equal(got, kept[run(ShardedGreedy(PlainGreedy(), shards), x[kept])])
    assert got.shape == (n,) and not bool(torch.isin(got, torch.arange(101, 300)).any())


def test_projecting_each_chunks_copies_once_gives_the_same_projection():
    x = torch.from_numpy(clustered(3, rows=120, dim=256, duplicates=40))
    x[::3] = 0  # many copies of one row, as the empty point patches
    projector = SparseRandomProjection(eps=0.9, random_state=0).fit(np.zeros((160, 256)))
    every = coreset_module._project_for_coreset(x, projector, torch.float16, "cpu")
    once = coreset_module._project_for_coreset(x, projector, torch.float16, "cpu", copies_once=True)
    assert torch.equal(every[0], once[0]) and torch.equal(every[1], once[1])


def test_default_coreset_with_shard_rows_is_the_pairwise_selection():
    assert default_coreset("cpu", shard_rows=64) == GreedyCoreset(ShardPairwise(64), "cpu", project_copies_once=True)
    x = torch.from_numpy(clustered(8, rows=450, dim=64))
    chosen = default_coreset("cpu", shard_rows=150).select(x, 45, random_state=1, progress=False)
    assert len(set(chosen.tolist())) == 45
    assert all(sum(block * 150 <= i < (block + 1) * 150 for i in chosen.tolist()) == 15 for block in range(3))
    with pytest.raises(ValueError, match="at least 1"):
        ShardPairwise(0)
