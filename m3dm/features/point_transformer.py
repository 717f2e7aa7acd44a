"""Point backbone: the Point-MAE / Point-BERT "Point Transformer" encoder used by M3DM (docs/original.md).

Parameter names match the official Point-MAE / Point-BERT encoders (after the prefix mapping of
`m3dm.features.weights`): `encoder.first_conv.{0,1,3}.*`, `encoder.second_conv.{0,1,3}.*`,
`pos_embed.{0,2}.*`, `blocks.blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`, and for
Point-BERT also `reduce_dim.*`, `cls_token`, `cls_pos`.

Output: the tokens after blocks 3, 7 and 11 (0-based), each passed through the final LayerNorm, CLS dropped,
concatenated on channels -> `(B, 1152, G)`, plus the group centres `(B, G, 3)`.

Module mode (quirk 13)
---------------------------------
The reference never calls `.eval()`, so its point transformer runs in *training mode*. This module copies
that by default (a fresh `nn.Module` is in training mode) and makes it exact for batches:

* Training mode (default, reference behaviour):
  - BatchNorm in the mini-PointNet normalises with the statistics of the current forward pass, computed
    PER SAMPLE over that sample's G x K points (biased variance, eps 1e-5) -- exactly what a batch-1
    reference call does. Running statistics are neither used nor updated.
  - DropPath (stochastic depth, rate of block i = 0.1 * i / 11) is active. Draw scheme: for every sample,
    in sample order, `u = torch.rand(2 * depth, generator=generator)` is drawn on the generator's device
    (CPU when `generator` is None: the global CPU RNG). `u[2*i]` decides the attention branch of block i,
    `u[2*i + 1]` its MLP branch; a branch is kept iff `u < 1 - rate_i` and a kept branch is scaled by
    `1 / (1 - rate_i)` (timm DropPath semantics). Block 0 (rate 0) consumes its two draws but is always
    kept. Hence a batch of N clouds gives the same features (up to float round-off, ~1e-6) as N
    single-cloud calls made in order with the same generator. The random stream itself differs from the
    reference's CUDA `bernoulli_` calls, so individual drop decisions cannot match the reference bit for bit.
* Eval mode (`model.eval()`, the fix of quirk 13): BatchNorm uses the checkpoint's running statistics and
  DropPath is off; the features are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from m3dm.features.pointops import group_points, pad_clouds

VARIANT_ENCODER_DIMS = {"Point_MAE": 384, "Point_Bert": 256}
TRANS_DIM = 384
DEPTH = 12
NUM_HEADS = 6
MLP_RATIO = 4
DROP_PATH_RATE = 0.1
FETCH_BLOCKS = (3, 7, 11)


def _batch_norm_relu_(bn: nn.BatchNorm1d, x: Tensor) -> Tensor:
    """BatchNorm1d then ReLU on channels-last `(B, points, C)`, in place: in training mode with the statistics of
    each sample's own points (biased variance, as a batch-1 reference call), in eval mode with the running
    statistics. In place (without autograd) because these are the largest tensors of the forward (0.5 GB per
    cloud): fresh ones cost more in page faults than the arithmetic."""
    if bn.training:
        # two passes (mean, then mean of squared deviations): faster than var_mean over the strided point axis
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).square_().mean(dim=1, keepdim=True)
    else:
        var, mean = cast(Tensor, bn.running_var), cast(Tensor, bn.running_mean)  # BatchNorm1d tracks them
    scale = bn.weight * torch.rsqrt(var + bn.eps)
    shift = bn.bias - mean * scale
    if torch.is_grad_enabled():  # autograd cannot record out=; same values
        return F.relu(torch.addcmul(shift, x, scale))
    return torch.addcmul(shift, x, scale, out=x).relu_()


def _conv_bn_conv(layers: nn.Sequential) -> tuple[nn.Conv1d, nn.BatchNorm1d, nn.Conv1d]:
    """The reference's ``Conv1d, BatchNorm1d, ReLU, Conv1d`` block as its three layers with weights."""
    conv_a, bn, _, conv_b = layers
    return cast(nn.Conv1d, conv_a), cast(nn.BatchNorm1d, bn), cast(nn.Conv1d, conv_b)


def _pointwise(conv: nn.Conv1d, x: Tensor, bias: bool = True) -> Tensor:
    """A kernel-size-1 Conv1d applied to channels-last points: a matrix product."""
    return F.linear(x, conv.weight[:, :, 0], conv.bias if bias else None)


class MiniPointNet(nn.Module):
    """Per-group encoder: shared point MLP, max-pool, concat global, second MLP, max-pool.

    Parameters are the official Conv1d/BatchNorm1d ones; the forward runs channels-last as matrix products and
    splits the first convolution of the second stage into its global and per-point halves, so the global
    feature is transformed once per group instead of once per point (same result up to float round-off).
    """

    def __init__(self, encoder_channel: int) -> None:
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
            nn.Conv1d(512, encoder_channel, 1))

    def forward(self, neighbourhoods: Tensor) -> Tensor:
        """`(B, G, K, 3)` relative neighbourhoods -> `(B, G, encoder_channel)` tokens."""
        batch, groups, size, _ = neighbourhoods.shape
        conv_a, bn_a, conv_b = _conv_bn_conv(self.first_conv)
        x = neighbourhoods.reshape(batch, groups * size, 3)
        x = _pointwise(conv_b, _batch_norm_relu_(bn_a, _pointwise(conv_a, x)))
        local = x.view(batch, groups, size, -1)
        pooled = local.amax(dim=2)  # (B, G, 256)
        conv_c, bn_c, conv_d = _conv_bn_conv(self.second_conv)
        width = pooled.shape[-1]
        weight = conv_c.weight[:, :, 0]
        x = F.linear(local, weight[:, width:]).add_(F.linear(pooled, weight[:, :width], conv_c.bias)[:, :, None])
        x = _pointwise(conv_d, _batch_norm_relu_(bn_c, x.view(batch, groups * size, -1)))
        return x.view(batch, groups, size, -1).amax(dim=2)


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias, scale head_dim^-0.5."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block; residual branches scaled by per-sample DropPath factors when given
    (the drop rates live in `PointTransformer.drop_path_rates`)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * MLP_RATIO)  # fc1 -> exact GELU -> fc2, dropout 0 (the official keys)

    def forward(self, x: Tensor, branch_scales: Tensor | None = None) -> Tensor:
        """`branch_scales`: `(B, 2)` multipliers for the attention / MLP branch, None = keep all."""
        attn = self.attn(self.norm1(x))
        if branch_scales is not None:
            attn = attn * branch_scales[:, 0, None, None]
        x = x + attn
        mlp = self.mlp(self.norm2(x))
        if branch_scales is not None:
            mlp = mlp * branch_scales[:, 1, None, None]
        return x + mlp


class TransformerEncoder(nn.Module):
    """12 blocks; the positional embedding is added before every block; returns the fetched block outputs."""

    def __init__(self, dim: int, num_heads: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))

    def forward(self, x: Tensor, pos: Tensor, drop_scales: Tensor | None,
                fetch: Sequence[int] = FETCH_BLOCKS) -> list[Tensor]:
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x + pos, None if drop_scales is None else drop_scales[:, index])
            if index in fetch:
                outputs.append(x)
        return outputs


class PointTransformer(nn.Module):
    """Point-MAE (`encoder_dims` 384) or Point-BERT (`encoder_dims` 256, CLS token) point encoder.

    `forward(clouds, generator=None) -> (features (B, 1152, G), centres (B, G, 3))`, where `clouds` is a list
    of B clouds `(N_i, 3)` (sizes may differ) or a `(B, N, 3)` tensor. See the module docstring for the
    training-mode (reference) versus eval-mode behaviour.
    """

    def __init__(self, variant: str = "Point_MAE", num_group: int = 1024, group_size: int = 128) -> None:
        super().__init__()
        if variant not in VARIANT_ENCODER_DIMS:
            raise ValueError(f"unknown point backbone {variant!r}; expected one of {sorted(VARIANT_ENCODER_DIMS)}")
        self.variant = variant
        self.num_group = num_group
        self.group_size = group_size
        self.encoder_dims = VARIANT_ENCODER_DIMS[variant]
        self.has_cls = self.encoder_dims != TRANS_DIM
        if self.has_cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, TRANS_DIM))
            self.cls_pos = nn.Parameter(torch.randn(1, 1, TRANS_DIM))
            self.reduce_dim = nn.Linear(self.encoder_dims, TRANS_DIM)
        self.encoder = MiniPointNet(self.encoder_dims)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, TRANS_DIM))
        self.drop_path_rates = [rate.item() for rate in torch.linspace(0, DROP_PATH_RATE, DEPTH)]
        self.blocks = TransformerEncoder(TRANS_DIM, NUM_HEADS, DEPTH)
        self.norm = nn.LayerNorm(TRANS_DIM)
        self.checkpoint_path: Path | None = None  # the weight file, set by weights.build_point_backbone

    @property
    def feature_dim(self) -> int:
        return TRANS_DIM * len(FETCH_BLOCKS)

    def group(self, clouds: Sequence[Tensor] | Tensor) -> tuple[Tensor, Tensor]:
        """FPS + KNN grouping of each cloud -> `(B, G, K, 3)` relative neighbourhoods, `(B, G, 3)` centres."""
        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        if isinstance(clouds, Tensor):
            if clouds.dim() != 3 or clouds.shape[-1] != 3:
                raise ValueError(f"expected clouds of shape (B, N, 3), got {tuple(clouds.shape)}")
            return group_points(clouds.to(device, dtype), self.num_group, self.group_size)
        if len(clouds) == 0:
            raise ValueError("expected at least one point cloud")
        for cloud in clouds:
            if cloud.dim() != 2 or cloud.shape[-1] != 3:
                raise ValueError(f"expected a cloud of shape (N, 3), got {tuple(cloud.shape)}")
        # one padded batch: the FPS loop runs once for all clouds (on a GPU its ~1,000 steps of tiny kernels
        # dominate a sample's time), with the groups each cloud gets on its own
        points, lengths = pad_clouds([cloud.to(device, dtype) for cloud in clouds])
        return group_points(points, self.num_group, self.group_size, lengths)

    def drop_path_scales(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor | None:
        """Per-sample residual-branch multipliers `(B, depth, 2)` (training mode) or None (eval mode)."""
        if not self.training:
            return None
        draw_device = generator.device if generator is not None else torch.device("cpu")
        draws = torch.stack([torch.rand(2 * DEPTH, generator=generator, device=draw_device)
                             for _ in range(batch_size)]).view(batch_size, DEPTH, 2)
        keep = torch.tensor([1.0 - rate for rate in self.drop_path_rates], dtype=torch.float32)[None, :, None]
        scales = (draws.cpu() < keep).float() / keep
        return scales.to(self.norm.weight)

    def forward_groups(self, neighbourhoods: Tensor, centres: Tensor,
                       generator: torch.Generator | None = None) -> Tensor:
        """Encoder + transformer on already grouped points -> `(B, 1152, G)` (contiguous)."""
        scales = self.drop_path_scales(neighbourhoods.shape[0], generator)
        return self.group_tokens(neighbourhoods, centres, scales).transpose(1, 2).contiguous()

    def group_tokens(self, neighbourhoods: Tensor, centres: Tensor, scales: Tensor | None) -> Tensor:
        """Encoder + transformer on already grouped points with given DropPath multipliers (None: eval mode) ->
        `(B, G, 1152)`; the exported graph calls it with multipliers drawn outside the graph."""
        tokens = self.encoder(neighbourhoods)
        pos = self.pos_embed(centres)
        if self.has_cls:
            batch = tokens.shape[0]
            tokens = torch.cat([self.cls_token.expand(batch, -1, -1), self.reduce_dim(tokens)], dim=1)
            pos = torch.cat([self.cls_pos.expand(batch, -1, -1), pos], dim=1)
        fetched = self.blocks(tokens, pos, scales)
        start = 1 if self.has_cls else 0
        return torch.cat([self.norm(x)[:, start:] for x in fetched], dim=-1)

    def forward(self, clouds: Sequence[Tensor] | Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        neighbourhoods, centres = self.group(clouds)
        return self.forward_groups(neighbourhoods, centres, generator), centres
