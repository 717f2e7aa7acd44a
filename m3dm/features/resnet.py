"""BTF's RGB backbone: ImageNet wide-ResNet-50-2 layers 2 and 3 (timm, features only), pooled to one patch grid.

Architecture only: the weights are loaded by ``m3dm.features.weights.build_wide_resnet``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from m3dm.features.fpfh import pool_to_patches

WIDE_RESNET = "wide_resnet50_2"
WIDE_RESNET_LAYERS = (2, 3)  # timm feature indices of layer2 (stride 8, 512 channels) and layer3 (16, 1024)


class WideResNetFeatures(nn.Module):
    """``(B, 3, 224, 224)`` ImageNet-normalised images -> ``(B, 1536, grid, grid)`` patch features.

    Each layer's map is averaged 3 x 3 and pooled to the grid (``m3dm.features.fpfh.pool_to_patches``), then the
    two are concatenated along the channels (layer 2 first), as the reference does.
    """

    backbone_name = WIDE_RESNET

    def __init__(self, grid: int = 28, aligned: bool = False):
        super().__init__()
        # Any: timm types its models as a plain nn.Module; this one is a FeatureListNet (feature_info, channels)
        body: Any = timm.create_model(WIDE_RESNET, pretrained=False, features_only=True,
                                      out_indices=WIDE_RESNET_LAYERS)
        self.body = body
        self.grid, self.aligned = grid, aligned
        self.feature_dim = sum(body.feature_info.channels())
        self.checkpoint_path: Path | None = None  # set by the builder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.body(images)
        return torch.cat([pool_to_patches(m, self.grid, self.aligned) for m in maps], dim=1)
