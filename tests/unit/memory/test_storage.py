"""Sample storage (memory or spool file) against plain concatenation; the running moments and the zero filter."""

from __future__ import annotations

import math

import pytest
import torch

from m3dm.memory.storage import NormalisedRows, RunningMoments, SampleStore, evenly_spaced_rows, rows_without_zeros


def store_of(samples: list[torch.Tensor], spool_dir=None) -> SampleStore:
    store = SampleStore(spool_dir)
    for sample in samples:
        store.append(sample)
    return store


def test_sample_store_on_disk_reads_like_memory(tmp_path):
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randn(rows, 12, generator=generator) for rows in (5, 17, 1, 30)]
    stores = [store_of(samples), store_of(samples, tmp_path)]
    everything = torch.cat(samples)
    picks = torch.tensor([52, 0, 4, 5, 21, 21, 3, 22, 51])
    for store in stores:
        assert (len(store), store.rows) == (4, 53)
        assert all(torch.equal(store.sample(i), s) for i, s in enumerate(samples))
        for start, stop in ((0, 53), (3, 9), (4, 23), (22, 23), (50, 80)):
            assert torch.equal(store.read(start, stop), everything[start:stop])
        for chunk_rows in (1, 7, 4096):
            assert torch.equal(store.take(picks, chunk_rows=chunk_rows), everything[picks])
    assert stores[1].on_disk and list(tmp_path.iterdir()) == []  # unlinked temporary file
    assert stores[1].file_open
    stores[1].clear()
    assert not stores[1].file_open and len(stores[1]) == 0


def test_normalised_rows_equal_normalising_the_concatenation():
    generator = torch.Generator().manual_seed(1)
    samples = [torch.randn(rows, 6, generator=generator) * 3 + 1 for rows in (4, 9, 2)]
    store = store_of(samples)
    mean, std = torch.tensor(0.7), torch.tensor(2.5)
    rows = NormalisedRows(store, mean, std)
    expected = (torch.cat(samples) - mean) / std
    assert rows.shape == (15, 6)
    assert torch.equal(rows[0:15], expected) and torch.equal(rows[3:11], expected[3:11])
    assert torch.equal(rows[torch.tensor([14, 0, 5])], expected[[14, 0, 5]])
    assert torch.equal(NormalisedRows(store, None, None)[0:15], torch.cat(samples))
    with pytest.raises(IndexError):
        rows[0:15:2]
    subset = torch.tensor([1, 2, 6, 7, 13])
    some = NormalisedRows(store, mean, std, subset)
    assert some.shape == (5, 6)
    assert torch.equal(some[0:5], expected[subset]) and torch.equal(some[1:3], expected[subset[1:3]])
    assert torch.equal(some[torch.tensor([4, 0])], expected[subset[[4, 0]]])


def test_evenly_spaced_rows_count_the_empty_rows_once():
    patches = torch.arange(1, 21, dtype=torch.float32).repeat(3, 1).T.contiguous()  # 20 distinct rows
    patches[[0, 3, 4, 5, 9]] = 0  # five empty patches: the first of them, row 0, stands for all
    assert torch.equal(evenly_spaced_rows(patches, 100), torch.tensor([0, 1, 2, 6, 7, 8, *range(10, 20)]))
    kept = evenly_spaced_rows(patches, 4)
    assert torch.equal(kept, torch.tensor([0, 7, 12, 16]))  # every 4th of the 16 candidates, from the first
    assert torch.equal(evenly_spaced_rows(patches[1:3], 1), torch.tensor([0]))


def test_running_moments_equal_the_concatenations():
    generator = torch.Generator().manual_seed(2)
    parts = [torch.randn(rows, 5, generator=generator) * 4 + 10 for rows in (3, 50, 1)]
    moments = RunningMoments()
    for part in parts:
        moments.add(part)
    moments.add(torch.zeros(0, 5))  # an empty sample changes nothing
    everything = torch.cat(parts).double()
    mean, std = moments.mean_std()
    assert mean == pytest.approx(float(everything.mean()), rel=1e-6)
    assert std == pytest.approx(float(everything.std()), rel=1e-6)
    single = RunningMoments()
    single.add(torch.ones(1, 1))
    assert math.isnan(single.mean_std()[1])
    with pytest.raises(ValueError):
        RunningMoments().mean_std()


def test_rows_without_zeros_keeps_the_rows_with_no_zero_entry_in_order():
    bank = torch.arange(1, 41, dtype=torch.float32).reshape(10, 4)
    bank[[1, 4, 9], [0, 3, 2]] = 0
    expected = bank[[0, 2, 3, 5, 6, 7, 8]]
    for chunk_rows in (1, 3, 65536):
        assert torch.equal(rows_without_zeros(bank, chunk_rows=chunk_rows), expected)
    assert rows_without_zeros(torch.zeros(0, 4)).shape == (0, 4)
