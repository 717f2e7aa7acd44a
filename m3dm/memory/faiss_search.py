"""Nearest-neighbour search through faiss: its exact search, and its approximate HNSW graph for large classes.

:class:`FaissExactSearch` is what faiss's exact flat index (``IndexFlatL2``) computes, called without building the
index (``knn_L2sqr``), so the bank is not copied; the bank rows' squared norms are computed once per bank. Like
``torch.cdist`` it expands ``|x - y|^2 = |x|^2 + |y|^2 - 2 x.y`` and clamps at 0, but with its own BLAS blocks and
summation order (and, for fewer than 20 queries, a direct sum of squared differences), so its distances equal the
torch search's to float32 rounding (a few 1e-6 relative), not bit for bit. The torch search
(:mod:`m3dm.memory.search`) therefore stays the default, the reference's numbers, and the oracle of the tests;
this one is ``--bank_search faiss`` (measured: benchmarks/README.md).

:class:`HNSWSearch` is approximate: faiss's hierarchical navigable small-world graph over the bank (``IndexHNSWFlat``,
built with one thread so that the graph, hence every result, is the same in every run). A query may get a row
that is not its nearest, so a distance may be larger than the exact one; it is the search of the approximate
mode (``--bank_search hnsw``, docs/approximate.md).



:class:`IVFSearch` is approximate too: faiss's inverted lists (``IndexIVFFlat``): the bank's rows grouped around
about ``sqrt(rows)`` k-means centres, a query searched in the rows of its few nearest groups only. Its build (a
short k-means on a sample of the bank, then one assignment of every row) costs far less than the HNSW graph's on
large banks (``--bank_search ivf``).

faiss is imported when a search is built; :func:`faiss_available` says whether it can be.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import numpy as np
import torch

from m3dm.runtime import cpu_threads

HNSW_NEIGHBOURS = 32  # graph links per node (faiss's M): PatchCore-scale banks, recall above 0.9 at ef 64
HNSW_EF_CONSTRUCTION = 40  # faiss's default candidate list while building
HNSW_EF_SEARCH = 64  # candidate list per query (faiss's default 16 misses too often on patch features)
IVF_PROBES = 8  # inverted lists searched per query (IVFSearch)
IVF_TRAIN_PER_LIST = 40  # k-means training rows per list, evenly spaced over the bank
IVF_ITERATIONS = 10  # k-means iterations (faiss's default 25: the lists need only be roughly balanced)
IVF_SEED = 1234  # k-means seed: the same lists in every run


@functools.cache
def _faiss() -> ModuleType | None:
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def faiss_available() -> bool:
    """Whether faiss can be imported (``faiss-cpu`` in requirements.txt)."""
    return _faiss() is not None


def _module() -> ModuleType:
    faiss = _faiss()
    if faiss is None:
        raise RuntimeError("faiss is not installed: pip install faiss-cpu (requirements.txt)")
    return faiss


def _host_rows(rows: torch.Tensor) -> np.ndarray:
    """Float32 C-contiguous NumPy rows (the tensor's own memory when it already is one on the CPU)."""
    if rows.device.type != "cpu":
        raise ValueError(f"the faiss searches run on the CPU; the rows are on {rows.device}")
    return np.ascontiguousarray(rows.detach().to(torch.float32).numpy())


def _as_result(squared: np.ndarray, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss's ``(P, 1)`` squared distances and labels as the search strategies return them."""
    distances = torch.from_numpy(squared[:, 0]).clamp_min_(0).sqrt_()
    return distances, torch.from_numpy(index[:, 0]).to(torch.long)


class FaissExactSearch:
    """Exact nearest bank row through faiss (``IndexFlatL2``'s computation, no copy of the bank); first index on
    ties, as the torch search. Runs on the caller's torch thread count; CPU banks only."""

    def __init__(self) -> None:
        self.bank: torch.Tensor | None = None
        self._rows: np.ndarray | None = None
        self._norms: np.ndarray | None = None

    def fit(self, bank: torch.Tensor) -> FaissExactSearch:
        faiss = _module()
        self.bank = bank
        self._rows = _host_rows(bank)
        self._norms = np.empty(self._rows.shape[0], dtype=np.float32)
        faiss.fvec_norms_L2sqr(faiss.swig_ptr(self._norms), faiss.swig_ptr(self._rows), self._rows.shape[1],
                               self._rows.shape[0])
        return self

    def search(self, queries: torch.Tensor, empty: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None or self._norms is None:
            raise RuntimeError("FaissExactSearch.search before fit")
        if self._rows.shape[0] == 0:
            raise ValueError("FaissExactSearch: the bank is empty")
        faiss = _module()
        x = _host_rows(queries)
        if x.shape[1] != self._rows.shape[1]:
            raise ValueError(f"queries {x.shape} do not match the bank's dim {self._rows.shape[1]}")
        squared = np.empty((x.shape[0], 1), dtype=np.float32)
        index = np.empty((x.shape[0], 1), dtype=np.int64)
        if x.shape[0]:
            faiss.omp_set_num_threads(torch.get_num_threads())
            faiss.knn_L2sqr(faiss.swig_ptr(x), faiss.swig_ptr(self._rows), x.shape[1], x.shape[0],
                            self._rows.shape[0], 1, faiss.swig_ptr(squared), faiss.swig_ptr(index),
                            faiss.swig_ptr(self._norms))
        return _as_result(squared, index)


class _BuiltIndexSearch:
    """A faiss index built from the bank at the first search after ``fit`` (so a model that is only loaded and
    saved builds nothing), searched with the caller's torch thread count. Subclasses build it (``_build``) and set
    its search-time parameters (``_tune``)."""

    def __init__(self) -> None:
        self.bank: torch.Tensor | None = None
        self._index: Any = None  # a faiss index (faiss ships no type information)

    def fit(self, bank: torch.Tensor) -> _BuiltIndexSearch:
        _module()  # fail here, not at the first search, when faiss is missing
        self.bank, self._index = bank, None
        return self

    def _build(self, bank: torch.Tensor) -> Any:
        raise NotImplementedError

    def _tune(self, index: Any) -> None:
        raise NotImplementedError

    def search(self, queries: torch.Tensor, empty: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        name = type(self).__name__
        if self.bank is None:
            raise RuntimeError(f"{name}.search before fit")
        if self.bank.shape[0] == 0:
            raise ValueError(f"{name}: the bank is empty")
        if self._index is None:
            self._index = self._build(self.bank)
        x = _host_rows(queries)
        self._tune(self._index)
        _module().omp_set_num_threads(torch.get_num_threads())
        squared, index = self._index.search(x, 1)
        return _as_result(squared, index)


class HNSWSearch(_BuiltIndexSearch):
    """Approximate nearest bank row: faiss's HNSW graph (``neighbours`` links per node, ``ef_search`` candidates
    per query), built with one thread (the same graph in every run). Holds a copy of the bank inside the graph."""

    def __init__(self, neighbours: int = HNSW_NEIGHBOURS, ef_search: int = HNSW_EF_SEARCH,
                 ef_construction: int = HNSW_EF_CONSTRUCTION) -> None:
        super().__init__()
        self.neighbours, self.ef_search, self.ef_construction = neighbours, ef_search, ef_construction

    def _build(self, bank: torch.Tensor) -> Any:
        faiss = _module()
        rows = _host_rows(bank)
        index = faiss.IndexHNSWFlat(rows.shape[1], self.neighbours)
        index.hnsw.efConstruction = self.ef_construction
        with cpu_threads(1):  # parallel insertion would make the graph depend on the threads' timing
            faiss.omp_set_num_threads(1)
            index.add(rows)
        return index

    def _tune(self, index: Any) -> None:
        index.hnsw.efSearch = self.ef_search


class IVFSearch(_BuiltIndexSearch):
    """Approximate nearest bank row: faiss's inverted lists (``IndexIVFFlat``, about ``sqrt(rows)`` lists, the
    ``probes`` nearest searched per query), built with one thread, a fixed k-means seed and evenly spaced training
    rows (the same lists in every run); first index on ties within the probed lists. Holds a copy of the bank
    inside the lists."""

    def __init__(self, probes: int = IVF_PROBES) -> None:
        super().__init__()
        self.probes = probes

    def _build(self, bank: torch.Tensor) -> Any:
        faiss = _module()
        rows = _host_rows(bank)
        lists = max(1, round(rows.shape[0] ** 0.5))
        quantizer = faiss.IndexFlatL2(rows.shape[1])
        index = faiss.IndexIVFFlat(quantizer, rows.shape[1], lists)
        index.cp.niter, index.cp.seed = IVF_ITERATIONS, IVF_SEED
        index.cp.max_points_per_centroid, index.cp.min_points_per_centroid = IVF_TRAIN_PER_LIST, 1
        step = max(1, rows.shape[0] // (IVF_TRAIN_PER_LIST * lists))
        with cpu_threads(1):  # k-means' parallel reductions would make the lists depend on the thread count
            faiss.omp_set_num_threads(1)
            index.train(np.ascontiguousarray(rows[::step]))
            index.add(rows)
        return index

    def _tune(self, index: Any) -> None:
        index.nprobe = self.probes
