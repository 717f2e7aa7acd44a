"""G2SF's Local Scale Prediction Network, its losses, the fused distance, the score aggregation and the training
loop (docs/g2sf.md, "The LSPN and its losses"; differences from the reference in docs/quirks.md, "G2SF").

A patch is a row of RGB features (the first ``rgb_dim`` channels) followed by point features; so is a coreset row.
Labels are +1 (normal) and −1 (anomalous), as the reference's. Every random draw (initial weights, batches, noise,
permutations) comes from the ``torch.Generator`` the caller passes, so training is reproducible.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from m3dm.errors import DataError
from m3dm.runtime import cpu_threads

ENCODING_EPS = 1e-3  # F.normalize's eps in the geometric encoding
ENCODING_GAIN = 5.0  # the encoding's length ("so that the values are not too small")
SEPARATION_EPS = 1e-5  # WDSADMarginLoss's eps
WEIGHT_CLAMP = (0.33, 3.0)  # the separation loss's weights are clamped to this range
WEIGHT_DECAY = 1e-4  # both Adam optimisers
GLOBAL_LR = 5e-3  # Adam on the two global scales
NOISE_FRACTION = 0.1  # noise of at most 10 % of a modality's mean normal distance
SCORING_MODES = ("min", "max", "average", "zero")
NEIGHBOURS = 20  # coreset neighbours kept per patch and modality in the fusion dataset
INITIAL_BEST = 1e6  # MMScoringTrainer.best_loss before the first validation
SMALL_BATCH = 1024  # LSPN batches below this many rows train on one CPU thread


# ------------------------------------------------------------------------------------------------ network

def _mlp(n_in: int, hidden: Sequence[int], n_out: int, dropout: float) -> nn.Sequential:
    """``MLPnet``: Linear + ReLU + dropout per hidden layer, then a plain Linear."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(n_in, width), nn.ReLU(), nn.Dropout(dropout)]
        n_in = width
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class LocalScaleNet(nn.Module):
    """The LSPN (``MultiModalGateNet``): one MLP on the geometric encoding, one on the coreset row, their outputs
    concatenated through ``2·emb → 256 → 2``; the two local scales are ``exp(tanh(·))``, in ``[1/e, e]``."""

    def __init__(self, dim: int, hidden: Sequence[int] = (512,), emb_dim: int = 128, dropout: float = 0.5):
        super().__init__()
        self.encoding_branch = _mlp(dim, hidden, emb_dim, dropout)  # the reference's residual_transformer
        self.coreset_branch = _mlp(dim, hidden, emb_dim, dropout)  # its transformer
        self.regressor = nn.Sequential(nn.Linear(2 * emb_dim, 256), nn.ReLU(), nn.Dropout(dropout),
                                       nn.Linear(256, 2))

    def forward(self, encoding: Tensor, coreset_rows: Tensor) -> Tensor:
        joint = torch.cat([self.encoding_branch(encoding), self.coreset_branch(coreset_rows)], dim=1)
        return torch.exp(torch.tanh(self.regressor(joint)))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default ``nn.Linear`` initialisation, drawn from ``generator``."""
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def geometric_encoding(features: Tensor, coreset_rows: Tensor) -> Tensor:
    """``5 · (f − c) / max(‖f − c‖, 1e-3)``: the direction from the coreset row to the patch."""
    return F.normalize(features - coreset_rows, dim=1, eps=ENCODING_EPS) * ENCODING_GAIN


def global_weights(raw: Tensor) -> Tensor:
    """``(1, 2)`` global scales from the two raw parameters: ``σ / Σσ`` with ``σ = (tanh + 1) / 2``."""
    squashed = 0.5 * (torch.tanh(raw) + 1).view(1, 2)
    return squashed / squashed.sum()


def modality_distances(features: Tensor, coreset_rows: Tensor, rgb_dim: int) -> Tensor:
    """``(B, 2)`` RGB and point distances of each patch to its coreset row (``F.pairwise_distance``, eps 1e-6)."""
    rgb = F.pairwise_distance(features[:, :rgb_dim], coreset_rows[:, :rgb_dim])
    xyz = F.pairwise_distance(features[:, rgb_dim:], coreset_rows[:, rgb_dim:])
    return torch.stack([rgb, xyz], dim=1)


@dataclass
class FusedDistance:
    value: Tensor  # (B, 1) Σ_m ls_m γ_m d_m / mean_m
    mean_distance: Tensor  # (B,) mean of the two normalised distances
    local_scales: Tensor  # (B, 2)


def fused_distance(net: LocalScaleNet, features: Tensor, coreset_rows: Tensor, score_mean: Tensor,
                   raw_global: Tensor, rgb_dim: int, background: Tensor | None = None) -> FusedDistance:
    """The anisotropic distance of each patch to one coreset row (``get_final_score``); ``background`` patches get
    local scales 1 (``predict_with_bg``)."""
    distances = modality_distances(features, coreset_rows, rgb_dim) / score_mean.view(1, 2)
    scales = net(geometric_encoding(features, coreset_rows), coreset_rows)
    if background is not None:
        scales = torch.where(background[:, None], torch.ones_like(scales), scales)
    value = (scales * global_weights(raw_global) * distances).sum(dim=1, keepdim=True)
    return FusedDistance(value, distances.mean(dim=1), scales)


def aggregate(scores: Tensor, mode: str) -> Tensor:
    """One score per patch from its ``(P, K)`` fused distances to its K nearest coreset rows (``scoring_mode``)."""
    if mode == "min":
        return scores.min(dim=1).values
    if mode == "max":
        return scores.max(dim=1).values
    if mode == "average":
        return scores.mean(dim=1)
    if mode == "zero":
        return scores[:, 0]
    raise ValueError(f"scoring mode must be one of {SCORING_MODES}, got {mode!r}")


# ------------------------------------------------------------------------------------------------- losses

def separation_loss(pred: Tensor, labels: Tensor, margin: float, alpha: float, weighted: bool = True) -> Tensor:
    """``WDSADMarginLoss`` (centre 0): ``q = pred²``; normal rows ``q``, anomalous ``relu(1/(q+ε) − 1/margin)``,
    each weighted by ``clamp(q^α)`` resp. ``clamp((1/(q+ε))^α)`` to ``[0.33, 3]`` when ``weighted``."""
    q = (pred**2).sum(dim=1)
    normal, anomalous = labels == 1, labels == -1
    loss_normal = q[normal]
    loss_anomalous = F.relu(1 / (q[anomalous] + SEPARATION_EPS) - 1 / margin)
    if weighted:
        loss_normal = loss_normal * torch.clamp(q**alpha, *WEIGHT_CLAMP)[normal]
        loss_anomalous = loss_anomalous * torch.clamp((1 / (q + SEPARATION_EPS))**alpha, *WEIGHT_CLAMP)[anomalous]
    return torch.cat([loss_normal, loss_anomalous]).mean()


def margin_loss(pred: Tensor, labels: Tensor, percentile: float) -> Tensor:
    """``calculate_margin``: with ``q = pred²`` scaled by its ``percentile`` quantile over the normal rows, the
    normal rows above the smallest anomalous one plus the anomalous rows below the normal quantile, per row."""
    q = (pred**2).sum(dim=1)
    normal = q[labels == 1]
    scale = torch.quantile(normal, percentile)
    normal, anomalous = normal / scale, q[labels == -1] / scale
    overlap = F.relu(normal - anomalous.min()).sum() + F.relu(torch.quantile(normal, percentile) - anomalous).sum()
    return overlap / q.shape[0]


def scaling_loss(local_scales: Tensor, labels: Tensor) -> Tensor:
    """Anomalous rows' scales pushed towards e, normal rows' kept at most 1."""
    return (math.e - local_scales[labels == -1]).mean() + F.relu(local_scales[labels == 1] - 1).mean()


def permutation_loss(local_scales: Tensor) -> Tensor:
    """Mismatched (permuted) pairs should look anomalous: scales pushed towards e."""
    return (math.e - local_scales).mean()


def permuted_pairs(features: Tensor, coreset_rows: Tensor, rgb_dim: int, generator: torch.Generator
                   ) -> tuple[Tensor, Tensor]:
    """``permutation``: in the first half of the batch the RGB and point features are each shuffled among the
    rows, in the second half the RGB and point parts of the coreset rows."""
    half = features.shape[0] // 2

    def shuffled(rows: Tensor) -> Tensor:
        return rows[torch.randperm(rows.shape[0], generator=generator).to(rows.device)]

    rgb, xyz = features[:, :rgb_dim], features[:, rgb_dim:]
    core_rgb, core_xyz = coreset_rows[:, :rgb_dim], coreset_rows[:, rgb_dim:]
    rgb = torch.cat([shuffled(rgb[:half]), rgb[half:]])
    xyz = torch.cat([shuffled(xyz[:half]), xyz[half:]])
    core_rgb = torch.cat([core_rgb[:half], shuffled(core_rgb[half:])])
    core_xyz = torch.cat([core_xyz[:half], shuffled(core_xyz[half:])])
    return torch.cat([rgb, xyz], dim=1), torch.cat([core_rgb, core_xyz], dim=1)


def consistency_loss(nearest: FusedDistance, near: Sequence[FusedDistance], far: Sequence[FusedDistance],
                     magnitude: float, broadcast: bool = True) -> Tensor:
    """``const``: the fused distance to the 2nd..(anchor+1)-th rows stays below ``magnitude · d̄_i / d̄₀ · s₀``, and
    the nearest row's stays below those to the next ``anchor`` rows; each term ``1/anchor · mean(relu(·))``.

    ``broadcast`` reproduces the reference's shapes: ``d̄_i / d̄₀`` is ``(B,)`` and ``s₀`` is ``(B, 1)``, so every
    row's distance is compared with every row's bound (a ``B x B`` matrix); without it, row by row."""
    anchor = len(near)
    total = nearest.value.new_zeros(())
    for other in near:
        ratio = magnitude * other.mean_distance / nearest.mean_distance
        bound = ratio * nearest.value if broadcast else ratio[:, None] * nearest.value
        total = total + F.relu(other.value - bound).mean() / anchor
    for other in far:
        total = total + F.relu(nearest.value - other.value).mean() / anchor
    return total


def _linear_weights(net: nn.Module) -> list[Tensor]:
    return [m.weight for m in net.modules() if type(m) is nn.Linear]


def l1_penalty(net: nn.Module) -> Tensor:
    """``Σ |W|`` over the weights (not the biases) of every linear layer."""
    return torch.stack([w.abs().sum() for w in _linear_weights(net)]).sum()


def l2_penalty(net: nn.Module) -> Tensor:
    """``Σ W² / 2`` over the weights of every linear layer."""
    return torch.stack([(w**2).sum() / 2 for w in _linear_weights(net)]).sum()


def add_noise(rows: Tensor, rgb_dim: int, upper: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Each row's RGB and point parts moved by a random direction (uniform in ``[0, 1)^D``, normalised) times
    ``U(0, upper_m)`` (``add_random_noise``)."""
    parts = []
    for part, bound in ((rows[:, :rgb_dim], upper[0]), (rows[:, rgb_dim:], upper[1])):
        direction = F.normalize(torch.rand(part.shape, generator=generator).to(part.device), dim=1)
        length = torch.rand((part.shape[0], 1), generator=generator).to(part.device) * bound
        parts.append(part + direction * length)
    return torch.cat(parts, dim=1)


# ------------------------------------------------------------------------------------------------ training

@dataclass
class FusionRows:
    """The fusion dataset of one class: one row per foreground patch of every pseudo sample."""

    features: Tensor  # (N, rgb_dim + xyz_dim): normalised RGB (upsampled to the point grid), point features
    neighbours: Tensor  # (N, 2·NEIGHBOURS) int64: nearest RGB coreset rows, then nearest point coreset rows
    distances: Tensor  # (N, 2) distance to the nearest RGB and point coreset row
    labels: Tensor  # (N,) int64: +1 normal, −1 anomalous


@dataclass(frozen=True)
class TrainingSettings:
    """The reference's training defaults (``config_parse.py``, ``fusion_engine_v2.py``)."""

    epochs: int = 80
    batch_size: int = 8192
    lr: float = 1.5e-4
    alpha: float = 2.0
    perc: float = 1.0
    anchor: int = 5
    magnitude: float = 1.2
    weights: dict[str, float] = field(default_factory=lambda: {
        "svdd": 1.0, "margin": 10.0, "const": 40.0, "perm": 20.0, "scaling": 3.0, "l1": 5e-4, "l2": 0.0})
    hidden: tuple[int, ...] = (512,)
    emb_dim: int = 128
    dropout: float = 0.5
    broadcast_const: bool = True  # the reference's B x B consistency term (fix_quirks: row by row)
    skip_first_validation: bool = True  # the reference never validates after the first epoch


@dataclass
class TrainedLSPN:
    net: LocalScaleNet
    raw_global: Tensor  # (2, 1) the global scales' parameters
    score_mean: Tensor  # (2,) mean normal distance per modality
    margin: float  # the separation loss's margin, 2 × the largest normalised anomalous distance
    losses: list[float]  # mean training loss per epoch
    best_epoch: int  # the epoch whose weights were kept (-1: none validated, the last one's)


def split_rows(n_rows: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``random_split(dataset, (0.5, 0.5))``: a random half (the larger one when odd) and the rest."""
    order = torch.randperm(n_rows, generator=generator)
    first = n_rows - n_rows // 2
    return order[:first], order[first:]


def balanced_batches(labels: Tensor, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch of a class-balanced ``WeightedRandomSampler`` (with replacement, as many draws as rows) in batches
    of ``batch_size``, the last partial batch dropped; positions into ``labels``."""
    counts = {int(v): int((labels == v).sum()) for v in (-1, 1)}
    weights = torch.tensor([1.0 / counts[int(v)] for v in labels], dtype=torch.float64)
    drawn = torch.multinomial(weights, labels.shape[0], replacement=True, generator=generator)
    whole = labels.shape[0] // batch_size
    return list(drawn[:whole * batch_size].split(batch_size))


def coreset_rows(neighbours: Tensor, column: int, rgb_coreset: Tensor, xyz_coreset: Tensor) -> Tensor:
    """The ``column``-th nearest RGB and point coreset rows of each patch, concatenated (``coreset_to_feature``)."""
    half = neighbours.shape[1] // 2
    return torch.cat([rgb_coreset[neighbours[:, column]], xyz_coreset[neighbours[:, half + column]]], dim=1)


class LSPNTraining:
    """The training of one class's LSPN (``FusionModelV2.train`` and ``MMScoringTrainer``)."""

    def __init__(self, rows: FusionRows, rgb_coreset: Tensor, xyz_coreset: Tensor, settings: TrainingSettings,
                 generator: torch.Generator, device: torch.device | str = "cpu", progress: bool = True):
        labels = rows.labels
        if not (labels == 1).any() or not (labels == -1).any():
            raise DataError(f"G2SF: the fusion dataset needs normal and anomalous patches; it has "
                            f"{int((labels == 1).sum())} normal and {int((labels == -1).sum())} anomalous ones "
                            f"(more pseudo-anomalies: --num_anomalies; larger images keep more of them)")
        self.batch = min(int(labels.shape[0] * 0.7) // 20, settings.batch_size)
        if self.batch < 2:
            raise DataError(f"G2SF: the fusion dataset has {labels.shape[0]} patches: the batch, 0.7 x patches / 20, "
                            f"needs at least 2 (more pseudo-anomalies: --num_anomalies)")
        self.rows, self.settings, self.generator = rows, settings, generator
        self.device, self.progress = torch.device(device), progress
        self.rgb_dim = rgb_coreset.shape[1]
        self.cores = (rgb_coreset.to(self.device), xyz_coreset.to(self.device))
        self.train_idx, self.val_idx = split_rows(labels.shape[0], generator)
        self.net = LocalScaleNet(rows.features.shape[1], settings.hidden, settings.emb_dim, settings.dropout)
        self.net.reset_parameters(generator)
        self.net.to(self.device)
        self.raw_global = torch.zeros(2, 1, device=self.device, requires_grad=True)
        self.score_mean = self._score_mean()
        self.margin = 2 * self._largest_anomalous_distance()

    def _epoch(self, subset: Tensor) -> list[Tensor]:
        """Row indices of one epoch's batches drawn from ``subset``; a batch without a normal or without an
        anomalous row is left out (the reference's losses fail on it; with its batch sizes it never happens)."""
        batches = [subset[b] for b in balanced_batches(self.rows.labels[subset], self.batch, self.generator)]
        return [b for b in batches if len(set(self.rows.labels[b].tolist())) == 2]

    def _score_mean(self) -> Tensor:
        """``normalize_score``: the mean over one epoch's training batches of their mean normal distances."""
        means = []
        for idx in self._epoch(self.train_idx):
            normal = self.rows.distances[idx][self.rows.labels[idx] == 1]
            means.append(normal.mean(dim=0))
        return torch.stack(means).mean(dim=0).to(self.device)

    def _largest_anomalous_distance(self) -> float:
        """``adaptive_margin``: the largest normalised anomalous distance over one epoch's training batches."""
        largest = []
        for idx in self._epoch(self.train_idx):
            scaled = self.rows.distances[idx] / self.score_mean.cpu().view(1, 2)
            anomalous = scaled[self.rows.labels[idx] == -1]
            if anomalous.numel():
                largest.append(float(anomalous.max()))
        return max(largest)

    def _batch(self, idx: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        features = self.rows.features[idx].to(self.device)
        labels = self.rows.labels[idx].to(self.device)
        neighbours = self.rows.neighbours[idx].to(self.device)
        cores = [coreset_rows(neighbours, k, *self.cores) for k in range(2 * self.settings.anchor + 1)]
        return features, labels, cores

    def _distance(self, features: Tensor, cores: Tensor) -> FusedDistance:
        return fused_distance(self.net, features, cores, self.score_mean, self.raw_global, self.rgb_dim)

    def losses(self, idx: Tensor) -> dict[str, Tensor]:
        """Every loss term of one training batch (``calculate_loss``)."""
        s = self.settings
        features, labels, cores = self._batch(idx)
        upper = (NOISE_FRACTION * float(self.score_mean[0]), NOISE_FRACTION * float(self.score_mean[1]))
        features = add_noise(features, self.rgb_dim, upper, self.generator)
        nearest_core = add_noise(cores[0], self.rgb_dim, upper, self.generator)
        nearest = self._distance(features, nearest_core)
        out = {"scaling": scaling_loss(nearest.local_scales, labels),
               "svdd": separation_loss(nearest.value, labels, self.margin, s.alpha, weighted=True),
               "margin": margin_loss(nearest.value, labels, s.perc)}
        shuffled = permuted_pairs(features, nearest_core, self.rgb_dim, self.generator)
        out["perm"] = permutation_loss(self._distance(*shuffled).local_scales)
        if s.anchor >= 1:
            near = [self._distance(features, cores[k]) for k in range(1, s.anchor + 1)]
            far = [self._distance(features, cores[k]) for k in range(s.anchor + 1, 2 * s.anchor + 1)]
            out["const"] = consistency_loss(nearest, near, far, s.magnitude, s.broadcast_const)
        out["l2"], out["l1"] = l2_penalty(self.net), l1_penalty(self.net)
        return out

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean unweighted separation loss + margin weight × mean margin loss over one epoch of validation batches."""
        self.net.eval()
        separation, margin = [], []
        for idx in self._epoch(self.val_idx):
            features, labels, cores = self._batch(idx)
            nearest = self._distance(features, cores[0])
            separation.append(separation_loss(nearest.value, labels, self.margin, self.settings.alpha, weighted=False))
            margin.append(margin_loss(nearest.value, labels, self.settings.perc))
        self.net.train()
        return float(torch.stack(separation).mean() + torch.stack(margin).mean() * self.settings.weights["margin"])

    def run(self) -> TrainedLSPN:
        """``--max_epoch`` epochs; the weights of the epoch with the lowest validation loss are kept.

        Dropout draws from torch's global generator (``nn.Dropout`` takes no other): it is seeded from ``generator``
        inside the training and restored after it. Small batches run on one CPU thread (each small product split
        across threads waits for a descheduled thread on a busy machine)."""
        devices = [self.device] if self.device.type == "cuda" else []
        threads = 1 if self.batch < SMALL_BATCH else torch.get_num_threads()
        with torch.random.fork_rng(devices=devices), cpu_threads(threads, self.device):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))
            return self._run()

    def _run(self) -> TrainedLSPN:
        s = self.settings
        optimiser = torch.optim.Adam(self.net.parameters(), lr=s.lr, weight_decay=WEIGHT_DECAY)
        global_optimiser = torch.optim.Adam([self.raw_global], lr=GLOBAL_LR, weight_decay=WEIGHT_DECAY)
        # the reference starts from a best loss of 1e6: an epoch whose validation loss is above it is never kept
        best = (INITIAL_BEST, -1, copy.deepcopy(self.net.state_dict()), self.raw_global.detach().clone())
        epochs = tqdm(range(s.epochs), desc="G2SF: LSPN training", unit="epoch", disable=not self.progress,
                      file=sys.stderr, leave=False)
        history = []
        self.net.train()
        for epoch in epochs:
            totals = []
            for idx in self._epoch(self.train_idx):
                terms = self.losses(idx)
                total = torch.stack([s.weights[k] * v for k, v in terms.items()]).sum()
                value = float(total.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"the LSPN's training diverged (loss {value}): lower --lr")
                optimiser.zero_grad()
                global_optimiser.zero_grad()
                total.backward()
                optimiser.step()
                global_optimiser.step()
                totals.append(value)
            history.append(sum(totals) / len(totals))
            if epoch >= 1 or not s.skip_first_validation:
                loss = self.validation_loss()
                if loss <= best[0]:
                    best = (loss, epoch, copy.deepcopy(self.net.state_dict()), self.raw_global.detach().clone())
            epochs.set_postfix(loss=f"{history[-1]:.4f}", best_epoch=best[1])
        if best[1] >= 0:
            self.net.load_state_dict(best[2])
            raw_global = best[3]
        else:  # no epoch kept (one epoch with the reference's rule, or every loss above 1e6): the last weights
            raw_global = self.raw_global.detach().clone()
        self.net.eval()
        return TrainedLSPN(self.net, raw_global, self.score_mean.detach(), self.margin, history, best[1])
