"""The one place that chooses a memory bank's coreset and search strategies: the reference's numbers, fastest.

Every choice made here leaves the results unchanged (same coreset indices, same distances) except ``shards > 1``,
``shard_rows`` and a search other than ``"torch"``, which the caller asks for explicitly.
"""

from __future__ import annotations

import logging

import torch

from m3dm.config import BANK_SEARCHES
from m3dm.memory.clustered import ClusteredSearch
from m3dm.memory.coreset import (
    DropCopies,
    GreedyCoreset,
    PlainGreedy,
    PrunedGreedy,
    Selection,
    ShardedGreedy,
    ShardPairwise,
)
from m3dm.memory.faiss_search import FaissExactSearch, HNSWSearch, IVFSearch, faiss_available
from m3dm.memory.screened import ScreenedSearch, bf16_matmul_is_fast
from m3dm.memory.search import ExactSearch, NeighbourSearch, SharedEmptyRows
from m3dm.runtime import resolve_device

log = logging.getLogger(__name__)


def default_coreset(device: str | torch.device | None = None, fp16: bool = True, shards: int = 1,
                    shard_rows: int | None = None) -> GreedyCoreset:
    """The reference's greedy coreset on ``device`` (None: CUDA when available, as the reference).

    The pruned selection on the CPU in float16 (:class:`PrunedGreedy`; the plain loop elsewhere), exact copies of
    earlier rows left out first (:class:`DropCopies`); ``shards > 1``: one selection per block of rows
    (:class:`ShardedGreedy`, not the reference's selection); ``shard_rows``: one selection per block of at most
    that many distinct rows, all blocks at once (:class:`ShardPairwise`, not the reference's selection either).
    ``fp16``: see :class:`GreedyCoreset`.
    """
    device = resolve_device(device)
    if shard_rows is not None:
        return GreedyCoreset(ShardPairwise(shard_rows), device, fp16, project_copies_once=True)
    exact: Selection = PrunedGreedy() if device.type == "cpu" and fp16 else PlainGreedy()
    selection: Selection = DropCopies(exact)
    if shards > 1:
        selection = ShardedGreedy(selection, shards)
    return GreedyCoreset(selection, device, fp16)


def default_search(device: str | torch.device = "cpu", kind: str = "torch") -> NeighbourSearch:
    """The search of a bank stored on ``device``, the row of empty patches searched once.

    ``"torch"`` (the reference's numbers): bfloat16-screened where the device has native bfloat16 matrix products
    (:func:`bf16_matmul_is_fast`: CPUs with AVX512-BF16/AMX, CUDA GPUs from Ampere on), plain elsewhere.
    ``"projected"``: the plain search's numbers too, screened in a few principal directions of the bank, whole
    clusters of rows first (:class:`ClusteredSearch`, any device). ``"faiss"``: faiss's exact search (same rows,
    distances to float32 rounding); ``"hnsw"``: faiss's approximate HNSW graph; ``"ivf"``: faiss's approximate
    inverted lists. They run on the CPU; on another device, or without faiss, the torch search is used (logged).
    """
    if kind not in BANK_SEARCHES:
        raise ValueError(f"search must be one of {BANK_SEARCHES}, got {kind!r}")
    device = torch.device(device)
    if kind == "projected":
        return SharedEmptyRows(ClusteredSearch())
    if kind != "torch" and (device.type != "cpu" or not faiss_available()):
        why = f"the bank is on {device}" if device.type != "cpu" else "faiss is not installed"
        log.warning("--bank_search %s runs on the CPU with faiss, but %s: the exact torch search is used", kind, why)
        kind = "torch"
    inner: NeighbourSearch
    if kind == "faiss":
        inner = FaissExactSearch()
    elif kind == "hnsw":
        inner = HNSWSearch()
    elif kind == "ivf":
        inner = IVFSearch()
    else:
        inner = ScreenedSearch() if bf16_matmul_is_fast(device) else ExactSearch()
    return SharedEmptyRows(inner)
