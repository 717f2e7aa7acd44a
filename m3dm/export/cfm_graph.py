"""A fitted CFM detector (``m3dm.detection.cfm``) with its backbones as one traceable module, as ``BankGraph``
is for the memory-bank methods: the same inputs, ``(image scores (B,), maps (B, 224, 224))`` out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3dm.detection.cfm import BOX_FILTERS, unit_distance
from m3dm.export.graph import PointFeatures, batched_gather

PARTS_PER_RUN = 1  # the runner's chunks of a batch (extra_metadata)


def adaptive_windows(size_in: int, size_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """First cell, whether a second cell follows, and the width of ``F.adaptive_avg_pool1d``'s windows, for an
    output no smaller than the input (windows of one or two cells)."""
    starts = [(i * size_in) // size_out for i in range(size_out)]
    ends = [-((-(i + 1) * size_in) // size_out) for i in range(size_out)]
    if any(e - s > 2 for s, e in zip(starts, ends)):
        raise ValueError(f"adaptive pooling {size_in} -> {size_out} has windows wider than two cells")
    return (torch.tensor(starts), torch.tensor([e - s == 2 for s, e in zip(starts, ends)]),
            torch.tensor([float(e - s) for s, e in zip(starts, ends)]))


class CFMGraph(nn.Module):
    """``CFMDetector.predict`` of a batch: dense RGB (bilinear) and point features (interpolation, 3 x 3 average,
    adaptive average to the grid), both mappings on the valid pixels, the distance product, the box smoothing and
    the normalisation by the mean of the non-zero pixels."""

    starts: Tensor
    second: Tensor
    widths: Tensor

    def __init__(self, detector, extractor) -> None:
        super().__init__()
        self.rgb_backbone = extractor.rgb_backbone
        self.points = PointFeatures(extractor.point_backbone, extractor.img_size, extractor.img_size,
                                    extractor.clamp_pfa)
        self.rgb_to_xyz, self.xyz_to_rgb = detector._mappings("CFM is not trained")
        self.size = extractor.img_size
        self.fix_quirks = detector.config.fix_quirks
        starts, second, widths = adaptive_windows(self.size - 2, self.size)
        self.register_buffer("starts", starts, persistent=False)
        self.register_buffer("second", second, persistent=False)
        self.register_buffer("widths", widths, persistent=False)

    @property
    def uses_drop_path(self) -> bool:
        return self.points.backbone.training

    def extra_metadata(self) -> dict:
        """The runner feeds the graph one part per run: a part's dense per-pixel features, (1152, 224, 224) grids,
        make one run take about 2.7 GB a part on onnxruntime, and 8 parts in one run went past 21 GB."""
        return {"parts_per_run": PARTS_PER_RUN}

    def adaptive_pool(self, grid: Tensor) -> Tensor:
        """``F.adaptive_avg_pool2d`` from ``size - 2`` up to ``size``, summing each window in its loop order."""
        last = grid.shape[-1] - 1
        rows0, rows1 = self.starts, (self.starts + 1).clamp(max=last)
        top, bottom = grid[..., rows0, :], grid[..., rows1, :] * self.second[:, None].float()
        corners = [part[..., cols] for part in (top, bottom) for cols in (rows0, rows1)]  # a square grid
        col_mask = self.second.float()
        total = ((corners[0] + corners[1] * col_mask) + corners[2]) + corners[3] * col_mask
        return total / (self.widths[:, None] * self.widths[None, :])

    def dense_points(self, points: Tensor, pixels: Tensor, centres: Tensor, draws: Tensor | None) -> Tensor:
        """``m3dm.features.dense.dense_points`` of every sample: ``(B, size², C)``."""
        neighbourhoods, centre_points = self.points.groups(points, pixels, centres)
        features = self.points.tokens(neighbourhoods, centre_points, draws)  # (B, G, C)
        centre_idx, weights = self.points.interpolation(points, pixels, centre_points)
        terms = batched_gather(features, centre_idx) * weights[..., None]  # (B, N, 3, C)
        per_point = (terms[:, :, 0] + terms[:, :, 1]) + terms[:, :, 2]  # torch.sum's order
        batch, channels, cells = per_point.shape[0], per_point.shape[-1], self.size * self.size
        target = torch.where(pixels >= 0, pixels, torch.full_like(pixels, cells))  # padding to a spare cell
        grid = per_point.new_zeros(batch, cells + 1, channels)
        grid = grid.scatter(1, target[..., None].expand(-1, -1, channels), per_point)
        grid = grid[:, :cells].transpose(1, 2).reshape(batch, channels, self.size, self.size)
        pooled = self.adaptive_pool(F.avg_pool2d(grid, kernel_size=3, stride=1))
        return pooled.flatten(2).transpose(1, 2).contiguous()  # the layout dense_points sums the features in

    def product_maps(self, rgb: Tensor, xyz: Tensor) -> Tensor:
        # the reference's valid pixels have features summing to non-zero (quirk C6); "any feature non-zero" is the
        # same set wherever that sum's being 0 does not depend on its summation order (docs/deployment.md), and it
        # does not depend on the last bits of the features either, which onnxruntime's kernels change
        valid = (xyz != 0).any(dim=-1)
        flat_valid = valid.reshape(-1).nonzero()[:, 0]
        rgb_rows = rgb.reshape(-1, rgb.shape[-1]).index_select(0, flat_valid)
        xyz_rows = xyz.reshape(-1, xyz.shape[-1]).index_select(0, flat_valid)
        product = unit_distance(self.xyz_to_rgb(xyz_rows), rgb_rows) * unit_distance(self.rgb_to_xyz(rgb_rows),
                                                                                     xyz_rows)
        full = product.new_zeros(valid.numel()).scatter(0, flat_valid, product)
        return full.view(-1, self.size, self.size)

    def forward(self, rgb: Tensor, points: Tensor, pixels: Tensor, centres: Tensor,
                draws: Tensor | None = None) -> tuple[Tensor, Tensor]:
        rgb_map = self.rgb_backbone(rgb)
        dense_rgb = F.interpolate(rgb_map, size=(self.size, self.size), mode="bilinear", align_corners=False)
        dense_rgb = dense_rgb.flatten(2).transpose(1, 2)
        x = self.product_maps(dense_rgb, self.dense_points(points, pixels, centres, draws))[:, None]
        for width, passes in BOX_FILTERS:
            kernel = torch.ones(1, 1, width, width, dtype=x.dtype) / width**2
            for _ in range(passes):
                x = F.conv2d(x, kernel, padding=width // 2)
        smoothed = x[:, 0]
        nonzero = (smoothed != 0).float()
        count = nonzero.sum(dim=(-2, -1), keepdim=True)
        mean = (smoothed * nonzero).sum(dim=(-2, -1), keepdim=True) / count.clamp(min=1)
        scaled = smoothed / torch.sqrt(mean)
        image = scaled.amax(dim=(-2, -1))
        score_map = scaled if self.fix_quirks else smoothed / mean
        empty = count[:, 0, 0] == 0  # no valid pixel: a flat map and a zero score, as CFM's normalise
        return torch.where(empty, torch.zeros_like(image), image), torch.where(empty[:, None, None],
                                                                               torch.zeros_like(score_map), score_map)
