"""BTF's hand-crafted point features: Open3D normals and FPFH histograms on the organized cloud, pooled to patches.

BTF (3D-ADS) computes them on the valid points of the 224 x 224 organized cloud (all three coordinates non-zero),
with no voxel downsampling: the "voxel size" 0.05 only sets the radii (normals: 2 x, at most 30 neighbours;
FPFH: 5 x, at most 100 neighbours). The 33 histogram values go back to their pixels (zeros elsewhere), and the map
is averaged 3 x 3 (stride 1, no padding: 224 -> 222) and adaptively pooled to the patch grid (28 x 28).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from m3dm.features.alignment import valid_points
from m3dm.runtime import import_open3d

FPFH_DIM = 33  # 3 angle features x 11 bins


@dataclass(frozen=True)
class FPFHParams:
    """The reference's neighbourhoods (metres): radii from its voxel size, neighbour caps."""

    voxel_size: float = 0.05
    normal_max_nn: int = 30
    feature_max_nn: int = 100

    @property
    def normal_radius(self) -> float:
        return self.voxel_size * 2

    @property
    def feature_radius(self) -> float:
        return self.voxel_size * 5


def fpfh_of_points(points: np.ndarray, params: FPFHParams = FPFHParams()) -> np.ndarray:
    """``(N, 3)`` points -> ``(N, 33)`` float64 FPFH histograms (Open3D normals estimated first, unoriented)."""
    o3d = import_open3d("BTF's FPFH features")  # imported here: only the BTF point methods need it

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=params.normal_radius,
                                                                max_nn=params.normal_max_nn))
    feature = o3d.pipelines.registration.compute_fpfh_feature(
        cloud, o3d.geometry.KDTreeSearchParamHybrid(radius=params.feature_radius, max_nn=params.feature_max_nn))
    return np.array(feature.data).T  # a copy: Open3D's buffer is read-only


def fpfh_map(organized_pc: torch.Tensor, params: FPFHParams = FPFHParams()) -> torch.Tensor:
    """``(3, S, S)`` organized cloud -> ``(33, S, S)`` float64 map: each valid pixel's FPFH, zeros elsewhere."""
    size = organized_pc.shape[-2:]
    points, flat_index = valid_points(organized_pc.detach().cpu())
    grid = torch.zeros(size[0] * size[1], FPFH_DIM, dtype=torch.float64)
    if len(points):
        grid[flat_index] = torch.from_numpy(fpfh_of_points(points.numpy(), params))
    return grid.T.reshape(FPFH_DIM, *size)


def pool_to_patches(feature_map: torch.Tensor, grid: int, aligned: bool = False) -> torch.Tensor:
    """``(B, C, H, W)`` maps -> ``(B, C, grid, grid)``: 3 x 3 local average, then adaptive average pooling.

    The reference's local average has no padding (the map loses a one-pixel border, so the patches end up shifted
    by up to a pixel of the input); ``aligned`` pads it (borders averaged over the pixels present) so each patch
    covers its own share of the map (``--fix_quirks``).
    """
    if aligned:
        local = F.avg_pool2d(feature_map, 3, stride=1, padding=1, count_include_pad=False)
    else:
        local = F.avg_pool2d(feature_map, 3, stride=1)
    return F.adaptive_avg_pool2d(local, grid)


class FPFHFeatures:
    """The point "backbone" of the BTF methods: organized clouds -> FPFH patches; no weights, nothing to load."""

    feature_dim = FPFH_DIM

    def __init__(self, grid: int = 28, aligned: bool = False, params: FPFHParams = FPFHParams()):
        import_open3d("BTF's FPFH features")  # missing: said when the extractor is built, before any fitting
        self.grid, self.aligned, self.params = grid, aligned, params

    def __call__(self, organized_pc: torch.Tensor) -> torch.Tensor:
        """``(3, S, S)`` -> ``(grid², 33)`` float32 patches, row-major over the grid (pooled in float64)."""
        pooled = pool_to_patches(fpfh_map(organized_pc, self.params)[None], self.grid, self.aligned)[0]
        return pooled.flatten(1).T.to(torch.float32).contiguous()
