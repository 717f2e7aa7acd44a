"""MemoryBank (collect, build with a recipe, score) against the straightforward concatenate → normalise →
coreset → index path and the NumPy oracles; its strategies against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from memory_oracles import clustered, default_indices, hand_score, numpy_coreset

from m3dm.memory.bank import BankRecipe, MemoryBank
from m3dm.memory.coreset import GreedyCoreset, PlainGreedy
from m3dm.memory.defaults import default_coreset
from m3dm.memory.screened import ScreenedSearch, bf16_matmul_is_fast
from m3dm.memory.search import ExactSearch, SharedEmptyRows, nearest_neighbours
from m3dm.memory.storage import evenly_spaced_rows


def filled_bank(seed: int, sizes=(50, 70, 30), dim: int = 40, offset: float = 3.0, **bank_args
                ) -> tuple[MemoryBank, list]:
    rng = np.random.default_rng(seed)
    samples = [torch.from_numpy((rng.normal(offset, 2.5, (n, dim))).astype(np.float32)) for n in sizes]
    bank = MemoryBank(**bank_args)
    for sample in samples:
        bank.add(sample)
    return bank, samples


def cpu_bank(**bank_args) -> MemoryBank:
    return MemoryBank(coreset=default_coreset("cpu"), **bank_args)


def test_default_strategies_are_the_factories():
    bank = MemoryBank()
    assert bank.coreset == default_coreset()
    assert isinstance(bank.search, SharedEmptyRows)
    assert isinstance(bank.search.inner, ScreenedSearch if bf16_matmul_is_fast() else ExactSearch)


def test_stats_equal_torch_over_the_concatenation():
    bank, samples = filled_bank(0)
    everything = torch.cat(samples)
    mean, std = bank.stats()
    assert mean == pytest.approx(float(torch.mean(everything)), rel=1e-6)
    assert std == pytest.approx(float(torch.std(everything)), rel=1e-6)
    assert np.float32(mean) == mean and np.float32(std) == std  # float32 values, as the reference's tensors
    assert (bank.n_samples, bank.sample_rows, bank.rows, bank.dim) == (3, [50, 70, 30], 150, 40)


def test_finalize_normalises_with_the_given_statistics():
    bank, samples = filled_bank(1)
    other, _ = filled_bank(2, offset=-1.0)
    mean, _ = other.stats()
    raw_stats = bank.stats()
    std = raw_stats[1]  # mixed statistics, as the reference's multimodal methods
    built = bank.finalize(BankRecipe(mean, std), progress=False)
    everything = torch.cat(samples)
    expected = (everything - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    assert torch.equal(built, expected)
    assert bank.stats() == raw_stats  # statistics stay those of the raw patches


def test_finalize_without_normalisation_and_coreset_keeps_the_rows():
    bank, samples = filled_bank(3)
    assert torch.equal(bank.finalize(progress=False), torch.cat(samples))
    with pytest.raises(RuntimeError):
        bank.add(samples[0])
    with pytest.raises(RuntimeError):
        bank.finalize(progress=False)


def test_add_copies_and_validates():
    bank = MemoryBank()
    sample = torch.ones(4, 3)
    bank.add(sample)
    sample.zero_()
    with pytest.raises(ValueError):
        bank.add(torch.ones(4, 5))
    with pytest.raises(ValueError):
        bank.add(torch.ones(1, 4, 3))
    assert torch.equal(bank.finalize(progress=False), torch.ones(4, 3))


def with_zero_entries(samples: list, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for sample in samples:
        sample = sample.clone()
        sample[rng.random(sample.shape[0]) < 0.3, rng.integers(0, sample.shape[1])] = 0
        sample[:3] = 0  # empty patches
        out.append(sample)
    return out


def zero_entry_bank(seed: int) -> tuple[MemoryBank, list]:
    """A CPU bank of three samples (200 dims) with exact zeros: some entries, and three empty patches each."""
    _, samples = filled_bank(seed, dim=200, sizes=(120, 150, 130))
    samples = with_zero_entries(samples, seed)
    bank = cpu_bank()
    for sample in samples:
        bank.add(sample)
    return bank, samples


def test_zero_rows_before_and_after_the_coreset():
    bank, samples = zero_entry_bank(4)
    recipe = BankRecipe(f_coreset=0.1, random_state=0, drop_zero_rows_before=True, drop_zero_rows_after=True,
                        append_zero_row=True)
    built = bank.finalize(recipe, progress=False)
    everything = torch.cat(samples)
    kept = everything[(everything != 0).all(dim=1)]
    assert kept.shape[0] < everything.shape[0]
    idx = numpy_coreset(kept.numpy(), int(0.1 * kept.shape[0]), 0, fp16=True)
    assert torch.equal(built[:-1], kept[idx])
    assert torch.equal(built[-1], torch.zeros(200))
    assert built.shape[0] == int(0.1 * kept.shape[0]) + 1


def test_zero_filter_after_normalisation_and_explicit_coreset_size():
    bank, samples = zero_entry_bank(5)
    mean, std = bank.stats()
    recipe = BankRecipe(mean, std, n_coreset=33, random_state=1, drop_zero_rows_after=True, append_zero_row=True)
    built = bank.finalize(recipe, progress=False)
    normalised = (torch.cat(samples) - torch.tensor(mean)) / torch.tensor(std)
    selected = normalised[numpy_coreset(normalised.numpy(), 33, 1, fp16=True)]
    assert torch.equal(built[:-1], selected[(selected != 0).all(dim=1)])
    assert torch.equal(bank.coreset_idx, torch.tensor(numpy_coreset(normalised.numpy(), 33, 1, fp16=True)))


def test_coreset_fraction_of_one_or_more_keeps_every_row():
    bank, samples = filled_bank(6)
    assert torch.equal(bank.finalize(BankRecipe(f_coreset=1.0), progress=False), torch.cat(samples))
    assert bank.coreset_idx is None


def test_the_injected_coreset_strategy_builds_the_bank():
    x = torch.from_numpy(clustered(11, rows=300, dim=256))
    plain = GreedyCoreset(PlainGreedy(block_rows=50), "cpu", fp16=False)
    bank = MemoryBank(coreset=plain)
    bank.add(x)
    built = bank.finalize(BankRecipe(n_coreset=25, random_state=4, projection_eps=0.7), progress=False)
    expected = plain.select(x, 25, eps=0.7, random_state=4, progress=False)
    assert torch.equal(bank.coreset_idx, expected) and torch.equal(built, x[expected])
    assert not torch.equal(expected, default_indices(x, 25, random_state=4))  # eps 0.7 projects otherwise


def test_score_normalises_and_reweights():
    bank, _ = filled_bank(6, dim=200, sizes=(120, 150, 130), coreset=default_coreset("cpu"))
    mean, std = bank.stats()
    built = bank.finalize(BankRecipe(mean, std, f_coreset=0.2, random_state=2), progress=False)
    rng = np.random.default_rng(60)
    patches = torch.from_numpy(rng.normal(3.0, 3.0, (49, 200)).astype(np.float32))
    score, min_dist = bank.score(patches, eps=1e-5)
    normalised = (patches - torch.tensor(mean)) / torch.tensor(std)
    assert torch.equal(min_dist, torch.cdist(normalised, built).min(dim=1).values)
    expected, _ = hand_score(normalised.double().numpy(), built.double().numpy(), eps=1e-5)
    assert score == pytest.approx(expected, rel=1e-5)
    raw_score, raw_dist = bank.score(normalised, normalise=False, divisor=1000.0)
    assert torch.equal(raw_dist, min_dist)
    expected, _ = hand_score(normalised.double().numpy(), built.double().numpy(), divisor=1000.0)
    assert raw_score == pytest.approx(expected, rel=1e-5)


def test_finalize_argument_checks():
    with pytest.raises(ValueError):
        BankRecipe(n_coreset=3, f_coreset=0.1)
    with pytest.raises(ValueError):
        BankRecipe(mean=1.0)
    with pytest.raises(RuntimeError):
        MemoryBank().finalize()
    with pytest.raises(RuntimeError):
        _ = MemoryBank().bank
    with pytest.raises(RuntimeError, match="before finalize"):
        MemoryBank().score(torch.ones(3, 4))


@pytest.mark.parametrize("n_coreset", [None, 37])
def test_bank_on_disk_equals_the_straightforward_concatenation(tmp_path, n_coreset):
    """Pins the chunked, spooled construction against concatenate → normalise → coreset → index."""
    samples = [torch.from_numpy(clustered(seed, rows=120, dim=48)) for seed in range(4)]
    everything = torch.cat(samples)
    mean, std = 0.25, 1.5
    expected = (everything - torch.tensor(mean)) / torch.tensor(std)
    if n_coreset is not None:
        expected = expected[default_indices(expected, n_coreset, random_state=2)]
    for spool in (None, tmp_path):
        bank = cpu_bank(spool_dir=spool)
        for sample in samples:
            bank.add(sample)
        recipe = BankRecipe(mean, std, n_coreset=n_coreset, random_state=2, keep_samples=True)
        built = bank.finalize(recipe, progress=False)
        assert torch.equal(built, expected)
        assert torch.equal(bank.sample(2), samples[2])  # kept for pass 2, raw
        bank.release_samples()
        with pytest.raises(RuntimeError, match="not available"):
            bank.sample(0)


def test_a_row_cap_builds_the_bank_from_the_capped_rows_and_keeps_the_samples_whole(tmp_path):
    samples = [torch.from_numpy(clustered(seed, rows=120, dim=48)) for seed in range(3)]
    samples[1][10:50] = 0  # empty patches, which count as one row
    mean, std = 0.25, 1.5
    for spool in (None, tmp_path):
        bank = MemoryBank("cpu", spool_dir=spool, coreset=default_coreset("cpu"), max_rows_per_sample=30)
        for sample in samples:
            bank.add(sample)
        assert bank.rows == 90 and bank.sample_rows == [120] * 3
        capped = torch.cat([sample[evenly_spaced_rows(sample, 30)] for sample in samples])
        expected = (capped - torch.tensor(mean)) / torch.tensor(std)
        built = bank.finalize(BankRecipe(mean, std, n_coreset=20, random_state=2, keep_samples=True),
                              progress=False)
        assert torch.equal(built, expected[default_indices(expected, 20, random_state=2)])
        assert torch.equal(bank.sample(1), samples[1])  # pass 2 scores the whole sample
        assert bank.stats() == cpu_bank_of(samples).stats()  # normalised with every row's statistics
    with pytest.raises(ValueError, match="at least 1"):
        MemoryBank(max_rows_per_sample=0)


def cpu_bank_of(samples: list[torch.Tensor]) -> MemoryBank:
    bank = cpu_bank()
    for sample in samples:
        bank.add(sample)
    return bank


def test_saved_state_scores_exactly_like_the_bank():
    bank, _ = filled_bank(8, dim=64, sizes=(200, 150), coreset=default_coreset("cpu"))
    mean, std = bank.stats()
    bank.finalize(BankRecipe(mean, std, n_coreset=60, random_state=3), progress=False)
    state = bank.export_state()
    assert set(state) == {"bank", "mean", "std", "coreset_idx", "sample_rows"}
    loaded = MemoryBank.from_state(state)
    queries = torch.from_numpy(np.random.default_rng(80).normal(3, 3, (120, 64)).astype(np.float32))
    queries[:50] = 0
    original, again = bank.score(queries, eps=1e-5), loaded.score(queries, eps=1e-5)
    assert original[0] == again[0] and torch.equal(original[1], again[1])
    assert loaded.sample_rows == [200, 150] and torch.equal(loaded.coreset_idx, bank.coreset_idx)
    with pytest.raises(ValueError):
        MemoryBank.from_state({**state, "bank": state["bank"].double()})


def clustered_rows(generator: torch.Generator, rows: int, dim: int, clusters: int, scale: float) -> torch.Tensor:
    """Rows around ``clusters`` centres (spread ``scale``) with unit noise."""
    centres = torch.randn(clusters, dim, generator=generator) * scale
    members = torch.randint(0, clusters, (rows,), generator=generator)
    return centres[members] + torch.randn(rows, dim, generator=generator)


def test_bank_scores_identically_with_and_without_bf16_screening():
    """The screened search (the default on bf16 CPUs) scores a bank exactly as the plain float32 one."""
    generator = torch.Generator().manual_seed(3)
    rows = clustered_rows(generator, 4000, 384, 64, 4.0)
    queries = rows[:600] + 0.1 * torch.randn(600, 384, generator=generator)
    scores = []
    for search in (ExactSearch(), ScreenedSearch(), SharedEmptyRows(ScreenedSearch()), None):
        bank = MemoryBank(search=search)
        bank.add(rows)
        bank.finalize(BankRecipe(0.1, 1.3), progress=False)
        scores.append(bank.score(queries, eps=1e-5))
    for score, distances in scores[1:]:
        assert score == scores[0][0]
        assert torch.equal(distances, scores[0][1])


@pytest.mark.parametrize("inner", [ExactSearch, ScreenedSearch])
@pytest.mark.parametrize("offset", [0.0, 20.0])  # 20: no bank row near the empty patches, they are the worst
def test_empty_patches_searched_once_score_exactly_like_every_row_searched(inner, offset):
    """Empty (all-zero) patches share one nearest-neighbour search per bank; the distances, indices and image
    score equal searching every row, also when an empty patch is the worst one."""
    generator = torch.Generator().manual_seed(4)
    rows = clustered_rows(generator, 3000, 256, 48, 3.0)
    rows[torch.rand(3000, generator=generator) < 0.8] = 0
    rows += offset
    base = rows[3000 - 700:]
    queries = base + 0.05 * torch.randn(700, 256, generator=generator)
    queries[(base == offset).all(dim=1) | (torch.rand(700, generator=generator) < 0.5)] = 0
    bank = MemoryBank(coreset=default_coreset("cpu"), search=SharedEmptyRows(inner()))
    bank.add(rows)
    bank.finalize(BankRecipe(0.2, 1.7, n_coreset=400, random_state=0), progress=False)
    shared = bank.score(queries, eps=1e-5)
    assert bank.search.rows_remembered == 1  # the empty row was searched on its own
    every_row = MemoryBank.from_state(bank.export_state(), search=inner())
    every = every_row.score(queries, eps=1e-5)
    expected, _ = nearest_neighbours(bank.normalise(queries), bank.bank)
    assert shared[0] == every[0]
    assert torch.equal(shared[1], every[1]) and torch.equal(shared[1], expected)
    worst_is_empty = bool((queries[int(torch.argmax(shared[1]))] == 0).all())
    assert worst_is_empty == (offset > 0)
