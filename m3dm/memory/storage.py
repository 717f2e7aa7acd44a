"""Where a memory bank's training patches live before it is built: sample storage, running moments, zero filter."""

from __future__ import annotations

import bisect
import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from m3dm.data.io import disk_writes

ArrayLike = np.ndarray | torch.Tensor


def as_tensor(features: ArrayLike) -> torch.Tensor:
    """A NumPy array as a tensor sharing its memory; anything else unchanged (tensors, :class:`NormalisedRows`)."""
    return torch.from_numpy(np.asarray(features)) if isinstance(features, np.ndarray) else features


class RunningMoments:
    """Mean and unbiased variance over every element added, merged per sample in float64 (Chan et al.)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        block = values.detach().to(torch.float64)
        count, mean = block.numel(), float(block.mean())
        m2 = float((block - mean).square().sum())
        delta, total = mean - self.mean, self.count + count
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def mean_std(self) -> tuple[float, float]:
        if self.count == 0:
            raise ValueError("no values collected")
        variance = self.m2 / (self.count - 1) if self.count > 1 else math.nan
        return float(np.float32(self.mean)), float(np.float32(math.sqrt(variance)))


def rows_without_zeros(bank: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
    """Keep rows with no exact-zero entry (the reference's ``rm_zero`` filter), order preserved."""
    if bank.shape[0] == 0:
        return bank
    keep = torch.cat([(bank[i:i + chunk_rows] != 0).all(dim=1) for i in range(0, bank.shape[0], chunk_rows)])
    return bank[keep]


class SampleStore:
    """The raw float32 patches of every added sample, in order: in memory, or appended to an anonymous file.

    On disk (``spool_dir`` given) the rows live in an unlinked temporary file in that folder (gone when the store
    is cleared or the process ends, even after a crash), so a bank of any size costs no host memory until it is
    read back, chunk by chunk. Reads return fresh float32 tensors either way.
    """

    def __init__(self, spool_dir: str | Path | None = None) -> None:
        self.spool_dir = None if spool_dir is None else Path(spool_dir)
        self._tensors: list[torch.Tensor] = []
        self._file: io.BufferedRandom | None = None
        self._starts = [0]  # first row of every sample, then the total
        self._dim = 0

    def __len__(self) -> int:
        return len(self._starts) - 1

    @property
    def rows(self) -> int:
        return self._starts[-1]

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def on_disk(self) -> bool:
        return self.spool_dir is not None

    @property
    def file_open(self) -> bool:
        """Whether the spool file exists (from the first append on disk until ``clear``)."""
        return self._file is not None

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float32)
        self._dim = rows.shape[1]
        if self.spool_dir is not None:
            if self._file is None:
                self.spool_dir.mkdir(parents=True, exist_ok=True)
                # kept open across calls (closed by clear): the file has no name to reopen it by
                self._file = tempfile.TemporaryFile(dir=self.spool_dir, prefix="m3dm-bank-")  # noqa: SIM115
            self._file.seek(0, os.SEEK_END)
            with disk_writes(self.spool_dir):  # --spool_dir full: one line naming it, not numpy's message
                self._file.write(np.ascontiguousarray(rows.numpy()).tobytes())
                self._file.flush()
        else:
            self._tensors.append(rows.clone())
        self._starts.append(self._starts[-1] + rows.shape[0])

    def sample(self, index: int) -> torch.Tensor:
        return self.read(self._starts[index], self._starts[index + 1])

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the concatenation of every sample."""
        start, stop = max(0, start), min(stop, self.rows)
        out = torch.empty((max(0, stop - start), self._dim), dtype=torch.float32)
        if out.shape[0] == 0:
            return out
        if self._file is not None:  # on disk (the file exists from the first row on)
            self._file.flush()
            self._file.seek(start * self._dim * 4)
            if self._file.readinto(out.numpy().data.cast("B")) != out.numel() * 4:
                raise OSError(f"the memory-bank spool file in {self.spool_dir} was truncated")
            return out
        first = bisect.bisect_right(self._starts, start) - 1
        filled = 0
        for tensor, offset in zip(self._tensors[first:], self._starts[first:]):
            part = tensor[max(0, start - offset):stop - offset]
            out[filled:filled + part.shape[0]] = part
            filled += part.shape[0]
            if filled == out.shape[0]:
                break
        return out

    def take(self, indices: torch.Tensor, chunk_rows: int = 16384) -> torch.Tensor:
        """The rows at ``indices`` (any order, repeats allowed), read in one sequential sweep."""
        indices = indices.to("cpu", torch.long)
        out = torch.empty((indices.numel(), self._dim), dtype=torch.float32)
        order = torch.argsort(indices)
        ordered = indices[order]
        bounds = torch.searchsorted(ordered, torch.arange(0, self.rows + chunk_rows, chunk_rows))
        for chunk, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
            if lo < hi:
                start = chunk * chunk_rows
                out[order[lo:hi]] = self.read(start, start + chunk_rows)[ordered[lo:hi] - start]
        return out

    def clear(self) -> None:
        self._tensors.clear()
        self._starts = [0]
        if self._file is not None:
            self._file.close()
            self._file = None


def evenly_spaced_rows(patches: torch.Tensor, cap: int) -> torch.Tensor:
    """Indices (sorted) of at most ``cap`` rows of one sample's ``patches``: its empty rows (all zero: no point
    behind the patch) count as one, the first, and of the rows left ``cap`` evenly spaced ones are kept."""
    empty = (patches == 0).all(dim=1)
    candidates = (~empty).nonzero().squeeze(1)
    if bool(empty.any()):
        first_empty = empty.nonzero()[0]
        candidates = torch.sort(torch.cat((candidates, first_empty))).values
    if candidates.numel() <= cap:
        return candidates
    return candidates[torch.arange(cap) * candidates.numel() // cap]


class NormalisedRows:
    """The stored rows as ``(x − mean) / std`` (float32, the reference's ops), read lazily by slice or index.

    Stands in for the concatenated bank wherever a tensor is sliced (the coreset's projection, ``rows[idx]``),
    so the full normalised bank is never held at once. ``subset`` (sorted row indices into the store): only those
    rows, in that order.
    """

    def __init__(self, store: SampleStore, mean: torch.Tensor | None, std: torch.Tensor | None,
                 subset: torch.Tensor | None = None) -> None:
        self.store, self.mean, self.std, self.subset = store, mean, std, subset
        self.shape = (store.rows if subset is None else subset.numel(), store.dim)
        self.ndim = 2

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("NormalisedRows supports contiguous slices only")
            rows = self.store.read(start, stop) if self.subset is None else self.store.take(self.subset[start:stop])
        else:
            index = torch.as_tensor(key)
            rows = self.store.take(index if self.subset is None else self.subset[index])
        if self.mean is not None and self.std is not None:  # both or neither
            rows.sub_(self.mean).div_(self.std)  # same float32 ops as the reference's (x - mean) / std
        return rows
