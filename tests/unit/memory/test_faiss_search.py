"""faiss's exact search against the torch search (the oracle), its HNSW search, and the choice of search."""

from __future__ import annotations

import pytest
import torch

from m3dm.memory import defaults
from m3dm.memory.defaults import default_search
from m3dm.memory.faiss_search import FaissExactSearch, HNSWSearch, IVFSearch
from m3dm.memory.screened import ScreenedSearch
from m3dm.memory.search import ExactSearch, SharedEmptyRows, nearest_neighbours

pytest.importorskip("faiss", reason="faiss-cpu (requirements.txt) is not installed")

ROUNDING = 2e-5  # float32 rounding of |x|^2 + |y|^2 - 2 x.y in another order, relative to |x|^2 + |y|^2


def assert_same_neighbours(queries: torch.Tensor, bank: torch.Tensor, got: tuple[torch.Tensor, torch.Tensor]):
    """faiss's squared distances equal the torch search's to the rounding of the expansion (which is relative to
    the squared norms, so a near-zero distance may differ in its leading digit), and its row is the torch row or
    one whose exact distance ties the nearest to that rounding."""
    expected_dist, expected_idx = nearest_neighbours(queries, bank)
    dist, idx = got
    assert dist.dtype == torch.float32 and idx.dtype == torch.long
    scale = queries.square().sum(dim=1) + bank.square().sum(dim=1).max()
    assert bool(((dist.square() - expected_dist.square()).abs() <= ROUNDING * scale).all())
    exact = torch.linalg.vector_norm(queries - bank[idx], dim=1).square()
    nearest = torch.linalg.vector_norm(queries - bank[expected_idx], dim=1).square()
    assert bool(((exact - nearest).abs() <= ROUNDING * scale).all())
    assert int((idx != expected_idx).sum()) <= max(1, queries.shape[0] // 100)


@pytest.mark.parametrize("n_queries", [5, 19, 20, 300])  # below 20 queries faiss sums squared differences
@pytest.mark.parametrize("n_bank,dim", [(1000, 48), (37, 5)])
def test_faiss_exact_search_equals_the_torch_search(n_queries, n_bank, dim):
    g = torch.Generator().manual_seed(n_queries + n_bank)
    bank = torch.randn(n_bank, dim, generator=g)
    queries = bank[torch.randint(0, n_bank, (n_queries,), generator=g)] + 0.5 * torch.randn(n_queries, dim,
                                                                                           generator=g)
    assert_same_neighbours(queries, bank, FaissExactSearch().fit(bank).search(queries))


def test_faiss_exact_search_takes_the_first_of_duplicate_rows_and_finds_rows_of_the_bank():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(100, 16, generator=g)
    doubled = torch.cat([rows, rows, rows[:10]])
    for queries in (torch.randn(50, 16, generator=g), rows[40:90], rows[3:7]):
        dist, idx = FaissExactSearch().fit(doubled).search(queries)
        assert torch.equal(idx, torch.cdist(queries, rows).argmin(dim=1))  # the first copy, as the torch search
        assert_same_neighbours(queries, doubled, (dist, idx))
    dist, idx = FaissExactSearch().fit(doubled).search(rows[40:90])
    assert torch.equal(idx, torch.arange(40, 90))  # each row finds itself


def test_faiss_exact_search_shares_the_empty_rows_like_the_torch_search():
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(900, 96, generator=g)
    bank[:5] = -0.4  # the bank holds the empty row itself, several times
    queries = torch.randn(300, 96, generator=g)
    empty = torch.rand(300, generator=g) < 0.7
    queries[empty] = -0.4
    search = SharedEmptyRows(FaissExactSearch()).fit(bank)
    dist, idx = search.search(queries, empty)
    assert_same_neighbours(queries, bank, (dist, idx))
    assert torch.equal(idx[empty], torch.zeros(int(empty.sum()), dtype=torch.long))
    assert float(dist[empty].max()) == 0.0 and search.rows_remembered == 1


def test_faiss_exact_search_refusals():
    with pytest.raises(RuntimeError, match="before fit"):
        FaissExactSearch().search(torch.zeros(3, 4))
    search = FaissExactSearch().fit(torch.zeros(10, 4))
    with pytest.raises(ValueError, match="dim 4"):
        search.search(torch.zeros(3, 5))
    assert search.search(torch.zeros(0, 4))[0].shape == (0,)


def test_hnsw_search_is_close_to_exact_and_the_same_in_every_build():
    g = torch.Generator().manual_seed(5)
    centres = 3 * torch.randn(20, 16, generator=g)
    bank = centres[torch.randint(0, 20, (800,), generator=g)] + torch.randn(800, 16, generator=g)
    queries = centres[torch.randint(0, 20, (200,), generator=g)] + torch.randn(200, 16, generator=g)
    exact_dist, exact_idx = nearest_neighbours(queries, bank)
    dist, idx = HNSWSearch().fit(bank).search(queries)
    assert float((idx == exact_idx).float().mean()) > 0.9  # recall at 1
    found = torch.linalg.vector_norm(queries - bank[idx], dim=1)
    assert bool(((dist - found).abs() <= 1e-5 * (1 + found)).all())  # the distance to the row it returns
    assert bool((dist >= exact_dist * (1 - 1e-5)).all())  # never nearer than the nearest
    again = HNSWSearch().fit(bank).search(queries)
    assert torch.equal(again[0], dist) and torch.equal(again[1], idx)


def test_ivf_search_is_close_to_exact_and_the_same_in_every_build():
    g = torch.Generator().manual_seed(6)
    bank, queries = torch.randn(900, 16, generator=g), torch.randn(200, 16, generator=g)  # no clusters: hard
    exact_dist, exact_idx = nearest_neighbours(queries, bank)
    search = IVFSearch(probes=3).fit(bank)
    dist, idx = search.search(queries)
    assert search._index.nlist == 30  # about sqrt(rows) lists, 3 of them searched per query
    assert 0.5 < float((idx == exact_idx).float().mean()) < 1  # approximate: not every nearest row is found
    found = torch.linalg.vector_norm(queries - bank[idx], dim=1)
    assert bool(((dist - found).abs() <= 1e-4 * (1 + found)).all())  # the distance to the row it returns
    assert bool((dist >= exact_dist * (1 - 1e-5)).all())  # never nearer than the nearest
    assert torch.equal(IVFSearch(probes=30).fit(bank).search(queries)[1], exact_idx)  # every list: exact
    again = IVFSearch(probes=3).fit(bank).search(queries)
    assert torch.equal(again[0], dist) and torch.equal(again[1], idx)


def test_default_search_kinds(monkeypatch, caplog):
    exact = ScreenedSearch if defaults.bf16_matmul_is_fast("cpu") else ExactSearch
    assert isinstance(default_search("cpu").inner, exact)
    assert isinstance(default_search("cpu", "faiss").inner, FaissExactSearch)
    assert isinstance(default_search("cpu", "hnsw").inner, HNSWSearch)
    assert isinstance(default_search("cpu", "ivf").inner, IVFSearch)
    assert isinstance(default_search("meta", "faiss").inner, ExactSearch)  # faiss-cpu runs on the CPU only
    monkeypatch.setattr(defaults, "faiss_available", lambda: False)
    assert isinstance(default_search("cpu", "hnsw").inner, exact)
    assert "faiss is not installed" in caplog.text
    with pytest.raises(ValueError, match="one of"):
        default_search("cpu", "annoy")
