"""Unsupervised Feature Fusion (UFF, spec §7): the fusion block (§7.1), its patch-wise contrastive loss (§7.2)
over the global batch of every torch.distributed process, the strict loading of checkpoints in the reference's
format (§7.6, quirk 24) and the pretraining dumps of ``main.py --save_feature`` (§7.3, quirk 20)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from m3dm.errors import CheckpointError
from m3dm.constants import XYZ_FEATURE_DIM

RGB_FEATURE_DIM = 768  # ViT-B; the block follows the backbone's width (192 for ViT-Ti, 384 for ViT-S)
HEAD_DIM = 256


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (dropout 0), parameter names as the reference (``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FeatureFusionBlock(nn.Module):
    """LayerNorm + MLP (ratio 4) per modality; 256-d heads used only by the pretraining loss; ``T = 1``."""

    def __init__(self, xyz_dim: int = XYZ_FEATURE_DIM, rgb_dim: int = RGB_FEATURE_DIM, mlp_ratio: float = 4.0,
                 temperature: float = 1.0):
        super().__init__()
        self.xyz_dim, self.rgb_dim, self.temperature = xyz_dim, rgb_dim, temperature
        self.xyz_norm = nn.LayerNorm(xyz_dim)
        self.xyz_mlp = Mlp(xyz_dim, int(xyz_dim * mlp_ratio))
        self.rgb_norm = nn.LayerNorm(rgb_dim)
        self.rgb_mlp = Mlp(rgb_dim, int(rgb_dim * mlp_ratio))
        self.rgb_head = nn.Linear(rgb_dim, HEAD_DIM)
        self.xyz_head = nn.Linear(xyz_dim, HEAD_DIM)

    def feature_fusion(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """``(..., P, 1152)``, ``(..., P, C)`` -> ``(..., P, 1152 + C)``, xyz part first, no residual."""
        return torch.cat([self.xyz_mlp(self.xyz_norm(xyz)), self.rgb_mlp(self.rgb_norm(rgb))], dim=-1)

    def projections(self, xyz: torch.Tensor, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised RGB queries and xyz keys of the non-empty patches, pooled over the batch.

        A patch is kept when its raw xyz feature has no zero entry (empty background patches are dropped).
        """
        fused = self.feature_fusion(xyz, rgb)
        q = self.rgb_head(fused[..., self.xyz_dim:]).reshape(-1, HEAD_DIM)
        k = self.xyz_head(fused[..., :self.xyz_dim]).reshape(-1, HEAD_DIM)
        keep = (xyz.reshape(-1, self.xyz_dim) != 0).all(dim=1)
        return F.normalize(q[keep], dim=1), F.normalize(k[keep], dim=1)

    def forward(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """The pretraining loss of this process's share of the global batch (see ``contrastive_loss``).

        Without a process group (or with one process) this is the reference's loss: mean cross-entropy of
        the RGB queries against all xyz keys of the batch, times ``2T``.
        """
        q, k = self.projections(xyz, rgb)
        return contrastive_loss(q, k, self.temperature)


# ----------------------------------------------------------------------------------- contrastive loss

def distributed_world_size() -> int:
    """Processes in the default group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithGradient(torch.autograd.Function):
    """All processes' equally shaped tensors stacked in rank order; the gradient of a process's input is the sum
    over processes of the gradients of its slot (an all-reduce, then this process's slice)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Every process's ``rows`` concatenated in rank order, this process's offset into them and the total.

    Processes may hold different numbers of rows (empty patches are dropped per sample). The gather is
    autograd-aware: the gradient with respect to a process's rows sums the contributions of every process's
    loss and flows back to the process that owns them.
    """
    world = distributed_world_size()
    if world == 1:
        return rows, 0, len(rows)
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(rows)], dtype=torch.long, device=rows.device))
    counts = [int(c) for c in counts]
    padded = F.pad(rows, (0, 0, 0, max(counts) - len(rows)))  # all_gather needs equal shapes
    gathered = _AllGatherWithGradient.apply(padded)
    rank = dist.get_rank()
    return torch.cat([part[:n] for part, n in zip(gathered, counts)]), sum(counts[:rank]), sum(counts)


def contrastive_loss(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of each RGB query against the xyz keys of the whole global batch (its own key is the
    target), times ``2T`` as the reference (quirk 21: the reference offsets the targets by rank without
    gathering the keys, which only works with one process).

    Each process returns ``world · (its queries' summed cross-entropy) / (queries of all processes)``: the mean
    over processes, which DDP's gradient averaging and the logged loss take, is then the global-batch mean,
    whatever the number of processes and however the kept patches are spread over them.
    """
    all_keys, offset, total = gather_rows(keys)
    logits = queries @ all_keys.T / temperature
    targets = torch.arange(len(queries), device=queries.device) + offset
    summed = F.cross_entropy(logits.float(), targets, reduction="sum")
    return summed * (distributed_world_size() / max(total, 1) * 2 * temperature)


# ------------------------------------------------------------------------------------------ checkpoints



def read_checkpoint(path: str | Path) -> dict:
    """A ``fusion_pretrain.py`` checkpoint (a dict with a ``'model'`` state dict); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"UFF checkpoint {path} not found. Train one with fusion_pretrain.py (see docs/uff_pretraining.md) or "
            f"download the released 'UFF Module' checkpoint of M3DM and pass it with --fusion_module_path.")
    try:
        # the reference saves a pickled argparse.Namespace under 'args', which weights_only loading refuses
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), Mapping):
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict (the fusion_pretrain.py format)")
    return checkpoint


def checkpoint_rgb_dim(checkpoint: Mapping[str, Any]) -> int | None:
    """The RGB width a checkpoint was trained for: ``args['rgb_dim']`` (ours) or the RGB LayerNorm's size."""
    args = checkpoint.get("args")
    width = args.get("rgb_dim") if isinstance(args, Mapping) else getattr(args, "rgb_dim", None)
    if width is None and "rgb_norm.weight" in checkpoint["model"]:
        width = checkpoint["model"]["rgb_norm.weight"].shape[0]
    return None if width is None else int(width)


def load_block_state(block: FeatureFusionBlock, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """``load_state_dict(strict=True)`` with an error naming the file and the missing/unexpected/misshapen keys."""
    expected = block.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                   for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(f"{source}: not a UFF fusion block for RGB width {block.rgb_dim}; missing keys "
                              f"{missing[:8]}, unexpected keys {unexpected[:8]}, wrong shapes {wrong_shape[:8]}")
    block.load_state_dict(state, strict=True)


def load_fusion_block(path: str | Path, device: str | torch.device = "cpu",
                      rgb_dim: int = RGB_FEATURE_DIM) -> FeatureFusionBlock:
    """Build the block for an RGB backbone of width ``rgb_dim`` and load ``checkpoint['model']`` strictly (quirk
    24); a missing or wrong file, or one trained on another RGB width, is an error that names the file."""
    checkpoint = read_checkpoint(path)
    trained_width = checkpoint_rgb_dim(checkpoint)
    if trained_width is not None and trained_width != rgb_dim:
        raise CheckpointError(f"{path}: UFF block trained on RGB features of width {trained_width}, but the RGB "
                              f"backbone gives {rgb_dim}: use the backbone the feature dumps were made with")
    block = FeatureFusionBlock(rgb_dim=rgb_dim)
    load_block_state(block, checkpoint["model"], path)
    return block.to(device).eval()


# ----------------------------------------------------------------------------------- pretraining dumps

def scrambled_rgb_rows(rgb_patches: torch.Tensor, rows: int) -> torch.Tensor:
    """The reference's RGB layout in pretraining dumps (quirk 20): row ``t`` holds RGB token
    ``(4 (t mod n) + floor(t / n)) mod n`` of the ``n`` ViT tokens, instead of the token above it."""
    n = rgb_patches.shape[0]
    if rows != 4 * n:
        raise ValueError(f"the reference's dump layout needs 4 x {n} = {4 * n} xyz patches, got {rows}: use "
                         f"--fix_quirks for spatially aligned dumps")
    t = torch.arange(rows)
    return rgb_patches[(4 * (t % n) + t // n) % n]


def pretraining_features(xyz: torch.Tensor, rgb_patches: torch.Tensor, rgb_aligned: torch.Tensor,
                         aligned: bool) -> torch.Tensor:
    """One dumped training sample (spec §7.3): ``(3136, 1152 + C)``, unnormalised xyz patches then RGB, with
    the reference's scrambled RGB rows unless ``aligned``."""
    rgb = rgb_aligned if aligned else scrambled_rgb_rows(rgb_patches, xyz.shape[0])
    return torch.cat([xyz, rgb], dim=1).float().contiguous()


def save_pretraining_features(folder: str | Path, class_name: str, index: int, features: torch.Tensor) -> Path:
    """``<folder>/<class><index>.pt`` as the reference names them, written atomically."""
    from m3dm.data.io import atomic_path

    path = Path(folder) / f"{class_name}{index}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(features.clone(), tmp)
    return path
