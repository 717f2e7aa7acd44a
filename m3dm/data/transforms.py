"""Per-sample tensors exactly as the reference builds them (docs/original.md: Data), without torchvision."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from m3dm.constants import IMAGENET_MEAN, IMAGENET_STD, RGB_SIZE

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


def rgb_to_tensor(image: Image.Image, size: int = RGB_SIZE) -> torch.Tensor:
    """PIL bicubic resize to ``size``², scale to [0, 1], ImageNet-normalise -> ``(3, size, size)`` float32."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) / np.float32(255)
    return torch.from_numpy(((pixels - _MEAN) / _STD).transpose(2, 0, 1).copy())


def organized_pc_to_tensor(cloud: np.ndarray, size: int) -> torch.Tensor:
    """``(H, W, 3)`` cloud -> ``(3, size, size)`` float32, nearest (legacy PyTorch rule), zeros stay zeros."""
    grid = torch.from_numpy(np.ascontiguousarray(cloud)).permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(grid, size=(size, size), mode="nearest")[0].float()


def mask_to_tensor(mask: Image.Image, size: int = RGB_SIZE) -> torch.Tensor:
    """Grey mask -> nearest resize -> ``(1, size, size)`` float32 of 0/1 (value/255 > 0.5)."""
    resized = np.asarray(mask.convert("L").resize((size, size), Image.Resampling.NEAREST), dtype=np.float32) / 255
    return torch.from_numpy((resized > 0.5).astype(np.float32))[None]


def valid_point_mask(organized_pc: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` -> ``(..., H, W)`` bool: a point is valid when all three coordinates are non-zero."""
    return (organized_pc != 0).all(dim=-3)
