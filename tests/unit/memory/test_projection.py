"""The chunked sparse random projection against scikit-learn's own fit_transform."""

from __future__ import annotations

import logging

import numpy as np
import torch
from memory_oracles import clustered
from sklearn.random_projection import SparseRandomProjection

from m3dm.memory import projection
from m3dm.memory.projection import fit_sparse_random_projection, projection_chunks
from m3dm.memory.storage import as_tensor


def sparse_random_projection(features, eps: float, random_state=None) -> torch.Tensor:
    """The whole bank projected the way the coreset does it: float64 rows, chunk by chunk, or the unprojected
    features when the target dimension would exceed the input one."""
    features = as_tensor(features)
    projector = fit_sparse_random_projection(features.shape[0], features.shape[1], eps, random_state)
    if projector is None:
        return features
    return torch.cat([chunk for _, chunk in projection_chunks(features, projector)])


def test_projection_equals_sklearn_fit_transform(monkeypatch):
    x = clustered(1, rows=500, dim=200)
    expected = SparseRandomProjection(eps=0.9, random_state=5).fit_transform(x.astype(np.float64))
    monkeypatch.setattr(projection, "PROJECTION_CHUNK_BYTES", 8 * 200 * 37)  # 37-row chunks
    got = sparse_random_projection(torch.from_numpy(x), 0.9, 5)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13, atol=1e-13)


def test_projection_uses_the_global_numpy_generator():
    x = clustered(2, rows=400, dim=200)
    np.random.seed(7)
    expected = SparseRandomProjection(eps=0.9).fit_transform(x.astype(np.float64))
    state_after_sklearn = np.random.get_state()[1].copy()
    np.random.seed(7)
    got = sparse_random_projection(x, 0.9, None)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(np.random.get_state()[1], state_after_sklearn)


def test_projection_falls_back_to_the_input_without_a_warning_where_no_eps_would_project(caplog, capsys):
    """BTF_FPFH's 33 features: no eps below 1 gives a Johnson-Lindenstrauss dimension under 33, so the bank is
    kept (as the reference keeps it) without the reference's advice to increase eps."""
    x = torch.from_numpy(clustered(3, rows=300, dim=33))  # JL dimension 140 at eps 0.9, 137 at eps 1
    with caplog.at_level(logging.DEBUG, logger="m3dm.memory.projection"):
        assert sparse_random_projection(x, 0.9, 0) is x
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    assert "unprojected 33 features" in caplog.text
    assert capsys.readouterr() == ("", "")


def test_projection_falls_back_to_the_input_with_advice_where_a_larger_eps_would_project(caplog, capsys):
    x = torch.from_numpy(clustered(3, rows=300, dim=150))  # JL dimension 274 at eps 0.5, 137 near eps 1
    with caplog.at_level(logging.WARNING, logger="m3dm.memory.projection"):
        assert sparse_random_projection(x, 0.5, 0) is x
    assert "could not project" in caplog.text and "a larger --coreset_eps (below 1)" in caplog.text
    assert capsys.readouterr().out == ""  # logged, not printed
