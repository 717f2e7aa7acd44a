"""A fitted G2SF detector (``m3dm.detection.g2sf``) with its backbones as one traceable module, as ``BankGraph``
is for the memory-bank methods: the same inputs, ``(image scores (B,), maps (B, 224, 224))`` out.

:class:`G2SFScorer` is ``G2SFDetector.predict`` of a batch: the RGB patches normalised by the RGB bank's statistics
and upsampled (nearest) to the point grid, each patch's ``anchor + 1`` nearest rows of each coreset (one matrix
product per bank chunk with ``torch.cdist``'s formula, then one ``TopK``), the LSPN's fused distance to each
pair of i-th neighbours (``m3dm.detection.lspn.fused_distance`` itself, traced), their aggregation, the image
score (the largest patch score) and the map with the run's blur. Differences from the eager path are float
round-off (the distance products, the reductions' order); a near-tie between two coreset rows may then order them
differently and pair other neighbours, which moves that patch's score by the difference of two fused distances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3dm.detection.lspn import aggregate, fused_distance
from m3dm.export.graph import BankScorer, MapMaker, PointFeatures
from m3dm.features.extractor import XYZ_PATCH_GRID


def nearest_rows_chunked(queries: Tensor, scorer: BankScorer, k: int) -> Tensor:
    """Indices ``(Q, k)`` of the ``k`` nearest rows of ``scorer``'s bank, nearest first (``torch.cdist`` then
    ``topk``, as ``G2SFDetector.patch_scores``), with the distance formula of ``m3dm.export.graph.chunked_nearest``."""
    query_norms = queries.square().sum(-1, keepdim=True)
    distances = [(query_norms - 2 * queries @ chunk + norms).clamp(min=1e-30).sqrt()
                 for chunk, norms in zip(scorer.bank_chunks(), scorer.bank_norms())]
    whole = distances[0] if len(distances) == 1 else torch.cat(distances, dim=1)
    return whole.topk(k, dim=1, largest=False, sorted=True).indices


class G2SFScorer(nn.Module):
    """The trained detector's part: ``forward(rgb_map (B, C, h, w), xyz (B, 56², D)) -> (scores, maps)``."""

    score_mean: Tensor
    raw_global: Tensor

    def __init__(self, detector) -> None:
        super().__init__()
        net, raw_global, score_mean = detector._trained()
        self.net = net.eval()
        rgb, xyz = detector.banks["rgb"], detector.banks["xyz"]
        # BankScorer holds a bank in chunks with its normalisation; its re-weighting settings are unused here
        self.rgb_bank = BankScorer(rgb.bank.float(), rgb.mean, rgb.std, eps=0.0, divisor=1.0)
        self.xyz_bank = BankScorer(xyz.bank.float(), xyz.mean, xyz.std, eps=0.0, divisor=1.0)
        self.register_buffer("score_mean", score_mean.detach().float().cpu())
        self.register_buffer("raw_global", raw_global.detach().float().cpu())
        self.rgb_dim = rgb.bank.shape[1]
        self.k = min(detector.config.anchor + 1, rgb.bank.shape[0], xyz.bank.shape[0])
        self.mode = detector.config.scoring_mode
        self.maps = MapMaker(detector.config.blur)

    def patch_scores(self, rgb_map: Tensor, xyz: Tensor) -> Tensor:
        """``(B, 56²)`` aggregated fused distances (``G2SFDetector.patch_scores`` of every sample)."""
        batch, n_patches = xyz.shape[0], xyz.shape[1]
        rgb = F.interpolate(self.rgb_bank.normalise(rgb_map), size=(XYZ_PATCH_GRID, XYZ_PATCH_GRID), mode="nearest")
        features = torch.cat([rgb.flatten(2).transpose(1, 2), xyz], dim=-1).reshape(batch * n_patches, -1)
        background = (xyz.sum(dim=-1) == 0).reshape(-1)
        rgb_idx = nearest_rows_chunked(features[:, :self.rgb_dim], self.rgb_bank, self.k)
        xyz_idx = nearest_rows_chunked(features[:, self.rgb_dim:], self.xyz_bank, self.k)
        scores = []
        for i in range(self.k):  # at most anchor + 1 (6) traced copies of the small LSPN
            cores = torch.cat([self.rgb_bank.rows(rgb_idx[:, i]), self.xyz_bank.rows(xyz_idx[:, i])], dim=1)
            fused = fused_distance(self.net, features, cores, self.score_mean, self.raw_global, self.rgb_dim,
                                   background)
            scores.append(fused.value[:, 0])
        return aggregate(torch.stack(scores, dim=1), self.mode).view(batch, n_patches)

    def forward(self, rgb_map: Tensor, xyz: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.patch_scores(rgb_map, xyz)
        return scores.amax(dim=1), self.maps(scores, XYZ_PATCH_GRID)


class G2SFGraph(nn.Module):
    """``G2SFDetector`` with its extractor's backbones: ``forward(rgb, points, pixels, centres[, drop_path_draws])``
    (inputs: ``m3dm.export.graph.PointFeatures``)."""

    def __init__(self, detector, extractor) -> None:
        super().__init__()
        self.rgb_backbone = extractor.rgb_backbone
        self.points = PointFeatures(extractor.point_backbone, extractor.img_size, XYZ_PATCH_GRID,
                                    extractor.clamp_pfa)
        self.scorer = G2SFScorer(detector)

    @property
    def uses_drop_path(self) -> bool:
        return self.points.backbone.training

    def forward(self, rgb: Tensor, points: Tensor, pixels: Tensor, centres: Tensor,
                draws: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.scorer(self.rgb_backbone(rgb), self.points(points, pixels, centres, draws))
