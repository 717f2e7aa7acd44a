"""Exact nearest neighbours and the re-weighted score against torch.cdist and the formula; the search strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from memory_oracles import hand_score

from m3dm.memory import search
from m3dm.memory.search import ExactSearch, SharedEmptyRows, nearest_neighbours, reweighted_score


@pytest.mark.parametrize("patches,bank,dim", [(300, 1000, 48), (20, 12, 5),
                                                 pytest.param(784, 2000, 128, marks=pytest.mark.slow)])
def test_nearest_neighbours_equal_cdist_min(patches, bank, dim):
    g = torch.Generator().manual_seed(patches)
    x, m = torch.randn(patches, dim, generator=g), torch.randn(bank, dim, generator=g)
    expected_dist, expected_idx = torch.cdist(x, m).min(dim=1)
    dist, idx = nearest_neighbours(x, m)
    assert torch.equal(dist, expected_dist) and torch.equal(idx, expected_idx)
    blocks = [(7, None), (64, 333), (patches, 97)] + ([(1, 1), (3, 5)] if patches * bank < 1000 else [])
    for chunk, bank_chunk in blocks:
        dist, idx = nearest_neighbours(x, m, chunk_size=chunk, bank_chunk_size=bank_chunk)
        torch.testing.assert_close(dist, expected_dist, rtol=1e-5, atol=1e-5)
        assert torch.equal(idx, expected_idx)


def test_nearest_neighbours_take_the_first_of_tied_rows():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(100, 16, generator=g)
    doubled = torch.cat([m, m])
    x = torch.randn(50, 16, generator=g)
    for bank_chunk in (None, 100, 30):
        _, idx = nearest_neighbours(x, doubled, bank_chunk_size=bank_chunk)
        assert torch.equal(idx, torch.cdist(x, m).argmin(dim=1))


def test_block_size_bounds_memory(monkeypatch):
    monkeypatch.setattr(search, "NN_BLOCK_ELEMENTS", 1000)
    calls = []
    real_cdist = torch.cdist

    def counting_cdist(a, b, **kwargs):
        calls.append(a.shape[0] * b.shape[0])
        return real_cdist(a, b, **kwargs)

    monkeypatch.setattr(torch, "cdist", counting_cdist)
    g = torch.Generator().manual_seed(2)
    x, m = torch.randn(200, 8, generator=g), torch.randn(3000, 8, generator=g)
    dist, _ = nearest_neighbours(x, m)
    assert max(calls) <= 1000
    torch.testing.assert_close(dist, real_cdist(x, m).min(dim=1).values, rtol=1e-5, atol=1e-5)


# -- search strategies -----------------------------------------------------------------------------------------

def test_exact_search_is_the_plain_search_with_its_block_size():
    g = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(700, 64, generator=g), torch.randn(150, 64, generator=g)
    for block_rows in (None, 16, 40):
        got = ExactSearch(block_rows).fit(bank).search(queries, empty=torch.zeros(150, dtype=torch.bool))
        expected = nearest_neighbours(queries, bank, chunk_size=block_rows)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(RuntimeError, match="before fit"):
        ExactSearch().search(queries)


def test_shared_empty_rows_search_equals_searching_every_row():
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(900, 96, generator=g)
    queries = torch.randn(300, 96, generator=g)
    empty = torch.rand(300, generator=g) < 0.7
    queries[empty] = -0.4  # every empty patch is one constant row once normalised
    shared = SharedEmptyRows(ExactSearch()).fit(bank)
    expected = nearest_neighbours(queries, bank)
    for _ in range(2):  # the second search reuses the remembered row
        got = shared.search(queries, empty)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert shared.rows_remembered == 1
    assert torch.equal(shared.search(queries)[1], expected[1])  # without flags: every row searched
    shared.fit(bank[:500])
    assert shared.rows_remembered == 0  # a new bank forgets the rows searched in the old one
    assert torch.equal(shared.search(queries, empty)[1], nearest_neighbours(queries, bank[:500])[1])


# -- re-weighted score -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("eps,divisor", [(0.0, 1.0), (1e-5, 1.0), (0.0, 1000.0)])
def test_reweighted_score_equals_the_formula(seed, eps, divisor):
    rng = np.random.default_rng(seed)
    bank = rng.normal(0, 1, (200, 24)).astype(np.float32)
    x = rng.normal(0, 1.3, (49, 24)).astype(np.float32)
    xt, bt = torch.from_numpy(x), torch.from_numpy(bank)
    score = reweighted_score(xt, bt, *nearest_neighbours(xt, bt), eps=eps, divisor=divisor)
    expected, w = hand_score(x.astype(np.float64), bank.astype(np.float64), eps=eps, divisor=divisor)
    assert score == pytest.approx(expected, rel=1e-5)
    assert 0.5 <= w < 1


def test_divisor_divides_before_the_exponentials():
    rng = np.random.default_rng(9)
    bank = torch.from_numpy(rng.normal(0, 30, (100, 4)).astype(np.float32))
    x = torch.from_numpy(rng.normal(0, 60, (10, 4)).astype(np.float32))
    nn = nearest_neighbours(x, bank)
    plain, divided = reweighted_score(x, bank, *nn), reweighted_score(x, bank, *nn, divisor=1000.0)
    s_star = float(nn[0].max())
    # large distances saturate w at ~1 without the divisor; divided, w is close to 1/2 (δ/D and s*/D are tiny)
    assert plain / s_star > 0.99
    assert divided * 1000 / s_star == pytest.approx(0.5, abs=0.02)


def test_reweighted_score_a_tiny_case_by_hand():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
    x = torch.tensor([[0.0, 0.1], [-3.0, 0.0]])
    # worst patch (-3, 0): nearest (0, 0) at 3; rows nearest to (0, 0): itself, (1, 0), (0, 2)
    d = np.sqrt(2.0)
    w = 1 - np.exp(3 / d) / (np.exp(4 / d) + np.exp(np.sqrt(13) / d))
    assert reweighted_score(x, bank, *nearest_neighbours(x, bank)) == pytest.approx(3 * w, rel=1e-6)
