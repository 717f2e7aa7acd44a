"""Unsupervised Feature Fusion (UFF, spec §7.1–7.2, §7.6): the fusion block, its contrastive loss and the
strict loading of checkpoints in the reference's format (``{'model': state_dict, ...}``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .constants import XYZ_FEATURE_DIM

RGB_FEATURE_DIM = 768
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
    """LayerNorm + MLP per modality; 256-d heads used only by the pretraining loss."""

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
        """``(..., P, 1152)``, ``(..., P, 768)`` -> ``(..., P, 1920)``, xyz part first, no residual."""
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
        """Single-process contrastive loss (RGB queries against xyz keys), times 2T as the reference."""
        q, k = self.projections(xyz, rgb)
        logits = q @ k.T / self.temperature
        targets = torch.arange(len(q), device=q.device)
        return F.cross_entropy(logits, targets) * (2 * self.temperature)


class CheckpointError(RuntimeError):
    pass


def load_fusion_block(path: str | Path, device: str | torch.device = "cpu",
                      rgb_dim: int = RGB_FEATURE_DIM) -> FeatureFusionBlock:
    """Build the block and load ``checkpoint['model']`` strictly; a wrong or missing file is an error that
    names the file and the missing/unexpected keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"UFF checkpoint {path} not found. Train one with fusion_pretrain.py (see README) or download the "
            f"released 'UFF Module' checkpoint of M3DM and pass it with --fusion_module_path.")
    try:
        # the reference saves a pickled argparse.Namespace under 'args', which weights_only loading refuses
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict (the fusion_pretrain.py format)")
    block = FeatureFusionBlock(rgb_dim=rgb_dim)
    expected = block.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        raise CheckpointError(f"{path}: not a UFF fusion block checkpoint; missing keys {missing[:8]}, "
                              f"unexpected keys {unexpected[:8]}, wrong shapes {wrong_shape[:8]}")
    block.load_state_dict(state, strict=True)
    return block.to(device).eval()


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
    from .data.io import atomic_path

    path = Path(folder) / f"{class_name}{index}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(features.clone(), tmp)
    return path
