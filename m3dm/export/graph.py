"""A fitted memory-bank detector (M3DM's six methods, BTF's) with its backbones as one traceable module.

:class:`BankGraph` computes what ``m3dm.app.predict.Predictor.score`` does for a batch: backbones, Point Feature
Alignment, every bank's normalisation, nearest-neighbour search and re-weighted score, the maps with the reference's
blur, and single / add / decision-layer fusion. Only farthest point sampling (a loop of ``num_group`` steps) stays
outside: ``m3dm_runner`` computes it in NumPy and feeds the centres (see :data:`POINT_INPUTS`). Everything else is
batched tensor arithmetic with static loops of at most a few steps, so the exported graph stays a few hundred nodes.

Differences from the eager path, all at float round-off: the patch distances use one matrix product per bank
chunk (``torch.cdist``'s formula, not its exact kernels), the decision layer multiplies in float64 like
scikit-learn. The maps go through the same 8-bit quantisation and Pillow blur (``m3dm.export.blur``), so a
round-off that moves a pixel across an 8-bit level moves the blurred map by one level (``max/255``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3dm.export.blur import box_pass_matrix, quantised_blur
from m3dm.features.alignment import INTERPOLATION_EPS, INTERPOLATION_NEIGHBOURS, _pooling_table
from m3dm.features.point_transformer import PointTransformer
from m3dm.memory.maps import gaussian_kernel
from m3dm.memory.search import nearest_neighbours

MAP_SIZE = 224
BANK_CHUNK_ROWS = 16384  # bank rows per distance block: the graph's distance matrices stay (queries, 16384)
# inputs the runner computes from the organized cloud: valid points, their pixel, FPS centres, DropPath draws
POINT_INPUTS = ("points", "pixels", "centres")
DROP_PATH_INPUT = "drop_path_draws"


def squared_distances(query: Tensor, points: Tensor) -> Tensor:
    """``(B, M, 3)``, ``(B, N, 3)`` -> ``(B, M, N)``, ``((dx² + dy²) + dz²)`` as ``m3dm.features.pointops``."""
    dist = (query[..., 0, None] - points[..., None, :, 0]).square()
    for axis in (1, 2):
        dist = dist + (query[..., axis, None] - points[..., None, :, axis]).square()
    return dist


def squared_norms(points: Tensor) -> Tensor:
    """``(..., 3)`` -> ``(...)``, summed as ``torch.sum`` does on the CPU, ``(x² + y²) + z²`` (onnxruntime's
    ReduceSum may sum in another order, and a point at a centre's own pixel has a distance of pure round-off that
    its interpolation weight ``1 / (d + 1e-8)`` magnifies)."""
    squares = points.square()
    return (squares[..., 0] + squares[..., 1]) + squares[..., 2]


def batched_gather(values: Tensor, index: Tensor) -> Tensor:
    """``values (B, N, C)`` at ``index (B, *S)`` per batch row -> ``(B, *S, C)``."""
    batch, channels = values.shape[0], values.shape[-1]
    flat = index.reshape(batch, -1, 1).expand(-1, -1, channels)
    return values.gather(1, flat).reshape(*index.shape, channels)


class PointFeatures(nn.Module):
    """Grouping (KNN of the given FPS centres), the point transformer and PFA -> ``(B, 56², 1152)`` patches.

    ``points (B, N, 3)``: each sample's valid points in row-major pixel order, padded with copies of its first
    point; ``pixels (B, N)``: their flat pixel index, -1 on padding; ``centres (B, G)``: FPS indices into
    ``points``; ``draws (B, 12, 2)``: the DropPath uniforms of a training-mode backbone (quirk 13), else None.
    """

    cells: Tensor
    cell_weights: Tensor
    keep: Tensor

    def __init__(self, backbone: PointTransformer, img_size: int, grid: int, clamp: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.img_size, self.grid, self.clamp = img_size, grid, clamp
        cells, weights = _pooling_table(img_size, grid, torch.device("cpu"), torch.float32)
        self.register_buffer("cells", cells, persistent=False)
        self.register_buffer("cell_weights", weights, persistent=False)
        keep = torch.tensor([1.0 - rate for rate in backbone.drop_path_rates], dtype=torch.float32)
        self.register_buffer("keep", keep[None, :, None], persistent=False)

    def groups(self, points: Tensor, pixels: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
        centre_points = batched_gather(points, centres)
        dist = squared_distances(centre_points, points).masked_fill((pixels < 0)[:, None, :], float("inf"))
        neighbours = dist.topk(self.backbone.group_size, dim=-1, largest=False, sorted=True).indices
        return batched_gather(points, neighbours) - centre_points.unsqueeze(2), centre_points

    def tokens(self, neighbourhoods: Tensor, centres: Tensor, draws: Tensor | None) -> Tensor:
        """The point backbone's tokens `(B, G, 1152)`, with the DropPath multipliers made from given draws."""
        scales = None if draws is None else (draws < self.keep).float() / self.keep
        return self.backbone.group_tokens(neighbourhoods, centres, scales)

    def interpolation(self, points: Tensor, pixels: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
        """``alignment.interpolation_weights`` of every sample: the 3 nearest centres of each point and their
        weights ``(B, N, 3)``; 0 on padding."""
        dist = -2 * (points @ centres.transpose(1, 2))
        dist = dist + squared_norms(points)[..., None] + squared_norms(centres)[:, None, :]
        if self.clamp:
            dist = dist.clamp(min=0)
        top_dist, centre_idx = dist.topk(INTERPOLATION_NEIGHBOURS, dim=-1, largest=False, sorted=True)
        reciprocal = 1.0 / (top_dist + INTERPOLATION_EPS)
        total = (reciprocal[..., 0] + reciprocal[..., 1]) + reciprocal[..., 2]  # torch.sum's order
        return centre_idx, reciprocal / total[..., None] * (pixels >= 0)[..., None].float()

    def patch_matrix(self, points: Tensor, pixels: Tensor, centres: Tensor) -> Tensor:
        """``m3dm.features.alignment.patch_matrix`` of every sample: ``(B, grid², G)``; padding adds nothing."""
        batch, n_centres = centres.shape[0], centres.shape[1]
        centre_idx, centre_w = self.interpolation(points, pixels, centres)
        safe = pixels.clamp(min=0)
        rows, cols = safe // self.img_size, safe % self.img_size
        cells = self.cells[rows][..., :, None] * self.grid + self.cells[cols][..., None, :]  # (B, N, T, T)
        weight = self.cell_weights[rows][..., :, None] * self.cell_weights[cols][..., None, :]
        target = cells[..., None] * n_centres + centre_idx[:, :, None, None, :]  # (B, N, T, T, 3)
        offset = torch.arange(batch, device=points.device)[:, None, None, None, None] * (self.grid**2 * n_centres)
        value = weight[..., None] * centre_w[:, :, None, None, :]
        matrix = centres.new_zeros(batch * self.grid**2 * n_centres)
        matrix = matrix.scatter_add(0, (target + offset).reshape(-1), value.reshape(-1))
        return matrix.view(batch, self.grid**2, n_centres)

    def forward(self, points: Tensor, pixels: Tensor, centres: Tensor, draws: Tensor | None) -> Tensor:
        neighbourhoods, centre_points = self.groups(points, pixels, centres)
        features = self.tokens(neighbourhoods, centre_points, draws)
        return self.patch_matrix(points, pixels, centre_points) @ features


def adaptive_pool_matrix(size_in: int, size_out: int) -> Tensor:
    """``(size_out, size_in)`` matrix of ``F.adaptive_avg_pool1d`` (PyTorch's windows)."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.float()


def chunked_nearest(queries: Tensor, bank_chunks: list[Tensor], bank_norms: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(Q, D)`` queries -> distance to and index of their nearest bank row (first index on ties), one matrix
    product per ``(D, rows)`` chunk (stored transposed, so the artefact holds no transposed copy) with
    ``torch.cdist``'s formula ``sqrt(max(|x|² − 2 x·y + |y|², 1e-30))``."""
    query_norms = queries.square().sum(-1, keepdim=True)
    best_dist, best_idx, start = [], [], 0
    for chunk, norms in zip(bank_chunks, bank_norms):
        dist = (query_norms - 2 * queries @ chunk + norms).clamp(min=1e-30).sqrt()
        value, index = dist.min(dim=1)
        best_dist.append(value)
        best_idx.append(index + start)
        start += chunk.shape[1]
    if len(bank_chunks) == 1:
        return best_dist[0], best_idx[0]
    values = torch.stack(best_dist, dim=1)
    which = values.argmin(dim=1, keepdim=True)  # first chunk on ties, as one search over the whole bank
    return values.gather(1, which)[:, 0], torch.stack(best_idx, dim=1).gather(1, which)[:, 0]


class BankScorer(nn.Module):
    """One finalised ``MemoryBank``: normalisation, search (the empty patches' constant row searched at export
    time, as ``SharedEmptyRows`` does), the re-weighted image score and the per-patch distances."""

    mean: Tensor
    std: Tensor
    empty_dist: Tensor
    empty_idx: Tensor

    def __init__(self, bank: Tensor, mean: Tensor | None, std: Tensor | None, eps: float, divisor: float,
                 n_reweight: int = 3) -> None:
        super().__init__()
        self.normalised = mean is not None and std is not None
        self.register_buffer("mean", torch.zeros(()) if mean is None else mean.float().reshape(()))
        self.register_buffer("std", torch.ones(()) if std is None else std.float().reshape(()))
        self.chunks = [bank[i:i + BANK_CHUNK_ROWS].T.contiguous() for i in range(0, bank.shape[0], BANK_CHUNK_ROWS)]
        for i, chunk in enumerate(self.chunks):
            self.register_buffer(f"bank_{i}", chunk)
        self.eps, self.divisor, self.n_reweight = eps, divisor, min(n_reweight, bank.shape[0])
        empty_row = self.normalise(bank.new_zeros(1, bank.shape[1]))
        dist, idx = nearest_neighbours(empty_row.expand(16, -1).contiguous(), bank)
        self.register_buffer("empty_dist", dist[:1].clone())
        self.register_buffer("empty_idx", idx[:1].clone())

    def bank_chunks(self) -> list[Tensor]:
        return [getattr(self, f"bank_{i}") for i in range(len(self.chunks))]

    def bank_norms(self) -> list[Tensor]:
        return [chunk.square().sum(0)[None, :] for chunk in self.bank_chunks()]

    def rows(self, index: Tensor) -> Tensor:
        """Bank rows at ``index`` (any shape) -> ``(*index.shape, D)``, read from the chunks (the bank is stored
        once, in chunks)."""
        out, start = None, 0
        for chunk in self.bank_chunks():
            rows = chunk.shape[1]
            local = index - start
            inside = (local >= 0) & (local < rows)
            picked = chunk.index_select(1, local.clamp(0, rows - 1).reshape(-1)).T.reshape(*index.shape, -1)
            out = picked * inside[..., None].float() if out is None else out + picked * inside[..., None].float()
            start += rows
        assert out is not None
        return out

    def normalise(self, patches: Tensor) -> Tensor:
        return (patches - self.mean) / self.std if self.normalised else patches

    def search(self, queries: Tensor, empty: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest rows of ``(Q, D)`` queries; ``empty (Q,)`` marks the all-zero patches."""
        filled = (~empty).nonzero()[:, 0]
        dist, idx = chunked_nearest(queries.index_select(0, filled), self.bank_chunks(), self.bank_norms())
        min_dist = self.empty_dist.expand(queries.shape[0]).scatter(0, filled, dist)
        nn_idx = self.empty_idx.expand(queries.shape[0]).scatter(0, filled, idx)
        return min_dist, nn_idx

    def forward(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, P, D)`` raw patches -> re-weighted image scores ``(B,)`` and nearest distances ``(B, P)``."""
        batch, n_patches, dim = patches.shape
        x = self.normalise(patches)
        empty = (patches == 0).all(dim=-1)
        min_dist, nn_idx = self.search(x.reshape(-1, dim), empty.reshape(-1))
        min_dist, nn_idx = min_dist.view(batch, n_patches), nn_idx.view(batch, n_patches)
        return self.reweighted(x, min_dist, nn_idx), min_dist

    def reweighted(self, x: Tensor, min_dist: Tensor, nn_idx: Tensor) -> Tensor:
        """``m3dm.memory.search.reweighted_score`` of every sample."""
        worst = min_dist.argmax(dim=1, keepdim=True)
        s_star = min_dist.gather(1, worst)[:, 0] / self.divisor
        m_test = batched_gather(x, worst)  # (B, 1, D)
        m_star = self.rows(nn_idx.gather(1, worst)[:, 0])  # (B, D)
        star_norm = m_star.square().sum(-1, keepdim=True)
        to_bank = torch.cat([(star_norm - 2 * m_star @ chunk + norms).clamp(min=1e-30).sqrt()
                             for chunk, norms in zip(self.bank_chunks(), self.bank_norms())], dim=1)
        knn = to_bank.topk(self.n_reweight, dim=1, largest=False).indices[:, 1:]
        deltas = (m_test - self.rows(knn)).square().sum(-1).sqrt() / self.divisor
        scale = torch.sqrt(torch.tensor(float(x.shape[-1]), dtype=torch.float32))
        weight = 1 - torch.exp(s_star / scale) / (torch.sum(torch.exp(deltas / scale), dim=1) + self.eps)
        return weight * s_star


class MapMaker(nn.Module):
    """``m3dm.memory.maps.segmentation_map`` of a batch: grid, bilinear to 224, the run's blur."""

    box_pass: Tensor
    kernel: Tensor

    def __init__(self, blur: str) -> None:
        super().__init__()
        self.blur = blur
        self.register_buffer("box_pass", box_pass_matrix(MAP_SIZE), persistent=False)
        self.register_buffer("kernel", gaussian_kernel().float(), persistent=False)

    def forward(self, min_dist: Tensor, grid: int) -> Tensor:
        grid_map = min_dist.reshape(-1, 1, grid, grid)
        maps = F.interpolate(grid_map, size=(MAP_SIZE, MAP_SIZE), mode="bilinear", align_corners=False)[:, 0]
        if self.blur == "pil":
            return quantised_blur(maps, self.box_pass, self.box_pass)
        if self.blur == "float":
            radius = self.kernel.numel() // 2
            image = F.pad(maps[:, None], (radius, radius, 0, 0), mode="replicate")
            image = F.conv2d(image, self.kernel.view(1, 1, 1, -1))
            image = F.pad(image, (0, 0, radius, radius), mode="replicate")
            return F.conv2d(image, self.kernel.view(1, 1, -1, 1))[:, 0]
        return maps


class BankGraph(nn.Module):
    """A fitted ``m3dm.detection.detector.Detector`` with its extractor's backbones: ``forward(rgb, points, pixels,
    centres[, drop_path_draws]) -> (image scores (B,), maps (B, 224, 224))`` (inputs: :class:`PointFeatures`; an
    input the method does not use is dropped from the artefact: the runner feeds the inputs it declares)."""

    image_lambdas: Tensor
    map_lambdas: Tensor
    detect_coef: Tensor
    seg_coef: Tensor
    align: Tensor

    def __init__(self, detector, extractor) -> None:
        super().__init__()
        spec, config = detector.spec, detector.config
        self.modalities = list(spec.modalities)
        self.combine = spec.combine
        self.rgb_backbone = extractor.rgb_backbone if spec.needs_rgb else None
        self.points = None
        if spec.needs_xyz and extractor.point_backbone is not None:
            self.points = PointFeatures(extractor.point_backbone, extractor.img_size, 56, extractor.clamp_pfa)
        self.fusion_block = detector.fusion_block
        self.grids = {m: detector._grid(m) for m in self.modalities}
        self.scorers = nn.ModuleDict({m: BankScorer(bank.bank, bank.mean, bank.std, spec.eps, spec.divisor)
                                      for m, bank in detector.banks.items()})
        self.maps = MapMaker(config.blur)
        # the decision layer's re-weighting; BTF's concatenated bank has no weights of its own
        weights = [config.lambdas.of(m) if self.combine == "dlf" else (1.0, 1.0) for m in self.modalities]
        self.register_buffer("image_lambdas", torch.tensor([w[0] for w in weights], dtype=torch.float64))
        self.register_buffer("map_lambdas", torch.tensor([w[1] for w in weights], dtype=torch.float32))
        if self.combine == "dlf":
            detect, seg = detector.dlf.weights
            self.register_buffer("detect_coef", torch.from_numpy(detect).double())
            self.register_buffer("seg_coef", torch.from_numpy(seg).double())
        if self.rgb_backbone is not None and "fusion" in self.modalities:
            grid = detector._rgb_grid()  # also for Fusion alone, which has no RGB bank
            self.register_buffer("align", adaptive_pool_matrix(grid, 56), persistent=False)

    @property
    def uses_drop_path(self) -> bool:
        return self.points is not None and self.points.backbone.training

    def modality_patches(self, rgb: Tensor, points: Tensor, pixels: Tensor, centres: Tensor,
                         draws: Tensor | None) -> dict[str, Tensor]:
        """``Detector.modality_patches`` of the batch: ``{modality: (B, P, D)}``."""
        patches: dict[str, Tensor] = {}
        rgb_map = None
        if self.rgb_backbone is not None:
            rgb_map = self.rgb_backbone(rgb)
            patches["rgb"] = rgb_map.flatten(2).transpose(1, 2)
        if self.points is not None:
            patches["xyz"] = self.points(points, pixels, centres, draws)
        if "fusion" in self.modalities:
            assert rgb_map is not None and self.fusion_block is not None
            aligned = (self.align @ rgb_map @ self.align.T).flatten(2).transpose(1, 2)
            patches["fusion"] = self.fusion_block.feature_fusion(patches["xyz"], aligned)
        if "rgb+xyz" in self.modalities:
            patches["rgb+xyz"] = torch.cat((patches["rgb"], patches["xyz"]), dim=-1)
        return patches

    def score(self, patches: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        scores, maps = [], []
        for modality in self.modalities:
            score, min_dist = self.scorers[modality](patches[modality])
            scores.append(score)
            maps.append(self.maps(min_dist, self.grids[modality]))
        if self.combine == "single":
            return scores[0], maps[0]
        if self.combine == "add":
            return sum(scores[1:], scores[0]), sum(maps[1:], maps[0])
        vector = torch.stack(scores, dim=1).double() * self.image_lambdas  # as Detector._dlf_inputs
        pixels = torch.stack([m * w for m, w in zip(maps, self.map_lambdas)], dim=-1).double()
        return (vector @ self.detect_coef).float(), (pixels @ self.seg_coef).float()

    def forward(self, rgb: Tensor, points: Tensor, pixels: Tensor, centres: Tensor,
                draws: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.score(self.modality_patches(rgb, points, pixels, centres, draws))
