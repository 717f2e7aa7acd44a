"""BTF's methods (``BTF_RGB``, ``BTF_FPFH``, ``BTF_RGB+FPFH``) as one traceable module: the memory-bank graph of
:class:`m3dm.export.graph.BankGraph` with BTF's features.

The wide-ResNet's layers 2 and 3 run in the graph, their pooling to the patch grid written as matrix products
(ONNX has no adaptive average pooling to a size that does not divide the input). The FPFH patches are an input:
the runner computes them in NumPy (``m3dm_runner.fpfh``, bit-identical to the pipeline's Open3D features) from the
parameters the artefact's metadata records.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3dm.export.graph import BankGraph, adaptive_pool_matrix
from m3dm.features.fpfh import FPFH_DIM

RGB_SIZE = 224
FPFH_INPUT = "fpfh"  # the input the runner computes with m3dm_runner.fpfh


class PooledWideResNet(nn.Module):
    """``m3dm.features.resnet.WideResNetFeatures`` with its pooling as ``P @ map @ Pᵀ`` per layer."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.body, self.aligned = backbone.body, backbone.aligned
        sizes = [RGB_SIZE // stride for stride in backbone.body.feature_info.reduction()]
        for i, size in enumerate(sizes):
            local = size if self.aligned else size - 2  # the 3 x 3 average drops a border unless padded
            self.register_buffer(f"pool_{i}", adaptive_pool_matrix(local, backbone.grid), persistent=False)
        self.n_layers = len(sizes)

    def forward(self, images: Tensor) -> Tensor:
        pooled = []
        for i, feature_map in enumerate(self.body(images)):
            if self.aligned:
                local = F.avg_pool2d(feature_map, 3, stride=1, padding=1, count_include_pad=False)
            else:
                local = F.avg_pool2d(feature_map, 3, stride=1)
            matrix = getattr(self, f"pool_{i}")
            pooled.append(matrix @ local @ matrix.T)
        return torch.cat(pooled, dim=1)


class BTFGraph(BankGraph):
    """A fitted BTF detector: ``forward(rgb, fpfh) -> (image scores (B,), maps (B, 224, 224))``; ``fpfh (B, grid²,
    33)`` float32, the pooled FPFH patches (unused inputs are dropped from the artefact)."""

    def __init__(self, detector, extractor) -> None:
        super().__init__(detector, extractor)
        if self.rgb_backbone is not None:
            self.rgb_backbone = PooledWideResNet(self.rgb_backbone)
        self.fpfh = extractor.point_features
        self.uses_fpfh = self.fpfh is not None

    def example_inputs(self, batch: int) -> dict[str, Tensor]:
        """Inputs to trace with (any values: the graph has no value-dependent control flow)."""
        generator = torch.Generator().manual_seed(0)
        grid = next(iter(self.grids.values()))
        return {"rgb": torch.rand(batch, 3, RGB_SIZE, RGB_SIZE, generator=generator),
                FPFH_INPUT: torch.rand(batch, grid * grid, FPFH_DIM, generator=generator) * 10}

    def extra_metadata(self) -> dict:
        """What the runner needs to compute the FPFH input as the pipeline does."""
        if self.fpfh is None:
            return {}
        params = self.fpfh.params
        return {"fpfh": {"grid": self.fpfh.grid, "aligned": bool(self.fpfh.aligned),
                         "normal_radius": params.normal_radius, "normal_max_nn": params.normal_max_nn,
                         "feature_radius": params.feature_radius, "feature_max_nn": params.feature_max_nn}}

    def modality_patches(self, rgb: Tensor, points: Tensor, pixels: Tensor, centres: Tensor,
                         draws: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError("BTFGraph takes the FPFH patches as an input: call forward(rgb, fpfh)")

    def forward(self, rgb: Tensor, fpfh: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        patches: dict[str, Tensor] = {}
        if self.rgb_backbone is not None:
            patches["rgb"] = self.rgb_backbone(rgb).flatten(2).transpose(1, 2)
        if fpfh is not None:
            patches["xyz"] = fpfh
        if "rgb+xyz" in self.modalities:
            patches["rgb+xyz"] = torch.cat((patches["rgb"], patches["xyz"]), dim=-1)
        return self.score(patches)
