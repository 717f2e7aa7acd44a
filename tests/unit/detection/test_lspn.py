"""G2SF's LSPN against the reference's formulation written out here (small inputs): the network, the geometric
encoding, the global scales, the fused distance, every loss, the noise, the pairs, the aggregation, and a seeded
training on a toy fusion dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from m3dm.detection import lspn

RGB, XYZ = 6, 4  # feature widths of the toy rows


def rows_and_cores(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, RGB + XYZ, generator=g), torch.randn(n, RGB + XYZ, generator=g)


def small_net(seed: int = 0) -> lspn.LocalScaleNet:
    net = lspn.LocalScaleNet(RGB + XYZ, hidden=(8,), emb_dim=5, dropout=0.5)
    net.reset_parameters(torch.Generator().manual_seed(seed))
    return net.eval()


def test_network_is_two_mlps_and_a_regressor_with_exp_tanh():
    net = small_net()
    encoding, core = rows_and_cores()

    def branch(x, mlp):  # Linear, ReLU, (dropout off), Linear
        return mlp[3](torch.relu(mlp[0](x)))

    joint = torch.cat([branch(encoding, net.encoding_branch), branch(core, net.coreset_branch)], dim=1)
    hidden = torch.relu(joint @ net.regressor[0].weight.T + net.regressor[0].bias)
    expected = torch.exp(torch.tanh(hidden @ net.regressor[3].weight.T + net.regressor[3].bias))
    with torch.no_grad():
        out = net(encoding, core)
    assert out.shape == (12, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    assert (out >= math.exp(-1) - 1e-6).all() and (out <= math.e + 1e-6).all()
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(10, 8), (8, 5), (10, 8), (8, 5), (10, 256),
                                                                 (256, 2)]


def test_geometric_encoding_and_global_weights():
    f, c = rows_and_cores()
    enc = lspn.geometric_encoding(f, c)
    assert torch.allclose(enc.norm(dim=1), torch.full((12,), 5.0), atol=1e-5)
    assert torch.allclose(enc / 5, (f - c) / (f - c).norm(dim=1, keepdim=True), atol=1e-6)
    tiny = lspn.geometric_encoding(c + 1e-5, c)  # shorter than 1e-3: divided by 1e-3, not normalised
    assert torch.allclose(tiny, (c + 1e-5 - c) * 5 / 1e-3, atol=1e-6)
    raw = torch.tensor([[0.3], [-1.2]])
    sig = 0.5 * (torch.tanh(raw.flatten()) + 1)
    assert torch.allclose(lspn.global_weights(raw), (sig / sig.sum())[None])
    assert torch.equal(lspn.global_weights(torch.zeros(2, 1)), torch.tensor([[0.5, 0.5]]))


def test_fused_distance_weights_each_modality_distance():
    net = small_net()
    f, c = rows_and_cores()
    score_mean, raw = torch.tensor([2.0, 0.5]), torch.tensor([[0.4], [0.1]])
    with torch.no_grad():
        fused = lspn.fused_distance(net, f, c, score_mean, raw, RGB)
        scales = net(5 * (f - c) / (f - c).norm(dim=1, keepdim=True), c)
    d = torch.stack([(f[:, :RGB] - c[:, :RGB] + 1e-6).norm(dim=1), (f[:, RGB:] - c[:, RGB:] + 1e-6).norm(dim=1)], 1)
    d = d / score_mean
    gamma = lspn.global_weights(raw)
    assert torch.allclose(fused.value[:, 0], (scales * gamma * d).sum(1), atol=1e-5)
    assert torch.allclose(fused.mean_distance, d.mean(1), atol=1e-6)
    background = torch.zeros(12, dtype=torch.bool)
    background[:4] = True
    with torch.no_grad():
        masked = lspn.fused_distance(net, f, c, score_mean, raw, RGB, background)
    assert torch.allclose(masked.value[:4, 0], (gamma * d[:4]).sum(1), atol=1e-6)
    assert torch.equal(masked.value[4:], fused.value[4:])


def test_aggregation_modes():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 1.5]])
    assert torch.equal(lspn.aggregate(scores, "min"), torch.tensor([1.0, 0.5]))
    assert torch.equal(lspn.aggregate(scores, "max"), torch.tensor([3.0, 4.0]))
    assert torch.allclose(lspn.aggregate(scores, "average"), torch.tensor([2.0, 2.0]))
    assert torch.equal(lspn.aggregate(scores, "zero"), torch.tensor([3.0, 0.5]))
    with pytest.raises(ValueError, match="scoring mode"):
        lspn.aggregate(scores, "weight")


PRED = torch.tensor([[0.5], [1.2], [0.9], [2.5], [3.0], [0.7]])
LABELS = torch.tensor([1, 1, 1, -1, -1, -1])


def test_separation_loss_is_the_weighted_svdd_margin_loss():
    margin, alpha, eps = 4.0, 2.0, 1e-5
    terms = []
    for p, label in zip(PRED[:, 0].tolist(), LABELS.tolist()):
        q = p * p
        if label == 1:
            terms.append(q * min(max(q**alpha, 0.33), 3.0))
        else:
            inv = 1 / (q + eps)
            terms.append(max(inv - 1 / margin, 0.0) * min(max(inv**alpha, 0.33), 3.0))
    assert float(lspn.separation_loss(PRED, LABELS, margin, alpha)) == pytest.approx(np.mean(terms), rel=1e-6)
    plain = [p * p if label == 1 else max(1 / (p * p + eps) - 1 / margin, 0.0)
             for p, label in zip(PRED[:, 0].tolist(), LABELS.tolist())]
    assert float(lspn.separation_loss(PRED, LABELS, margin, alpha, weighted=False)) == pytest.approx(np.mean(plain),
                                                                                                 rel=1e-6)


@pytest.mark.parametrize("perc", [1.0, 0.5])
def test_margin_loss_counts_the_overlap_of_normal_and_anomalous_distances(perc):
    q = (PRED[:, 0] ** 2).numpy().astype(np.float64)
    normal, anomalous = q[:3], q[3:]
    scale = np.quantile(normal, perc)
    normal, anomalous = normal / scale, anomalous / scale
    expected = (np.maximum(normal - anomalous.min(), 0).sum()
                + np.maximum(np.quantile(normal, perc) - anomalous, 0).sum()) / len(q)
    assert float(lspn.margin_loss(PRED, LABELS, perc)) == pytest.approx(expected, rel=1e-5)


def test_scaling_and_permutation_losses():
    scales = torch.tensor([[0.8, 1.3], [1.1, 0.9], [2.0, 2.5], [1.0, 2.7]])
    labels = torch.tensor([1, 1, -1, -1])
    expected = (math.e - np.array([2.0, 2.5, 1.0, 2.7])).mean() + np.maximum(np.array([0.8, 1.3, 1.1, 0.9]) - 1,
                                                                             0).mean()
    assert float(lspn.scaling_loss(scales, labels)) == pytest.approx(expected, rel=1e-6)
    assert float(lspn.permutation_loss(scales)) == pytest.approx((math.e - scales.numpy()).mean(), rel=1e-6)


def fused(values, means) -> lspn.FusedDistance:
    return lspn.FusedDistance(torch.tensor(values)[:, None], torch.tensor(means), torch.ones(len(values), 2))


def test_consistency_loss_with_and_without_the_reference_broadcast():
    s0 = fused([1.0, 2.0, 0.5], [1.0, 1.5, 0.8])
    near = [fused([1.5, 1.0, 2.0], [1.2, 1.0, 1.0]), fused([3.0, 2.5, 0.2], [2.0, 1.5, 0.5])]
    far = [fused([0.8, 2.5, 0.1], [0, 0, 0]), fused([1.1, 1.9, 0.6], [0, 0, 0])]
    magnitude, anchor = 1.2, 2
    s, d0 = np.array([1.0, 2.0, 0.5]), np.array([1.0, 1.5, 0.8])
    row, matrix = 0.0, 0.0
    for other in near:
        p, d = other.value[:, 0].numpy(), other.mean_distance.numpy()
        ratio = magnitude * d / d0
        row += np.maximum(p - ratio * s, 0).mean() / anchor
        matrix += np.maximum(p[:, None] - ratio[None, :] * s[:, None], 0).mean() / anchor  # [i, j]
    for other in far:
        extra = np.maximum(s - other.value[:, 0].numpy(), 0).mean() / anchor
        row, matrix = row + extra, matrix + extra
    assert float(lspn.consistency_loss(s0, near, far, magnitude, broadcast=True)) == pytest.approx(matrix, rel=1e-6)
    assert float(lspn.consistency_loss(s0, near, far, magnitude, broadcast=False)) == pytest.approx(row, rel=1e-6)


def test_l1_and_l2_penalties_cover_every_linear_weight_but_no_bias():
    net = small_net()
    weights = [m.weight.detach() for m in net.modules() if isinstance(m, nn.Linear)]
    l1, l2 = float(lspn.l1_penalty(net).detach()), float(lspn.l2_penalty(net).detach())
    assert l1 == pytest.approx(sum(float(w.abs().sum()) for w in weights), rel=1e-6)
    assert l2 == pytest.approx(sum(float((w**2).sum()) / 2 for w in weights), rel=1e-6)


def test_noise_moves_each_part_by_at_most_its_bound_and_is_seeded():
    f, _ = rows_and_cores(200)
    noisy = lspn.add_noise(f, RGB, (0.1, 0.02), torch.Generator().manual_seed(1))
    again = lspn.add_noise(f, RGB, (0.1, 0.02), torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    rgb_shift, xyz_shift = (noisy - f)[:, :RGB], (noisy - f)[:, RGB:]
    assert (rgb_shift >= -1e-7).all() and (xyz_shift >= -1e-7).all()  # directions in [0, 1)^D
    assert rgb_shift.norm(dim=1).max() <= 0.1 + 1e-6 and xyz_shift.norm(dim=1).max() <= 0.02 + 1e-6
    assert rgb_shift.norm(dim=1).max() > 0.05  # uniform lengths reach up to the bound


def test_permuted_pairs_shuffle_features_in_the_first_half_and_cores_in_the_second():
    f, c = rows_and_cores(10)
    pf, pc = lspn.permuted_pairs(f, c, RGB, torch.Generator().manual_seed(0))
    assert torch.equal(pf[5:], f[5:]) and torch.equal(pc[:5], c[:5])

    def same_rows(a, b):
        return sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))

    assert same_rows(pf[:5, :RGB], f[:5, :RGB]) and same_rows(pf[:5, RGB:], f[:5, RGB:])
    assert same_rows(pc[5:, :RGB], c[5:, :RGB]) and same_rows(pc[5:, RGB:], c[5:, RGB:])
    assert not torch.equal(pf[:5], f[:5])


def test_split_and_balanced_batches():
    first, second = lspn.split_rows(11, torch.Generator().manual_seed(0))
    assert len(first) == 6 and len(second) == 5
    assert sorted(torch.cat([first, second]).tolist()) == list(range(11))
    labels = torch.tensor([1] * 90 + [-1] * 10)
    batches = lspn.balanced_batches(labels, 32, torch.Generator().manual_seed(0))
    assert len(batches) == 3 and all(len(b) == 32 for b in batches)  # 100 draws, the partial batch dropped
    drawn = torch.cat(batches)
    assert 0.3 < float((labels[drawn] == -1).float().mean()) < 0.7  # balanced, though 10 % are anomalous


def toy_rows(n: int = 600, seed: int = 0) -> tuple[lspn.FusionRows, torch.Tensor, torch.Tensor]:
    """Coreset rows near the origin; normal patches near coreset rows, anomalous ones far from them."""
    g = torch.Generator().manual_seed(seed)
    rgb_core, xyz_core = torch.randn(30, RGB, generator=g) * 0.5, torch.randn(30, XYZ, generator=g) * 0.5
    labels = torch.where(torch.rand(n, generator=g) < 0.3, -1, 1)
    nearest = torch.randint(0, 30, (n,), generator=g)
    spread = torch.where(labels == -1, 2.0, 0.2)[:, None]
    features = torch.cat([rgb_core[nearest], xyz_core[nearest]], 1) + spread * torch.randn(n, RGB + XYZ, generator=g)
    d_rgb, d_xyz = torch.cdist(features[:, :RGB], rgb_core), torch.cdist(features[:, RGB:], xyz_core)
    neighbours = torch.cat([d_rgb.topk(20, largest=False).indices, d_xyz.topk(20, largest=False).indices], 1)
    distances = torch.stack([d_rgb.min(1).values, d_xyz.min(1).values], 1)
    return lspn.FusionRows(features, neighbours, distances, labels), rgb_core, xyz_core


def train(settings: lspn.TrainingSettings, seed: int = 0) -> lspn.TrainedLSPN:
    rows, rgb_core, xyz_core = toy_rows()
    return lspn.LSPNTraining(rows, rgb_core, xyz_core, settings, torch.Generator().manual_seed(seed),
                             progress=False).run()


SMALL = lspn.TrainingSettings(epochs=3, hidden=(8,), emb_dim=4)


def test_one_step_has_every_loss_term_seeded():
    rows, rgb_core, xyz_core = toy_rows(200)

    def terms(seed):
        training = lspn.LSPNTraining(rows, rgb_core, xyz_core, SMALL, torch.Generator().manual_seed(seed),
                                     progress=False)
        training.net.eval()  # no dropout: the noise and the permutations are the only draws
        return training.losses(training._epoch(training.train_idx)[0])

    first, again = terms(0), terms(0)
    assert set(first) == {"scaling", "svdd", "margin", "perm", "const", "l1", "l2"}
    assert all(torch.equal(first[k], again[k]) and torch.isfinite(first[k]) for k in first)


@pytest.mark.slow  # three trainings of three epochs: several seconds on a busy CPU
def test_training_is_seeded_and_keeps_a_validated_epoch():
    first, again = train(SMALL), train(SMALL)
    for (name, a), b in zip(first.net.state_dict().items(), again.net.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(first.raw_global, again.raw_global) and first.losses == again.losses
    assert first.best_epoch >= 1  # the reference never validates after the first epoch
    assert len(first.losses) == 3 and all(math.isfinite(v) for v in first.losses)
    assert first.margin > 0 and (first.score_mean > 0).all()
    other = train(SMALL, seed=1)
    assert not torch.equal(other.raw_global, first.raw_global)


def test_training_needs_both_kinds_of_patches():
    rows, rgb_core, xyz_core = toy_rows(100)
    rows.labels[:] = 1
    with pytest.raises(ValueError, match="normal and anomalous"):
        lspn.LSPNTraining(rows, rgb_core, xyz_core, SMALL, torch.Generator(), progress=False)
