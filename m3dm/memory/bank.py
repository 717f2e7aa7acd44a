"""The memory bank every method uses (quirks 26–29, 33): collect patches, build once, score test patches.

One :class:`MemoryBank` serves every modality (RGB, xyz, fusion): it collects patch features sample by sample,
is normalised with scalar statistics chosen by the caller (the reference mixes the banks' statistics, quirk 26;
see :class:`BankRecipe`), subsampled by the greedy coreset of the reference (a coreset strategy,
:mod:`m3dm.memory.coreset`) and scores test patches by nearest-neighbour distance (a search strategy,
:mod:`m3dm.memory.search`) with the reference's re-weighting. The strategies are injected; the defaults
(:mod:`m3dm.memory.defaults`) give the reference's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from m3dm.memory.coreset import GreedyCoreset
from m3dm.memory.defaults import default_coreset, default_search
from m3dm.memory.search import NeighbourSearch, reweighted_score
from m3dm.memory.storage import (
    ArrayLike,
    NormalisedRows,
    RunningMoments,
    SampleStore,
    as_tensor,
    evenly_spaced_rows,
    rows_without_zeros,
)


@dataclass(frozen=True)
class BankRecipe:
    """How :meth:`MemoryBank.finalize` builds the bank: concatenate, ``(x − mean)/std``, zero filter, coreset,
    zero filter, zero row.

    ``mean``/``std``: scalars to normalise with (None: no normalisation). Coreset size: ``n_coreset`` rows, or
    ``int(f_coreset · rows)`` of the rows present at that point when ``f_coreset < 1`` (none when ≥ 1; neither:
    no coreset). ``drop_zero_rows_before``/``_after`` keep only rows without an exact zero, before/after the
    coreset; ``append_zero_row`` adds one all-zero row last. ``keep_samples`` keeps the raw per-sample patches
    readable with ``MemoryBank.sample``. ``projection_eps`` and ``random_state`` fit the coreset's sparse random
    projection (``random_state=None`` draws from NumPy's global generator, as the reference).
    """

    mean: float | None = None
    std: float | None = None
    n_coreset: int | None = None
    f_coreset: float | None = None
    drop_zero_rows_before: bool = False
    drop_zero_rows_after: bool = False
    append_zero_row: bool = False
    keep_samples: bool = False
    projection_eps: float = 0.9
    random_state: object = None  # None, an int or a numpy RandomState, as scikit-learn takes it

    def __post_init__(self) -> None:
        if self.n_coreset is not None and self.f_coreset is not None:
            raise ValueError("give n_coreset or f_coreset, not both")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")

    def coreset_size(self, rows: int) -> int | None:
        """Rows the coreset keeps of ``rows`` (None: no coreset)."""
        if self.f_coreset is not None and self.f_coreset < 1:
            return int(self.f_coreset * rows)
        return self.n_coreset


class MemoryBank:
    """Patch features of one modality: collected per training sample, then normalised and coreset-reduced.

    Usage: ``add`` each sample's ``(P, D)`` patches; read ``stats()`` (of the raw patches) and pass the statistics
    the method calls for to ``finalize`` in a :class:`BankRecipe`; then ``score`` test patches. The added patches
    are kept as float32 in host memory, or in a temporary file in ``spool_dir`` (:class:`SampleStore`); the
    finalised bank is float32 on ``storage_device``. Either way the full normalised bank is never built: the
    coreset reads it in chunks. ``coreset`` and ``search`` are the strategies (defaults:
    :func:`m3dm.memory.defaults.default_coreset` and ``default_search(storage_device)``); a search object serves
    one bank. ``max_rows_per_sample`` (approximate mode, None: every row): the bank is built from at most that
    many rows of each sample (:func:`m3dm.memory.storage.evenly_spaced_rows`); ``rows`` counts those, ``stats``
    and ``sample`` still see every row.
    """

    def __init__(self, storage_device: str | torch.device = "cpu", spool_dir: str | Path | None = None,
                 coreset: GreedyCoreset | None = None, search: NeighbourSearch | None = None,
                 max_rows_per_sample: int | None = None) -> None:
        if max_rows_per_sample is not None and max_rows_per_sample < 1:
            raise ValueError(f"max_rows_per_sample must be at least 1, got {max_rows_per_sample}")
        self.storage_device = torch.device(storage_device)
        self.max_rows_per_sample = max_rows_per_sample
        self._kept_rows: list[torch.Tensor] = []  # with a cap: the rows of each sample the bank is built from
        self.coreset = coreset if coreset is not None else default_coreset()
        self.search = search if search is not None else default_search(self.storage_device)
        self._store = SampleStore(spool_dir)
        self._sample_rows: list[int] = []
        self._moments = RunningMoments()
        self._dim: int | None = None
        self._bank: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None  # normalisation applied by finalize/score (float32 scalars)
        self.std: torch.Tensor | None = None
        self.coreset_idx: torch.Tensor | None = None

    # -- collection ---------------------------------------------------------------------------------------------
    def add(self, patches: ArrayLike) -> None:
        """Append one sample's patches ``(P, D)`` (copied, float32)."""
        if self._bank is not None:
            raise RuntimeError("MemoryBank.add after finalize")
        patches = as_tensor(patches)
        if patches.ndim != 2:
            raise ValueError(f"expected (patches, dim), got {tuple(patches.shape)}")
        if self._dim is not None and patches.shape[1] != self._dim:
            raise ValueError(f"feature dim {patches.shape[1]} differs from the bank's {self._dim}")
        self._dim = patches.shape[1]
        rows = patches.detach().to("cpu", torch.float32)
        if self.max_rows_per_sample is not None:
            first = sum(self._sample_rows)
            self._kept_rows.append(evenly_spaced_rows(rows, self.max_rows_per_sample) + first)
        self._store.append(rows)
        self._sample_rows.append(rows.shape[0])
        self._moments.add(rows)

    @property
    def n_samples(self) -> int:
        return len(self._sample_rows)

    @property
    def sample_rows(self) -> list[int]:
        return list(self._sample_rows)

    @property
    def rows(self) -> int:
        """Rows of the built bank; before ``finalize``, the rows it will be built from."""
        if self._bank is not None:
            return self._bank.shape[0]
        if self.max_rows_per_sample is not None:
            return sum(kept.numel() for kept in self._kept_rows)
        return sum(self._sample_rows)

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def finalized(self) -> bool:
        return self._bank is not None

    @property
    def bank(self) -> torch.Tensor:
        if self._bank is None:
            raise RuntimeError("MemoryBank.bank before finalize")
        return self._bank

    def stats(self) -> tuple[float, float]:
        """``(mean, unbiased std)`` over every element added (raw patches), rounded to float32.

        Accumulated per added sample in float64 (no concatenated copy); agrees with ``torch.mean``/``torch.std``
        of the float32 concatenation to float32 rounding (the float64 value is the more accurate one).
        """
        return self._moments.mean_std()

    # -- construction -------------------------------------------------------------------------------------------
    def sample(self, index: int) -> torch.Tensor:
        """The raw (unnormalised) patches of the ``index``-th added sample; after ``finalize`` only while the
        samples are kept (``BankRecipe(keep_samples=True)``, until ``release_samples``)."""
        if not 0 <= index < len(self._store):
            raise RuntimeError(f"sample {index} of the bank is not available (released after finalize, or never "
                               f"added: {self.n_samples} samples)")
        return self._store.sample(index)

    def release_samples(self) -> None:
        """Free the per-sample rows kept for pass 2 (memory or spool file)."""
        self._store.clear()

    def finalize(self, recipe: BankRecipe | None = None, progress: bool = True) -> torch.Tensor:
        """Build the bank as ``recipe`` says (default: every row, unnormalised) with the bank's coreset strategy;
        returns it and prepares the search strategy on it."""
        recipe = recipe if recipe is not None else BankRecipe()
        if self._bank is not None:
            raise RuntimeError("MemoryBank.finalize called twice")
        if self.n_samples == 0:
            raise RuntimeError("MemoryBank.finalize on an empty bank")
        if recipe.mean is not None:
            self.mean = torch.tensor(recipe.mean, dtype=torch.float32, device=self.storage_device)
            self.std = torch.tensor(recipe.std, dtype=torch.float32, device=self.storage_device)
        # the stored rows are on the host, so they are normalised there (IEEE float32 subtract and divide give the
        # same bits on any device); the coreset moves its chunks to its own device
        host = (lambda t: None if t is None else t.cpu())
        # NormalisedRows stands in for the normalised bank tensor wherever it is sliced (read lazily)
        subset = torch.cat(self._kept_rows) if self.max_rows_per_sample is not None else None
        rows = cast(torch.Tensor, NormalisedRows(self._store, host(self.mean), host(self.std), subset))
        if recipe.drop_zero_rows_before:
            rows = rows_without_zeros(rows[0:rows.shape[0]])
        n_coreset = recipe.coreset_size(rows.shape[0])
        if n_coreset is not None:
            self.coreset_idx = self.coreset.select(rows, n_coreset, eps=recipe.projection_eps,
                                                   random_state=recipe.random_state, progress=progress)
            bank = rows[self.coreset_idx]
        else:
            bank = rows[0:rows.shape[0]]
        if not recipe.keep_samples:
            self._store.clear()
        bank = bank.to(self.storage_device)
        if recipe.drop_zero_rows_after:
            bank = rows_without_zeros(bank)
        if recipe.append_zero_row:
            bank = torch.cat((bank, bank.new_zeros(1, bank.shape[1])))
        self._bank = bank
        self.search.fit(bank)
        return bank

    # -- scoring ------------------------------------------------------------------------------------------------
    def normalise(self, patches: ArrayLike) -> torch.Tensor:
        """Patches as float32 on the bank's device, normalised with finalize's statistics when it had any."""
        patches = as_tensor(patches).to(self.storage_device, torch.float32)
        return patches if self.mean is None or self.std is None else (patches - self.mean) / self.std

    def score(self, patches: ArrayLike, normalise: bool = True, eps: float = 0.0, divisor: float = 1.0,
              n_reweight: int = 3) -> tuple[float, torch.Tensor]:
        """``(image score, per-patch nearest distances (P,))`` of one sample's patches.

        ``normalise`` applies finalize's ``mean``/``std`` (a no-op for a bank finalised without them); ``eps`` and
        ``divisor`` as in :func:`m3dm.memory.search.reweighted_score`. The distances are the undivided ones (for
        the map). The search is told which patches are empty (all zero before normalisation: all one row).
        """
        if self._bank is None:
            raise RuntimeError("MemoryBank.score before finalize")
        raw = as_tensor(patches)
        x = self.normalise(raw) if normalise else raw.to(self.storage_device, torch.float32)
        empty = (raw == 0).all(dim=1).to(x.device) if raw.ndim == 2 else None
        min_dist, nn_idx = self.search.search(x, empty)
        return reweighted_score(x, self.bank, min_dist, nn_idx, n_reweight, eps, divisor), min_dist

    # -- saving and loading (m3dm.detection.persistence) --------------------------------------------------------
    def export_state(self) -> dict:
        """The finalised bank, its normalisation scalars and coreset indices, as CPU tensors and primitives."""
        def cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.detach().cpu()

        return {"bank": cpu(self.bank), "mean": cpu(self.mean), "std": cpu(self.std),
                "coreset_idx": cpu(self.coreset_idx), "sample_rows": self.sample_rows}

    @classmethod
    def from_state(cls, state: dict, storage_device: str | torch.device = "cpu",
                   search: NeighbourSearch | None = None) -> MemoryBank:
        """A finalised bank that scores exactly like the one ``export_state`` was taken from."""
        rows = state["bank"]
        if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or rows.dtype != torch.float32:
            raise ValueError("a saved memory bank must be a (rows, dim) float32 tensor")
        if (state["mean"] is None) != (state["std"] is None):
            raise ValueError("a saved memory bank must have both mean and std, or neither")
        bank = cls(storage_device, search=search)
        bank._bank = rows.to(bank.storage_device)
        bank._dim = rows.shape[1]
        bank._sample_rows = list(state.get("sample_rows", []))
        if state["mean"] is not None:
            bank.mean = state["mean"].to(bank.storage_device, torch.float32)
            bank.std = state["std"].to(bank.storage_device, torch.float32)
        bank.coreset_idx = state.get("coreset_idx")
        bank.search.fit(bank._bank)
        return bank
