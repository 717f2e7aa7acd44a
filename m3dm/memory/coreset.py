"""The reference's greedy k-center coreset (quirk 33) and the selection strategies that compute it.

:class:`GreedyCoreset` projects the bank (:mod:`m3dm.memory.projection`), then hands the projected rows to a
selection strategy: every strategy but :class:`ShardedGreedy` returns the reference's indices exactly.

- :class:`PlainGreedy`: the reference's loop, one distance per row and step (any device and precision).
- :class:`PrunedGreedy`: the same indices on the CPU in float16, skipping rows that provably cannot get closer.
- :class:`DropCopies` (wraps another): leaves exact copies of earlier rows out first; the same indices.
- :class:`ShardedGreedy` (wraps another): one selection per contiguous block of rows; faster, not the reference.
- :class:`ShardPairwise`: one selection per block of at most a given number of distinct rows, all blocks' steps
  at once on their precomputed distances; much faster on large banks, not the reference.

:func:`m3dm.memory.defaults.default_coreset` makes the automatic choice. Numerics, chosen to match the reference:
with ``fp16=True`` the projected bank, the current row and the running minima are float16, as in the reference;
conversions to float16 go through float32 exactly like torch's ``.half()`` on a float64 tensor. On CUDA the
distance is the reference's own expression (``linalg.norm`` of the float16 difference, float32 accumulation). On
the CPU the float16 difference is accumulated in float64 and rounded to float16 (faster there than torch's native
CPU float16 norm, and platform independent); the two can differ by one float16 ulp in about one row in 10^5,
which is below the reproducibility of the reference itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from sklearn.random_projection import SparseRandomProjection
from tqdm import tqdm

from m3dm.memory.projection import (
    fit_sparse_random_projection,
    project_rows,
    projection_bounds,
    projection_chunks,
)
from m3dm.memory.storage import ArrayLike, as_tensor
from m3dm.runtime import cpu_threads

CPU_DISTANCE_CHUNK_ROWS = 8192  # rows per coreset distance block on the CPU (cache friendly)
PRUNE_SLACK = 0.01  # relative safety margin of the triangle-inequality test (float16 rounding is ~5e-4)
SCREEN_DIMS = 32  # leading principal directions in the cheap lower bound on distances between centres
SCREEN_MIN_CENTRES = 512  # smaller selections compute every distance between centres
SCREEN_ALLOWANCE = 1e-3  # float32 rounding allowance of that bound, relative to a centre's offset (worst case ~1e-4)
MIN_COPY_SHARE = 0.05  # drop exact copies of earlier rows before the selection when at least this share are copies
LOOP_THREADS = 1  # torch threads in the CPU selection loops: their steps are too small to share (PrunedGreedy)


class Selection(Protocol):
    """A greedy k-center selection over projected rows."""

    def run(self, reduced: torch.Tensor, min_dist: torch.Tensor, n: int, progress: bool) -> torch.Tensor:
        """Indices (CPU LongTensor of ``max(n, 1)``) of the greedy selection from row 0, given every row's
        distance to row 0 (``min_dist``, in the rows' dtype; may be updated in place)."""
        ...


def row_distances(rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Distances of ``rows`` to ``last`` as the CPU selections compute them (float16: accumulated in float64)."""
    if rows.dtype == torch.float16:
        return torch.linalg.vector_norm(rows - last, dim=1, dtype=torch.float64).to(torch.float16)
    return torch.linalg.norm(rows - last, dim=1)


@dataclass(frozen=True)
class PlainGreedy:
    """The reference's loop: each step lowers every row's running minimum by its distance to the newest centre.

    ``block_rows`` bounds the rows per distance step; None: the whole bank in one step on CUDA (the reference's
    expression), ``CPU_DISTANCE_CHUNK_ROWS`` rows on the CPU. The block size does not change the indices.
    """

    block_rows: int | None = None

    def __post_init__(self) -> None:
        if self.block_rows is not None and self.block_rows < 1:
            raise ValueError(f"block_rows must be at least 1, got {self.block_rows}")

    def run(self, reduced: torch.Tensor, min_dist: torch.Tensor, n: int, progress: bool) -> torch.Tensor:
        selected = torch.zeros(max(n, 1), dtype=torch.long, device=reduced.device)
        last = reduced[:1]
        # The reference's first iteration recomputes the distances to row 0 in float16 and takes the minimum with
        # the rounded precise ones; it can change the selection, so it is kept. Indices stay on the device (no sync).
        # On the CPU one thread, as the pruned loop: a few block-sized steps per row chosen, each waiting for a
        # descheduled second thread on a busy machine (2.5x the wall time on 6,000 rows, 1.6-2.5x on 57,860).
        with cpu_threads(LOOP_THREADS, reduced.device):
            for step in tqdm(range(1, n), desc="coreset", disable=not progress, leave=False):
                self._lower_min_distances(reduced, last, min_dist)
                index = torch.argmax(min_dist).view(1)
                last = reduced.index_select(0, index)
                min_dist.index_fill_(0, index, 0)
                selected[step] = index[0]
        return selected.cpu()

    def _lower_min_distances(self, reduced: torch.Tensor, last: torch.Tensor, min_dist: torch.Tensor) -> None:
        """``min_dist = minimum(min_dist, ‖reduced − last‖)`` in place (see the module docstring for the numerics)."""
        if reduced.device.type == "cuda" and self.block_rows is None:
            torch.minimum(min_dist, torch.linalg.norm(reduced - last, dim=1), out=min_dist)
            return
        step = self.block_rows or CPU_DISTANCE_CHUNK_ROWS
        exact_half = reduced.dtype == torch.float16 and reduced.device.type != "cuda"
        for start in range(0, reduced.shape[0], step):
            diff = reduced[start:start + step] - last
            if exact_half:
                dist = torch.linalg.vector_norm(diff, dim=1, dtype=torch.float64).to(torch.float16)
            else:
                dist = torch.linalg.norm(diff, dim=1)
            part = min_dist[start:start + step]
            torch.minimum(part, dist, out=part)


class CentreScreen:
    """Lower bounds on the distances from the newest centre to the earlier ones, at a tenth of the cost.

    The bound is the distance between the centres' coordinates along the bank's leading principal directions
    (an orthogonal projection never lengthens a vector) less an allowance for float32 rounding, so a centre it
    rules out is truly that far; only the centres it cannot rule out get their exact distance computed. Every
    row's coordinates are computed up front in a few large products (any row may become a centre), so adding a
    centre is a copy, not half a dozen small operations per step. A step screens every centre with one
    matrix-vector product in float64 (squared distances from the coordinates' norms; their rounding, ~1e-14 of a
    squared norm, is far inside the allowance) against each centre's reach, its threshold plus its allowance,
    which the caller updates only where a threshold changed.
    """

    def __init__(self, reduced: torch.Tensor, capacity: int) -> None:
        self.active = capacity >= SCREEN_MIN_CENTRES  # fewer centres: every distance is cheaper than the set-up
        if not self.active:
            return
        sample = reduced[::max(1, reduced.shape[0] // 20000)].float()
        mean = sample.mean(dim=0)
        dims = min(SCREEN_DIMS, reduced.shape[1])
        basis = torch.linalg.svd(sample - mean, full_matrices=False).Vh[:dims].T.contiguous()
        self.row_coords = torch.empty((reduced.shape[0], dims), dtype=torch.float32)
        self.row_allowance = torch.empty(reduced.shape[0], dtype=torch.float32)
        for start in range(0, reduced.shape[0], CPU_DISTANCE_CHUNK_ROWS):
            offset = reduced[start:start + CPU_DISTANCE_CHUNK_ROWS].float() - mean
            torch.mm(offset, basis, out=self.row_coords[start:start + offset.shape[0]])
            self.row_allowance[start:start + offset.shape[0]] = SCREEN_ALLOWANCE * torch.linalg.vector_norm(
                offset, dim=1)
        self.row_coords_np = self.row_coords.numpy()
        self.row_allowance_np = self.row_allowance.numpy()
        self.coords = torch.empty((capacity, dims), dtype=torch.float64)
        self.coords_np = self.coords.numpy()
        self.square_norm_t = torch.empty(capacity, dtype=torch.float64)
        self.square_norm = self.square_norm_t.numpy()
        self.allowance = np.empty(capacity, dtype=np.float64)
        self.reach = np.empty(capacity, dtype=np.float64)

    def add(self, index: int, row: int) -> None:
        """Row ``row`` of the bank becomes centre ``index`` (threshold 0 until ``set_thresholds``)."""
        if not self.active:
            return
        coords = self.coords_np[index]
        coords[:] = self.row_coords_np[row]
        self.square_norm[index] = coords @ coords
        self.allowance[index] = self.reach[index] = self.row_allowance_np[row]

    def set_thresholds(self, indices: np.ndarray | int, thresholds: np.ndarray | float) -> None:
        """The thresholds of the centres at ``indices`` (each centre's, until changed)."""
        if self.active:
            self.reach[indices] = self.allowance[indices] + thresholds

    def possibly_within(self, k: int, count: int) -> np.ndarray:
        """Indices ``i < count`` of the centres that may lie closer than their threshold to centre k."""
        if not self.active:
            return np.arange(count)
        # |c_i - c_k|^2 - |c_k|^2 = |c_i|^2 - 2 c_i.c_k, in one product; compared with reach^2 - |c_k|^2
        square = torch.addmv(self.square_norm_t[:count], self.coords[:count], self.coords[k], alpha=-2).numpy()
        limit = np.add(self.reach[:count], self.allowance[k])
        limit *= limit
        limit -= self.square_norm[k]
        return np.flatnonzero(square < limit)


@dataclass(frozen=True)
class PrunedGreedy:
    """The same selection as :class:`PlainGreedy`, skipping rows that provably cannot get closer (CPU, float16).

    Every row remembers the selected centre it is nearest to. By the triangle inequality a row whose centre lies
    at least twice its running minimum away from the new centre cannot get closer to the new one, and a whole
    cluster can be skipped when the new centre is at least twice the cluster's largest running minimum away
    (the distances between centres are bounded from below first by :class:`CentreScreen`, and computed only
    where the bound cannot decide). The test carries a 1 % margin, far above float16 rounding, so the skipped
    rows are exactly those whose minimum the plain loop would leave unchanged; the rows that are computed use
    the plain loop's CPU arithmetic. Hence the indices are identical, at a cost that falls as clusters shrink.
    (The distances between centres and the screen are float32/float64 arithmetic of their own: any rounding of
    theirs is far inside that margin, so it can change which rows are checked, never which rows get closer.)

    A step touches only the rows of the clusters it opens (each cluster's rows are kept as a list,
    :class:`Clusters`), screens every centre with one matrix-vector product and takes one pass over the running
    minima for the farthest row; its bookkeeping (a few dozen operations on some hundred values) is NumPy, whose
    calls cost a fraction of torch's. On MVTec-sized banks about a hundred rows per step are candidates, so
    these fixed costs, not the distances, set the time (benchmarks/scaling.py).

    The loop runs on ``LOOP_THREADS`` torch threads (one), whatever the caller set, and restores the caller's
    count after it: each step is a few dozen small operations, which a second thread barely speeds up on an idle
    machine, while on a busy one every parallel operation waits for a descheduled thread (a 2-thread run took
    over ten times the wall and CPU time of a 1-thread one under load; benchmarks/coreset_loop.py). The thread
    count changes no index (the tests compare both loops with a NumPy oracle).
    """

    def run(self, reduced: torch.Tensor, min_dist: torch.Tensor, n: int, progress: bool) -> torch.Tensor:
        if reduced.device.type != "cpu" or reduced.dtype != torch.float16:
            raise ValueError(f"PrunedGreedy reproduces the CPU float16 selection only, got {reduced.dtype} rows on "
                             f"{reduced.device}; use PlainGreedy there")
        with cpu_threads(LOOP_THREADS):
            return self._select(reduced, min_dist, n, progress)

    @staticmethod
    def _select(reduced: torch.Tensor, min_dist: torch.Tensor, n: int, progress: bool) -> torch.Tensor:
        # the distances of the rows that may get closer are the plain loop's torch arithmetic; the rest is NumPy
        count = max(n, 1)
        rows16 = reduced.numpy()
        centres = np.empty((count, reduced.shape[1]), dtype=np.float32)
        radius = np.zeros(count, dtype=np.float32)
        selected = np.zeros(count, dtype=np.int64)
        running = min_dist.float().numpy()  # the float16 minima, exactly: float32 compares and argmaxes faster
        screen = CentreScreen(reduced, count)
        centres[0] = rows16[0]
        screen.add(0, 0)
        radius[0] = np.inf  # the first update (against row 0 again, as the reference) checks every row
        screen.set_thresholds(0, np.inf)
        clusters = Clusters(reduced.shape[0])
        factor = np.float32(2.0 * (1.0 + PRUNE_SLACK))
        last = 0  # the row of the most recently selected centre
        for step in tqdm(range(1, n), desc="coreset", disable=not progress, leave=False):
            k = step - 1  # the most recently selected centre; its distances are taken now, as in the reference
            near = screen.possibly_within(k, step)
            offsets = centres[near] - centres[k]
            near_dist = np.sqrt(np.einsum("ij,ij->i", offsets, offsets))
            is_open = near_dist < factor * radius[near]
            # (the newest cluster, k, has no rows yet, hence radius 0: never open; except row 0's at step 1, radius inf)
            opened = near[is_open]
            rows, gap = clusters.rows_of(opened, near_dist[is_open])
            candidates = np.flatnonzero(gap < factor * running[rows])
            checked = rows[candidates]
            new = row_distances(torch.from_numpy(rows16[checked]), reduced[last:last + 1]).numpy().astype(np.float32)
            closer = new < running[checked]
            moved = candidates[closer]
            running[checked[closer]] = new[closer]
            # the largest running minimum of every open cluster, and of the newest (all their rows are in `rows`)
            radius[opened] = largest = clusters.move(moved, k, running)
            screen.set_thresholds(opened, factor * largest)
            if moved.size:
                radius[k] = max(radius[k], new[closer].max())
                screen.set_thresholds(k, factor * radius[k])
            last = int(np.argmax(running))  # the first of the farthest rows, as torch.argmax
            running[last] = 0
            selected[step] = last
            centres[step] = rows16[last]
            screen.add(step, last)
        return torch.from_numpy(selected)


class Clusters:
    """The rows nearest to each selected centre so far (each centre's cluster), kept as one index array per centre.

    A greedy step can only move rows of the clusters it opens, all to the newest centre, so after each step the open
    clusters' lists are rebuilt from the rows they kept: the lists stay exact and a step touches only the rows of the
    clusters it opens (no pass over the whole bank to find them).
    """

    def __init__(self, rows: int) -> None:
        self.members = [np.arange(rows)]  # every row starts nearest to row 0, the first centre
        self._open = np.empty(0, dtype=np.int64)
        self._rows = np.empty(0, dtype=np.int64)
        self._segment: np.ndarray | None = None  # each row's place in `_open` (None: one open cluster)

    def rows_of(self, opened: np.ndarray, centre_dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every row of the ``opened`` clusters, and each row's centre's distance (``centre_dist`` per cluster)."""
        self._open = opened
        if opened.size == 1:
            self._rows, self._segment = self.members[opened[0]], None
            return self._rows, np.broadcast_to(centre_dist, self._rows.shape)
        parts = [self.members[c] for c in opened.tolist()]
        self._rows = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        self._segment = np.repeat(np.arange(len(parts)), [part.size for part in parts])
        return self._rows, centre_dist[self._segment]

    def move(self, moved: np.ndarray, centre: int, running: np.ndarray) -> np.ndarray:
        """The rows at positions ``moved`` of the last ``rows_of`` join ``centre``'s cluster; returns the largest
        ``running`` value left in each open cluster (0 for an emptied one)."""
        stays = np.ones(self._rows.size, dtype=bool)
        stays[moved] = False
        kept = self._rows[stays]
        largest = np.zeros(self._open.size, dtype=np.float32)
        if self._segment is None:
            if self._open.size:
                self.members[self._open[0]] = kept
                largest[0] = running[kept].max() if kept.size else 0
        else:
            sizes = np.bincount(self._segment[stays], minlength=self._open.size)
            bounds = np.cumsum(sizes)
            filled = sizes > 0
            if kept.size:
                largest[filled] = np.maximum.reduceat(running[kept], (bounds - sizes)[filled])
            for cluster, start, stop in zip(self._open.tolist(), (bounds - sizes).tolist(), bounds.tolist()):
                self.members[cluster] = kept[start:stop]
        joined = self._rows[moved]
        if centre < len(self.members):  # step 1: the first centre is row 0 again, its own cluster
            self.members[centre] = np.concatenate((self.members[centre], joined))
        else:
            self.members.append(joined)
        return largest


def first_occurrences(reduced: torch.Tensor, min_share: float = MIN_COPY_SHARE) -> torch.Tensor | None:
    """Ascending indices of the rows that are not an exact copy of an earlier row (None when fewer than
    ``min_share`` of the rows are copies; see :func:`copy_sources`)."""
    sources = copy_sources(reduced, min_share)
    if sources is None:
        return None
    return (sources == torch.arange(reduced.shape[0], device=reduced.device)).nonzero().squeeze(1)


def copy_sources(reduced: torch.Tensor, min_share: float = MIN_COPY_SHARE) -> torch.Tensor | None:
    """Every row's first exact copy: the index of the earliest row equal to it (its own index when none is), or
    None when fewer than ``min_share`` of the rows are copies.

    Copies are common: every empty patch of an xyz bank is the same row (about 80 % of the rows on MVTec 3D-AD).
    Rows are grouped by a random linear key, then each row is compared with the first row of its group, so a
    copy is dropped only when it is equal element for element (a copy the key misses is merely kept).
    """
    rows = reduced.shape[0]
    generator = torch.Generator().manual_seed(0)  # a private generator: the global random streams are untouched
    probe = torch.randn(reduced.shape[1], generator=generator).to(reduced.device)
    keys = torch.cat([chunk.float() @ probe for chunk in reduced.split(CPU_DISTANCE_CHUNK_ROWS)])
    _, group = torch.unique(keys, return_inverse=True)
    order = torch.arange(rows, device=reduced.device)
    first = torch.full((rows,), rows, dtype=torch.long, device=reduced.device)
    first = first.scatter_reduce_(0, group, order, reduce="amin")[group]
    suspects = (first != order).nonzero().squeeze(1)
    if suspects.numel() < min_share * rows:
        return None
    equal = torch.cat([(reduced[part] == reduced[first[part]]).all(dim=1)
                       for part in suspects.split(CPU_DISTANCE_CHUNK_ROWS)])
    if int(equal.sum()) < min_share * rows:
        return None
    copies = suspects[equal]
    order[copies] = first[copies]
    return order


@dataclass(frozen=True)
class DropCopies:
    """Runs ``inner`` on the rows that are not exact copies of earlier rows (when at least ``min_share`` are).

    A copy always has its original's running minimum, so it can only be the farthest row when its original
    (earlier, hence first on ties) is too; once the original is selected, both minima are 0. The indices are
    therefore those of ``inner`` over every row.
    """

    inner: Selection
    min_share: float = MIN_COPY_SHARE

    def run(self, reduced: torch.Tensor, min_dist: torch.Tensor, n: int, progress: bool) -> torch.Tensor:
        kept = first_occurrences(reduced, self.min_share)
        if kept is None:
            return self.inner.run(reduced, min_dist, n, progress)
        chosen = self.inner.run(reduced[kept], min_dist[kept], n, progress)
        return kept.cpu()[chosen]


@dataclass(frozen=True)
class ShardedGreedy:
    """A faster option, not the reference: the rows are cut into ``shards`` contiguous blocks (groups of training
    samples) and each block gets its own ``inner`` selection of its share of the ``n`` rows, started at its first
    row. Every row is then within its block's covering radius; the cost falls about ``shards``-fold. Its effect on
    the metrics is measured in benchmarks/coreset.py.
    """

    inner: Selection
    shards: int

    def run(self, reduced: torch.Tensor, min_dist: torch.Tensor, n: int, progress: bool) -> torch.Tensor:
        shards = max(1, min(self.shards, reduced.shape[0], max(n, 1)))
        bounds = [round(i * reduced.shape[0] / shards) for i in range(shards + 1)]
        quotas = [round(i * max(n, 1) / shards) for i in range(shards + 1)]
        picked = []
        for block in range(shards):
            start, stop = bounds[block], bounds[block + 1]
            rows = reduced[start:stop]
            block_dist = row_distances(rows, rows[:1]) if rows.device.type == "cpu" else \
                torch.linalg.norm(rows - rows[:1], dim=1)
            count = quotas[block + 1] - quotas[block]
            picked.append(self.inner.run(rows, block_dist, count, progress) + start)
        return torch.cat(picked)


PAIRWISE_BLOCK_ENTRIES = 1 << 25  # distances held at once by ShardPairwise (shards x rows x rows, 128 MiB float32)


@dataclass(frozen=True)
class ShardPairwise:
    """An approximate mode, not the reference: exact copies left out first (:func:`first_occurrences`), then the
    distinct rows cut into contiguous shards of at most ``shard_rows`` rows, each with its own greedy selection of
    its share of the ``n`` rows, started at its first row, as :class:`ShardedGreedy`.

    The shards are small, so each one's distances between all its rows are taken once, as one batched float32
    matrix product (``|x|² + |y|² − 2 x·y`` of rows centred on their shard's mean), instead of the loop's float16
    difference per step; a step is then one gather, one minimum and one argmax over a block of shards at once.
    The work is ``distinct rows x shard_rows x dims``: linear in the bank for a fixed ``shard_rows``, and the
    Python steps number the largest quota of a shard, not ``n``. Its float32 distances round differently from the
    float16 ones of the loop, so where two rows nearly tie the choice may differ from :class:`ShardedGreedy`'s.
    """

    shard_rows: int

    def __post_init__(self) -> None:
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be at least 1, got {self.shard_rows}")

    def run(self, reduced: torch.Tensor, min_dist: torch.Tensor, n: int, progress: bool) -> torch.Tensor:
        kept = first_occurrences(reduced)
        rows = reduced if kept is None else reduced[kept]
        count = max(n, 1)
        shards = max(1, min(-(-rows.shape[0] // self.shard_rows), rows.shape[0], count))
        bounds = [round(i * rows.shape[0] / shards) for i in range(shards + 1)]
        quotas = [round(i * count / shards) for i in range(shards + 1)]
        size = max(b - a for a, b in itertools.pairwise(bounds))
        per_block = max(1, PAIRWISE_BLOCK_ENTRIES // (size * size))
        picked = []
        for first in tqdm(range(0, shards, per_block), desc="coreset shards", disable=not progress, leave=False):
            last = min(shards, first + per_block)
            picked.append(_pairwise_greedy(rows, bounds[first:last + 1], quotas[first:last + 1], size))
        chosen = torch.cat(picked)
        return chosen if kept is None else kept.cpu()[chosen]


def _pairwise_greedy(rows: torch.Tensor, bounds: list[int], quotas: list[int], size: int) -> torch.Tensor:
    """The greedy selections of the shards ``bounds[i]:bounds[i + 1]`` of ``rows`` (``quotas[i + 1] − quotas[i]``
    rows each), all at once: indices into ``rows``, shard after shard."""
    shards = len(bounds) - 1
    block = torch.zeros((shards, size, rows.shape[1]), dtype=torch.float32)
    valid = torch.zeros((shards, size), dtype=torch.bool)
    for i in range(shards):
        part = rows[bounds[i]:bounds[i + 1]].to("cpu", torch.float32)
        block[i, :part.shape[0]] = part - part.mean(dim=0)  # centred: less cancellation in the expansion
        valid[i, :part.shape[0]] = True
    squared = block.square().sum(dim=2)
    dist = torch.baddbmm(squared.unsqueeze(2) + squared.unsqueeze(1), block, block.transpose(1, 2), alpha=-2)
    dist = dist.clamp_min_(0).sqrt_()
    dist.diagonal(dim1=1, dim2=2).zero_()
    steps = max(b - a for a, b in itertools.pairwise(quotas))
    every = torch.arange(shards)
    running = torch.where(valid, dist[:, 0], torch.tensor(-1.0))  # padding never chosen
    selected = torch.zeros((shards, max(steps, 1)), dtype=torch.long)
    for step in range(1, steps):
        last = torch.argmax(running, dim=1)  # the first of the farthest rows of every shard
        selected[:, step] = last
        torch.minimum(running, dist[every, last], out=running)
    return torch.cat([selected[i, :quotas[i + 1] - quotas[i]] + bounds[i] for i in range(shards)])


@dataclass(frozen=True)
class GreedyCoreset:
    """The reference's ``get_coreset_idx_randomp``: project, start at row 0 and add ``n − 1`` rows, each the
    farthest (first on ties) from the rows already chosen, found by ``selection``.

    ``device`` holds the projected bank (the reference: CUDA when available). ``fp16=True`` (COMPAT) keeps the
    projected bank and the running minima in float16 as the reference; ``fp16=False`` keeps the projection's
    precision (float64).
    """

    selection: Selection
    device: torch.device | str
    fp16: bool = True
    project_copies_once: bool = False  # project each chunk's distinct rows only (the same values, less work)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))

    def select(self, features: ArrayLike, n: int, eps: float = 0.9, random_state=None,
               progress: bool = True) -> torch.Tensor:
        """Indices (CPU LongTensor of ``max(n, 1)``; ``n < 1`` gives ``[0]``, like the reference) of the rows of
        ``features`` (a tensor, an array or anything sliced like one) projected with ``eps`` and ``random_state``
        (None: NumPy's global generator, as the reference)."""
        features = as_tensor(features)
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"the coreset needs a non-empty (rows, dim) bank, got {tuple(features.shape)}")
        projector = fit_sparse_random_projection(features.shape[0], features.shape[1], eps, random_state)
        reduced, min_dist = _project_for_coreset(features, projector, torch.float16 if self.fp16 else None,
                                                 self.device, self.project_copies_once)
        return self.selection.run(reduced, min_dist, n, progress)


def _project_for_coreset(features: torch.Tensor, projector: SparseRandomProjection | None,
                         store_dtype: torch.dtype | None, device: torch.device | str, copies_once: bool = False):
    """Projected bank and the distances of every row to row 0, both in ``store_dtype`` on ``device``.

    The distances to row 0 are taken in the projection's precision before the cast, as in the reference.
    ``copies_once``: each chunk's exact copies take their first row's projection instead of their own (the sparse
    product projects every row on its own, so the values are the same).
    """
    first = project_rows(features[:1], projector)
    dtype = store_dtype or first.dtype
    reduced = torch.empty((features.shape[0], first.shape[1]), dtype=dtype, device=device)
    min_dist = torch.empty(features.shape[0], dtype=dtype, device=device)
    chunks = _distinct_projection_chunks(features, projector) if copies_once else projection_chunks(features, projector)
    for start, chunk in chunks:
        stop = start + chunk.shape[0]
        # computed and cast where the projection lives (the CPU), then moved, as the reference
        min_dist[start:stop] = torch.linalg.vector_norm(chunk - first, dim=1).to(dtype).to(device)
        reduced[start:stop] = chunk.to(dtype).to(device)
    return reduced, min_dist


def _distinct_projection_chunks(features: torch.Tensor, projector: SparseRandomProjection | None
                                ) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`projection_chunks`, each chunk's distinct rows projected once and copied to their exact copies."""
    for start, stop in projection_bounds(features):
        chunk = as_tensor(features[start:stop])
        sources = copy_sources(chunk)
        if sources is None:
            yield start, project_rows(chunk, projector)
            continue
        distinct = (sources == torch.arange(chunk.shape[0])).nonzero().squeeze(1)
        projected = project_rows(chunk[distinct], projector)
        full = torch.empty((chunk.shape[0], projected.shape[1]), dtype=projected.dtype)
        full[distinct] = projected
        yield start, full[sources]
