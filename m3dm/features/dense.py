"""Per-pixel features at the image size (CFM's grid): the ViT map upsampled, the point features projected.

The memory-bank methods pool both modalities to 56 x 56 patches (``alignment.pfa_patches``). Crossmodal feature
mapping works on every pixel of the ``img_size`` x ``img_size`` grid instead: the RGB map is upsampled bilinearly
(``align_corners=False``) and the point-group features are interpolated to every valid point and projected with
the same 3x3 average pool and adaptive average pool as PFA, but to the full grid (``out_size = img_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from m3dm.features.alignment import interpolate_to_points, project_to_patches


@dataclass
class PointGroups:
    """The point backbone's output for one sample, before any pooling, with what projecting it needs."""

    points: Tensor  # (Nv, 3) valid points, row-major over the organized cloud
    flat_index: Tensor  # (Nv,) their pixel index in the img_size x img_size grid
    centres: Tensor  # (G, 3) group centres
    features: Tensor  # (G, C) group features
    img_size: int  # side of the organized cloud's grid
    clamp: bool = False  # clamp negative squared distances in the interpolation (quirk 18, --fix_quirks)

    def to(self, device) -> PointGroups:
        return PointGroups(self.points.to(device), self.flat_index.to(device), self.centres.to(device),
                           self.features.to(device), self.img_size, self.clamp)


def dense_rgb(rgb_map: Tensor, size: int) -> Tensor:
    """``(C, h, w)`` ViT map -> ``(size², C)`` per-pixel features (bilinear, ``align_corners=False``)."""
    upsampled = F.interpolate(rgb_map[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    return upsampled.flatten(1).T


def dense_points(groups: PointGroups) -> Tensor:
    """Point-group features -> ``(img_size², C)`` per-pixel features; pixels the pooling does not reach are 0."""
    per_point = interpolate_to_points(groups.points, groups.centres, groups.features.float(), groups.clamp)
    return project_to_patches(per_point, groups.flat_index, groups.img_size, groups.img_size)


def valid_pixels(dense_xyz: Tensor, by_sum: bool = True) -> Tensor:
    """The pixels with point features, ``(P,)`` bool: where the features do not sum to 0 (``by_sum``, CFM's
    reference), or where any feature is non-zero (LayerNorm outputs sum to about 0, so the sum can vanish at a
    pixel that has features: quirk C6)."""
    return dense_xyz.sum(dim=1) != 0 if by_sum else (dense_xyz != 0).any(dim=1)
