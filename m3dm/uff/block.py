"""The Unsupervised Feature Fusion block (UFF, docs/original.md) and its strict loading from a ``fusion_pretrain.py``
checkpoint (quirk 24)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from m3dm.constants import XYZ_FEATURE_DIM
from m3dm.errors import CheckpointError
from m3dm.features.weights import load_strict, read_uff_checkpoint, uff_checkpoint_rgb_dim
from m3dm.uff.loss import contrastive_loss

RGB_FEATURE_DIM = 768  # ViT-B; the block follows the backbone's width (192 for ViT-Ti, 384 for ViT-S)
HEAD_DIM = 256
MISSING_CHECKPOINT_HINT = ("Train one with fusion_pretrain.py (see docs/uff_pretraining.md) or download the "
                           "released 'UFF Module' checkpoint of M3DM and pass it with --fusion_module_path.")


class FeatureFusionBlock(nn.Module):
    """LayerNorm + MLP (ratio 4) per modality; 256-d heads used only by the pretraining loss; ``T = 1``.

    The MLPs are Linear -> exact GELU -> Linear with dropout 0, parameter names as the reference's (``fc1``,
    ``fc2``)."""

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


def load_block_state(block: FeatureFusionBlock, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load a state dict strictly, unexpected keys included; the error names the file and the missing,
    unexpected and misshapen keys."""
    load_strict(block, state, source, allow_unexpected=False,
                description=f"a UFF fusion block for RGB width {block.rgb_dim}")


def load_fusion_block(path: str | Path, device: str | torch.device = "cpu",
                      rgb_dim: int = RGB_FEATURE_DIM) -> FeatureFusionBlock:
    """Build the block for an RGB backbone of width ``rgb_dim`` and load ``checkpoint['model']`` strictly (quirk
    24); a missing or wrong file, or one trained on another RGB width, is an error that names the file."""
    checkpoint = read_uff_checkpoint(path, "UFF checkpoint", MISSING_CHECKPOINT_HINT)
    trained_width = uff_checkpoint_rgb_dim(checkpoint)
    if trained_width is not None and trained_width != rgb_dim:
        raise CheckpointError(f"{path}: UFF block trained on RGB features of width {trained_width}, but the RGB "
                              f"backbone gives {rgb_dim}: use the backbone the feature dumps were made with")
    block = FeatureFusionBlock(rgb_dim=rgb_dim)
    load_block_state(block, checkpoint["model"], path)
    return block.to(device).eval()


# Until m3dm.app.run imports them from m3dm.uff.dumps (kept so the command line works meanwhile).
from m3dm.uff.dumps import pretraining_features, save_pretraining_features  # noqa: E402, F401
