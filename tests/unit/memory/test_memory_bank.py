"""Memory-bank building blocks against straightforward NumPy / Pillow / SciPy implementations written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter
from sklearn.random_projection import SparseRandomProjection

from m3dm.memory import bank as mb
from m3dm.memory.bank import (MemoryBank, blur_map, greedy_coreset, nearest_neighbours, reweighted_score,
                              segmentation_map, sparse_random_projection)


def clustered(seed: int, rows: int = 600, dim: int = 256, duplicates: int = 0) -> np.ndarray:
    """Float32 rows around a few centres, optionally with exact duplicate rows and all-zero rows appended."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (8, dim))
    x = centres[rng.integers(0, 8, rows)] + rng.normal(0, 1, (rows, dim))
    if duplicates:
        x = np.concatenate([np.zeros((duplicates, dim)), x, x[:duplicates]])
    return x.astype(np.float32)


def to_half_like_torch(values: np.ndarray) -> np.ndarray:
    # torch turns float64 into float16 through float32 (checked in test_half_conversion_goes_through_float32)
    return values.astype(np.float32).astype(np.float16)


def numpy_coreset(features: np.ndarray, n: int, seed, fp16: bool) -> list[int]:
    """Plain greedy k-center as in the reference: project (float64), start at row 0, n-1 farthest-point steps."""
    proj = SparseRandomProjection(eps=0.9, random_state=seed).fit_transform(features.astype(np.float64))
    min_dist = np.linalg.norm(proj - proj[0], axis=1)
    bank = proj
    if fp16:
        bank, min_dist = to_half_like_torch(proj), to_half_like_torch(min_dist)
    chosen, last = [0], bank[0]
    for _ in range(n - 1):
        diff = bank - last  # float16 arithmetic when fp16
        dist = np.sqrt(np.sum(diff.astype(np.float64) ** 2, axis=1))
        min_dist = np.minimum(min_dist, to_half_like_torch(dist) if fp16 else dist)
        index = int(np.argmax(min_dist))
        min_dist[index] = 0
        last = bank[index]
        chosen.append(index)
    return chosen


# -- projection ----------------------------------------------------------------------------------------------

def test_half_conversion_goes_through_float32():
    rng = np.random.default_rng(0)
    values = rng.normal(0, 5, 100_000)
    lower = values.astype(np.float16).astype(np.float64)
    upper = np.nextafter(values.astype(np.float16), np.float16(np.inf)).astype(np.float64)
    near_midpoints = (lower + upper) / 2 * (1 + 1e-12)
    probe = np.concatenate([values, near_midpoints])
    np.testing.assert_array_equal(torch.from_numpy(probe).half().numpy(), to_half_like_torch(probe))


def test_projection_equals_sklearn_fit_transform(monkeypatch):
    x = clustered(1, rows=500, dim=200)
    expected = SparseRandomProjection(eps=0.9, random_state=5).fit_transform(x.astype(np.float64))
    monkeypatch.setattr(mb, "PROJECTION_CHUNK_BYTES", 8 * 200 * 37)  # 37-row chunks
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


def test_projection_falls_back_to_the_input(capsys):
    x = torch.from_numpy(clustered(3, rows=300, dim=32))  # JL dimension 140 > 32
    assert sparse_random_projection(x, 0.9, 0) is x
    assert "could not project" in capsys.readouterr().out


# -- greedy coreset ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("seed,duplicates,n", [(0, 0, 60), (1, 25, 80), (2, 0, 1)])
def test_coreset_equals_numpy_greedy_k_center(fp16, seed, duplicates, n):
    x = clustered(seed, duplicates=duplicates)
    got = greedy_coreset(torch.from_numpy(x), n, random_state=seed, device="cpu", fp16=fp16, progress=False)
    assert got.dtype == torch.long
    assert got.tolist() == numpy_coreset(x, n, seed, fp16)


def projected_ties(seed: int, rows: int = 600, dim: int = 256) -> np.ndarray:
    """Rows whose projections lie on a sphere (radius 10 ± 1e-4) around row 0's, far from the origin.

    The float16 rounding of the projected coordinates (~80 each) moves the distances by far more than their
    spread, so the float16 distance to row 0 and the rounded exact one disagree for most rows."""
    projector = SparseRandomProjection(eps=0.9, random_state=seed).fit(np.zeros((rows, dim)))
    components = projector.components_.toarray()
    rng = np.random.default_rng(seed)
    directions = rng.normal(0, 1, (rows, components.shape[0]))
    radii = 10 * (1 + rng.uniform(-1e-4, 1e-4, (rows, 1)))
    targets = directions / np.linalg.norm(directions, axis=1, keepdims=True) * radii
    targets[0] = 0
    targets += rng.normal(0, 1, components.shape[0]) * 1000 / np.sqrt(components.shape[0])
    return (targets @ np.linalg.pinv(components).T).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coreset_float16_ties_follow_the_reference(seed):
    # ties in float16 make the selection depend on every rounding step, including the reference's redundant
    # first iteration (the minimum of the rounded exact and the float16 distance to row 0)
    x = projected_ties(seed)
    got = greedy_coreset(torch.from_numpy(x), 40, random_state=seed, device="cpu", progress=False)
    assert got.tolist() == numpy_coreset(x, 40, seed, fp16=True)


def test_coreset_chunking_does_not_change_the_selection():
    x = torch.from_numpy(clustered(4))
    whole = greedy_coreset(x, 50, random_state=3, device="cpu", progress=False)
    for chunk_size in (1, 37, 599):
        assert torch.equal(greedy_coreset(x, 50, random_state=3, device="cpu", chunk_size=chunk_size,
                                          progress=False), whole)


def test_coreset_is_a_k_center_sequence():
    x = clustered(5, duplicates=10)
    selected = greedy_coreset(torch.from_numpy(x), 70, random_state=11, device="cpu", fp16=False, progress=False)
    proj = SparseRandomProjection(eps=0.9, random_state=11).fit_transform(x.astype(np.float64))
    chosen = selected.tolist()
    assert chosen[0] == 0 and len(set(chosen)) == len(chosen)
    min_dist = np.linalg.norm(proj - proj[0], axis=1)
    for index in chosen[1:]:
        assert min_dist[index] == pytest.approx(min_dist.max(), rel=1e-12)  # farthest from those chosen so far
        assert index == int(np.flatnonzero(min_dist >= min_dist.max() * (1 - 1e-12))[0])  # first on ties
        min_dist = np.minimum(min_dist, np.linalg.norm(proj - proj[index], axis=1))


def test_coreset_fp16_selection_is_a_near_k_center_sequence():
    x = clustered(6)
    chosen = greedy_coreset(x, 40, random_state=0, device="cpu", progress=False).tolist()
    proj = SparseRandomProjection(eps=0.9, random_state=0).fit_transform(x.astype(np.float64))
    min_dist = np.linalg.norm(proj - proj[0], axis=1)
    for index in chosen[1:]:
        assert min_dist[index] >= min_dist.max() * (1 - 2e-3)  # float16 keeps ~3 decimal digits
        min_dist = np.minimum(min_dist, np.linalg.norm(proj - proj[index], axis=1))


def test_coreset_seeds():
    x = torch.from_numpy(clustered(7))
    run = lambda seed: greedy_coreset(x, 40, random_state=seed, device="cpu", progress=False)  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    np.random.seed(0)
    first = greedy_coreset(x, 40, device="cpu", progress=False)
    np.random.seed(0)
    assert torch.equal(greedy_coreset(x, 40, device="cpu", progress=False), first)
    assert torch.equal(first, run(np.random.RandomState(0)))


def test_coreset_without_projection_still_a_k_center_sequence():
    x = clustered(8, rows=300, dim=32)
    chosen = greedy_coreset(x, 30, random_state=0, device="cpu", fp16=False, progress=False).tolist()
    data = x.astype(np.float64)
    min_dist = np.linalg.norm(data - data[0], axis=1)
    assert chosen[0] == 0 and len(set(chosen)) == 30
    for index in chosen[1:]:
        assert min_dist[index] == pytest.approx(min_dist.max(), rel=1e-5)
        min_dist = np.minimum(min_dist, np.linalg.norm(data - data[index], axis=1))


def test_coreset_smaller_than_one_row_gives_row_zero():
    assert greedy_coreset(clustered(9), 0, random_state=0, device="cpu", progress=False).tolist() == [0]


# -- nearest neighbours ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("patches,bank,dim", [(300, 1000, 48), (20, 12, 5), (784, 2000, 128)])
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
    monkeypatch.setattr(mb, "NN_BLOCK_ELEMENTS", 1000)
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


# -- re-weighted score -----------------------------------------------------------------------------------------

def hand_score(x: np.ndarray, bank: np.ndarray, n_reweight=3, eps=0.0, divisor=1.0) -> tuple[float, float]:
    dist = np.linalg.norm(x[:, None, :] - bank[None, :, :], axis=2)
    worst = int(np.argmax(dist.min(axis=1)))
    s_star = dist[worst].min() / divisor
    neighbour = bank[np.argmin(dist[worst])]
    knn = np.argsort(np.linalg.norm(bank - neighbour, axis=1), kind="stable")[1:n_reweight]
    deltas = np.linalg.norm(bank[knn] - x[worst], axis=1) / divisor
    d = np.sqrt(x.shape[1])
    w = 1 - np.exp(s_star / d) / (np.sum(np.exp(deltas / d)) + eps)
    return w * s_star, w


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


# -- blur and maps ---------------------------------------------------------------------------------------------

def random_map(seed: int, size: int = 224) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = gaussian_filter(rng.random((size, size)), 6) * 10
    return (smooth + rng.random((size, size))).astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_pil_blur_equals_a_direct_pillow_call(seed):
    score_map = random_map(seed)
    peak = score_map.max()
    pixels = np.floor(score_map / peak * np.float32(255)).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(pixels, "L").filter(ImageFilter.GaussianBlur(4)), dtype=np.float32)
    got = blur_map(torch.from_numpy(score_map)[None])
    assert got.shape == (1, 224, 224) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].numpy(), blurred / 255 * peak, rtol=1e-6)
    levels = got[0].numpy() / (peak / 255)
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # quantised to multiples of max/255


def test_pil_blur_of_a_zero_map_is_zero():
    assert torch.equal(blur_map(torch.zeros(224, 224)), torch.zeros(1, 224, 224))


def test_float_blur_close_to_scipy():
    score_map = random_map(4, size=100)
    expected = gaussian_filter(score_map.astype(np.float64), sigma=4, mode="nearest")
    got = blur_map(torch.from_numpy(score_map), mode="float")
    assert got.shape == (1, 100, 100)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        blur_map(torch.zeros(4, 4), mode="box")


def numpy_bilinear(grid_map: np.ndarray, out: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize (align_corners=False), coordinates clamped at the borders."""
    size = grid_map.shape[0]
    src = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0)
    lo = np.minimum(np.floor(src).astype(int), size - 1)
    hi = np.minimum(lo + 1, size - 1)
    frac = src - lo
    rows = grid_map[lo] * (1 - frac)[:, None] + grid_map[hi] * frac[:, None]
    return rows[:, lo] * (1 - frac) + rows[:, hi] * frac


def test_segmentation_map_upsamples_row_major_then_blurs():
    rng = np.random.default_rng(5)
    minima = rng.random(28 * 28).astype(np.float32) * 3
    expected = numpy_bilinear(minima.reshape(28, 28).astype(np.float64), 224)
    plain = segmentation_map(torch.from_numpy(minima), 28, blur="none")
    assert plain.shape == (1, 224, 224)
    np.testing.assert_allclose(plain[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    blurred = segmentation_map(torch.from_numpy(minima), 28)
    assert torch.equal(blurred, blur_map(plain))
    with pytest.raises(ValueError):
        segmentation_map(torch.zeros(10), 3)


# -- MemoryBank ------------------------------------------------------------------------------------------------

def filled_bank(seed: int, sizes=(50, 70, 30), dim: int = 40, offset: float = 3.0) -> tuple[MemoryBank, list]:
    rng = np.random.default_rng(seed)
    samples = [torch.from_numpy((rng.normal(offset, 2.5, (n, dim))).astype(np.float32)) for n in sizes]
    bank = MemoryBank()
    for sample in samples:
        bank.add(sample)
    return bank, samples


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
    built = bank.finalize(mean, std, progress=False)
    everything = torch.cat(samples)
    expected = (everything - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    assert torch.equal(built, expected)
    assert bank.stats() == raw_stats  # statistics stay those of the raw patches


def test_finalize_without_normalisation_and_coreset_keeps_the_rows():
    bank, samples = filled_bank(3)
    assert torch.equal(bank.finalize(progress=False), torch.cat(samples))
    with pytest.raises(RuntimeError):
        bank.add(samples[0])


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


def test_zero_rows_before_and_after_the_coreset():
    _, samples = filled_bank(4, dim=200, sizes=(120, 150, 130))
    samples = with_zero_entries(samples, 4)
    bank = MemoryBank()
    for sample in samples:
        bank.add(sample)
    built = bank.finalize(f_coreset=0.1, random_state=0, device="cpu", drop_zero_rows_before=True,
                          drop_zero_rows_after=True, append_zero_row=True, progress=False)
    everything = torch.cat(samples)
    kept = everything[(everything != 0).all(dim=1)]
    assert kept.shape[0] < everything.shape[0]
    idx = numpy_coreset(kept.numpy(), int(0.1 * kept.shape[0]), 0, fp16=True)
    assert torch.equal(built[:-1], kept[idx])
    assert torch.equal(built[-1], torch.zeros(200))
    assert built.shape[0] == int(0.1 * kept.shape[0]) + 1


def test_zero_filter_after_normalisation_and_explicit_coreset_size():
    _, samples = filled_bank(5, dim=200, sizes=(120, 150, 130))
    samples = with_zero_entries(samples, 5)
    bank = MemoryBank()
    for sample in samples:
        bank.add(sample)
    mean, std = bank.stats()
    built = bank.finalize(mean, std, n_coreset=33, random_state=1, device="cpu", drop_zero_rows_after=True,
                          append_zero_row=True, progress=False)
    normalised = (torch.cat(samples) - torch.tensor(mean)) / torch.tensor(std)
    selected = normalised[numpy_coreset(normalised.numpy(), 33, 1, fp16=True)]
    assert torch.equal(built[:-1], selected[(selected != 0).all(dim=1)])
    assert torch.equal(bank.coreset_idx, torch.tensor(numpy_coreset(normalised.numpy(), 33, 1, fp16=True)))


def test_score_normalises_and_reweights():
    bank, _ = filled_bank(6, dim=200, sizes=(120, 150, 130))
    mean, std = bank.stats()
    built = bank.finalize(mean, std, f_coreset=0.2, random_state=2, device="cpu", progress=False)
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
    bank, _ = filled_bank(7)
    with pytest.raises(ValueError):
        bank.finalize(n_coreset=3, f_coreset=0.1)
    with pytest.raises(ValueError):
        bank.finalize(mean=1.0)
    with pytest.raises(RuntimeError):
        MemoryBank().finalize()
    with pytest.raises(RuntimeError):
        _ = MemoryBank().bank


@pytest.mark.parametrize("seed,offset", [(0, 0.0), (1, 0.0), (2, 300.0)])
def test_pruned_cpu_coreset_selects_exactly_what_the_plain_loop_selects(seed, offset):
    """The triangle-inequality pruning (CPU default) must not change a single index, also where the rows lie
    far from the origin compared with their spread (float32 rounding of the centre screen is largest there)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, 256, generator=generator) * 3
    rows = centres[torch.randint(0, 40, (6000,), generator=generator)] + offset
    rows = rows + 0.3 * torch.randn(6000, 256, generator=generator)
    rows[::7] = 0  # empty patches, as in xyz banks
    rows[1::11] = rows[2::11][: len(rows[1::11])]  # duplicates
    pruned = greedy_coreset(rows, 700, random_state=seed, progress=False)
    plain = greedy_coreset(rows, 700, random_state=seed, progress=False, chunk_size=4096)
    assert torch.equal(pruned, plain)


def banks_with_copies(seed: int, rows: int = 3000, dim: int = 200) -> torch.Tensor:
    """Mostly empty (all-zero) rows, as xyz banks, plus exact copies of other rows."""
    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn(rows, dim, generator=generator) * torch.rand(rows, 1, generator=generator) * 4
    bank[torch.rand(rows, generator=generator) < 0.8] = 0
    bank[5::13] = bank[4::13][: len(bank[5::13])]
    return bank


def test_first_occurrences_are_exactly_the_rows_without_an_earlier_copy():
    bank = banks_with_copies(0).half()
    seen, expected = set(), []
    for index, row in enumerate(bank.tolist()):
        if tuple(row) not in seen:
            seen.add(tuple(row))
            expected.append(index)
    assert mb._first_occurrences(bank).tolist() == expected
    assert mb._first_occurrences(torch.randn(500, 20).half()) is None  # no copies: nothing to drop


@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("seed,n", [(1, 200), (2, 800)])  # 800 > the ~600 distinct rows: row 0 repeats at the end
def test_dropping_exact_copies_keeps_the_selection(fp16, seed, n, monkeypatch):
    bank = banks_with_copies(seed)
    fast = greedy_coreset(bank, n, random_state=seed, device="cpu", fp16=fp16, progress=False)
    assert fast.tolist() == numpy_coreset(bank.numpy(), n, seed, fp16)
    monkeypatch.setattr(mb, "MIN_COPY_SHARE", 2.0)  # never drop copies
    assert torch.equal(greedy_coreset(bank, n, random_state=seed, device="cpu", fp16=fp16, progress=False), fast)


# -- storage on disk and the sharded coreset -------------------------------------------------------------------

def test_sample_store_on_disk_reads_like_memory(tmp_path):
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randn(rows, 12, generator=generator) for rows in (5, 17, 1, 30)]
    stores = [mb.SampleStore(), mb.SampleStore(tmp_path)]
    for store in stores:
        for sample in samples:
            store.append(sample)
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
    stores[1].clear()
    assert stores[1]._file is None


@pytest.mark.parametrize("n_coreset", [None, 37])
def test_bank_on_disk_equals_the_straightforward_concatenation(tmp_path, n_coreset):
    """Pins the chunked, spooled construction against concatenate → normalise → coreset → index."""
    samples = [torch.from_numpy(clustered(seed, rows=120, dim=48)) for seed in range(4)]
    everything = torch.cat(samples)
    mean, std = 0.25, 1.5
    expected = (everything - torch.tensor(mean)) / torch.tensor(std)
    if n_coreset is not None:
        expected = expected[greedy_coreset(expected, n_coreset, random_state=2, device="cpu", progress=False)]
    for spool in (None, tmp_path):
        bank = MemoryBank(spool_dir=spool)
        for sample in samples:
            bank.add(sample)
        built = bank.finalize(mean, std, n_coreset=n_coreset, random_state=2, device="cpu", progress=False,
                              keep_samples=True)
        assert torch.equal(built, expected)
        assert torch.equal(bank.sample(2), samples[2])  # kept for pass 2, raw
        bank.release_samples()
        with pytest.raises(RuntimeError, match="not available"):
            bank.sample(0)


def test_sharded_coreset_selects_each_blocks_share_greedily():
    x = torch.from_numpy(clustered(8, rows=900, dim=256))
    assert torch.equal(greedy_coreset(x, 60, random_state=1, device="cpu", progress=False, shards=1),
                       greedy_coreset(x, 60, random_state=1, device="cpu", progress=False))
    chosen = greedy_coreset(x, 60, random_state=1, device="cpu", fp16=False, progress=False, shards=3)
    assert len(chosen) == 60 and len(set(chosen.tolist())) == 60
    proj = SparseRandomProjection(eps=0.9, random_state=1).fit_transform(x.numpy().astype(np.float64))
    for block in range(3):
        picked = chosen[block * 20:(block + 1) * 20].tolist()
        assert all(block * 300 <= i < (block + 1) * 300 for i in picked)
        rows = proj[block * 300:(block + 1) * 300]
        local = [i - block * 300 for i in picked]
        assert local[0] == 0
        min_dist = np.linalg.norm(rows - rows[0], axis=1)
        for index in local[1:]:  # each next pick is the block row farthest from the block's picks so far
            assert min_dist[index] == pytest.approx(min_dist.max(), rel=1e-12)
            min_dist = np.minimum(min_dist, np.linalg.norm(rows - rows[index], axis=1))


def test_bank_scores_identically_with_and_without_bf16_screening():
    """The screened search MemoryBank.score uses on bf16 CPUs equals the plain float32 one."""
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(64, 384, generator=generator) * 4
    rows = centres[torch.randint(0, 64, (4000,), generator=generator)] + torch.randn(4000, 384, generator=generator)
    queries = rows[:600] + 0.1 * torch.randn(600, 384, generator=generator)
    scores = []
    for screened in (False, True):
        bank = MemoryBank()
        bank.add(rows)
        bank.finalize(0.1, 1.3, progress=False)
        bank.screened = screened
        scores.append(bank.score(queries, eps=1e-5))
    assert scores[0][0] == scores[1][0]
    assert torch.equal(scores[0][1], scores[1][1])


@pytest.mark.parametrize("screened", [False, True])
@pytest.mark.parametrize("offset", [0.0, 20.0])  # 20: no bank row near the empty patches, they are the worst
def test_empty_patches_searched_once_score_exactly_like_every_row_searched(screened, offset):
    """Empty (all-zero) patches share one nearest-neighbour search per bank; the distances, indices and image
    score equal searching every row, also when an empty patch is the worst one."""
    generator = torch.Generator().manual_seed(4)
    centres = torch.randn(48, 256, generator=generator) * 3
    rows = centres[torch.randint(0, 48, (3000,), generator=generator)] + torch.randn(3000, 256, generator=generator)
    rows[torch.rand(3000, generator=generator) < 0.8] = 0
    rows += offset
    base = rows[3000 - 700:]
    queries = base + 0.05 * torch.randn(700, 256, generator=generator)
    queries[(base == offset).all(dim=1) | (torch.rand(700, generator=generator) < 0.5)] = 0
    bank = MemoryBank()
    bank.add(rows)
    bank.finalize(0.2, 1.7, n_coreset=400, random_state=0, progress=False)
    bank.screened = screened
    shared = bank.score(queries, eps=1e-5)
    assert len(bank._empty_neighbour) == 1  # the empty row was searched on its own
    bank.share_empty_rows = False
    every = bank.score(queries, eps=1e-5)
    expected, _ = nearest_neighbours(bank.normalise(queries), bank.bank)
    assert shared[0] == every[0]
    assert torch.equal(shared[1], every[1]) and torch.equal(shared[1], expected)
    worst_is_empty = bool((queries[int(torch.argmax(shared[1]))] == 0).all())
    assert worst_is_empty == (offset > 0)
