"""Per-sample features: both backbones on a batch, then Point Feature Alignment per sample (docs/original.md).

A batch may mix samples with different numbers of valid points: the point backbone groups each cloud on its own
and runs the transformer on the stacked groups; alignment then runs per sample. Only the backbones a method
needs are run (quirk 19: the reference always runs both; skipping one changes no output).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TypeVar

import torch

from m3dm.config import BTF_PATCH_GRID, BackboneSettings, MethodSpec
from m3dm.errors import DataError
from m3dm.features.alignment import pfa_patches, rgb_to_patch_grid, valid_points
from m3dm.features.dense import PointGroups
from m3dm.features.fpfh import FPFHFeatures
from m3dm.features.weights import build_point_backbone, build_rgb_backbone, build_wide_resnet

XYZ_PATCH_GRID = 56  # PFA output grid: 56 x 56 = 3136 patches
POINT_OUTPUTS = ("patches", "groups")


T = TypeVar("T")


def required(value: T | None, what: str) -> T:
    """A part of the features (or of a batch) that the method needs; a ValueError names it when it is missing."""
    if value is None:
        raise ValueError(f"no {what}: the feature extractor was built for, or given the inputs of, another method")
    return value


@dataclass
class SampleFeatures:
    """Features of one sample, on the CPU, float32. Patches are row-major over their grid."""

    rgb: torch.Tensor | None = None  # (h*w, C) RGB patches of the ViT grid (28 x 28 for ViT-*/8 at 224)
    rgb_map: torch.Tensor | None = None  # (C, h, w) the same, as a map
    xyz: torch.Tensor | None = None  # (56*56, 1152) aligned point patches
    xyz_groups: PointGroups | None = None  # the point backbone's output before PFA (per-pixel methods: CFM)

    def rgb_aligned(self, grid: int = XYZ_PATCH_GRID) -> torch.Tensor:
        """RGB patches pooled to the xyz grid, spatially aligned with ``xyz``: ``(grid², C)``."""
        return rgb_to_patch_grid(required(self.rgb_map, "RGB map")[None], grid)[0]


class FeatureExtractor:
    """Runs the RGB backbone and/or the point backbone on batches and aligns the point features.

    ``seed`` seeds the generator of the point backbone's DropPath draws (active when the backbone is in the
    reference's training mode, quirk 13), so a run is reproducible and a batch of N samples gives the same
    features as N single samples in order.
    """

    def __init__(self, rgb_backbone=None, point_backbone=None, *, img_size: int = 224, device="cpu",
                 seed: int = 0, clamp_pfa: bool = False, precision: str = "fp32", point_features=None,
                 point_outputs: tuple[str, ...] = ("patches",)):
        if rgb_backbone is None and point_backbone is None and point_features is None:
            raise ValueError("FeatureExtractor needs at least one backbone")
        if not point_outputs or not set(point_outputs) <= set(POINT_OUTPUTS):
            raise ValueError(f"point_outputs must be some of {POINT_OUTPUTS}, got {point_outputs!r}")
        # what the point backbone's output becomes: PFA patches (SampleFeatures.xyz, the memory banks) and/or the
        # groups before PFA (SampleFeatures.xyz_groups, the per-pixel methods); only what the method uses is made
        self.point_outputs = tuple(point_outputs)
        self.device = torch.device(device)
        self.point_features = point_features  # weightless point features on the CPU (BTF's FPFH): cloud -> patches
        self.rgb_backbone = None if rgb_backbone is None else rgb_backbone.to(self.device)
        self.point_backbone = None if point_backbone is None else point_backbone.to(self.device)
        self.img_size = img_size
        self.clamp_pfa = clamp_pfa
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.precision = precision
        self._generator = torch.Generator(device="cpu").manual_seed(seed)  # the point backbone's DropPath draws

    def rng_state(self) -> torch.Tensor:
        """The state of the DropPath generator (a fitted model stores it to draw the same features again)."""
        return self._generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Continue the DropPath draws from a state returned by ``rng_state``."""
        self._generator.set_state(state)

    def reseed(self, seed: int) -> None:
        """Restart the DropPath draws from ``seed`` (as a fresh extractor with that seed would)."""
        self._generator.manual_seed(seed)

    @torch.no_grad()
    def __call__(self, rgb: torch.Tensor | None, pc: torch.Tensor | None,
                 names: list[str] | None = None) -> list[SampleFeatures]:
        """``rgb (B, 3, 224, 224)``, ``pc (B, 3, S, S)`` organized clouds -> one ``SampleFeatures`` per sample (None:
        the method does not use that modality)."""
        batch = rgb.shape[0] if rgb is not None else required(pc, "point clouds").shape[0]
        out = [SampleFeatures() for _ in range(batch)]
        if self.rgb_backbone is not None:
            with self._autocast():
                rgb_maps = self.rgb_backbone(required(rgb, "RGB images").to(self.device, non_blocking=True))
                rgb_maps = rgb_maps.float().cpu()
            for sample, rgb_map in zip(out, rgb_maps):
                sample.rgb_map = rgb_map
                sample.rgb = rgb_map.flatten(1).T.contiguous()
        if self.point_backbone is not None:
            self._add_point_features(self.point_backbone, out, required(pc, "point clouds"), names)
        if self.point_features is not None:
            for sample, cloud in zip(out, required(pc, "point clouds")):
                sample.xyz = self.point_features(cloud)
        return out

    def _autocast(self):
        """bfloat16 matrix products in both backbones (``--precision bf16``): faster where the hardware multiplies
        bfloat16 natively (CPUs with AVX-512 BF16 or AMX, GPUs; figures in benchmarks/README.md), features within
        about 1 % of float32; off by default (exact parity)."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _add_point_features(self, backbone, out: list[SampleFeatures], pc: torch.Tensor, names) -> None:
        pc = pc.to(self.device, non_blocking=True)
        clouds, flat_indices = [], []
        for i in range(pc.shape[0]):
            points, flat_index = valid_points(pc[i])
            name = names[i] if names else f"sample {i} of the batch"
            if len(points) == 0:
                raise DataError(f"{name}: the point cloud has no valid point")
            if len(points) < backbone.group_size:  # a group is that many nearest points
                raise DataError(f"{name}: the point cloud has {len(points)} valid points, fewer than the "
                                f"{backbone.group_size} of one group (lower --group_size)")
            clouds.append(points)
            flat_indices.append(flat_index)
        with self._autocast():
            group_features, centres = backbone(clouds, generator=self._generator)
        group_features, centres = group_features.float(), centres.float()
        for i, sample in enumerate(out):
            if "patches" in self.point_outputs:
                patches = pfa_patches(clouds[i], flat_indices[i], centres[i], group_features[i].T, self.img_size,
                                      XYZ_PATCH_GRID, clamp=self.clamp_pfa)
                sample.xyz = patches.float().cpu()
            if "groups" in self.point_outputs:
                sample.xyz_groups = PointGroups(clouds[i].float().cpu(), flat_indices[i].cpu(), centres[i].cpu(),
                                                group_features[i].T.cpu(), self.img_size, self.clamp_pfa)


def build_extractor(backbones: BackboneSettings, *, needs_rgb: bool, needs_xyz: bool, device, seed: int,
                    clamp_pfa: bool, method: MethodSpec | None = None) -> FeatureExtractor:
    """The backbones a method needs, from their weight files (or random weights with ``random_init``): the RGB
    ViT in eval mode, the point backbone in the reference's training mode unless ``backbone_eval`` (quirk 13).

    A ``method`` with BTF features gets its own: the wide-ResNet (``rgb_checkpoint``) and FPFH (``clamp_pfa``, the
    fix_quirks of the run, pads their 3 x 3 average)."""
    if method is not None and method.features == "btf":
        return _btf_extractor(backbones, needs_rgb=needs_rgb, needs_xyz=needs_xyz, device=device, seed=seed,
                              aligned=clamp_pfa, grid=method.patch_grid or BTF_PATCH_GRID)
    rgb = point = None
    if needs_rgb:
        rgb = build_rgb_backbone(backbones.rgb_backbone_name, backbones.rgb_checkpoint,
                                 random_init=backbones.random_init).eval()
    if needs_xyz:
        point = build_point_backbone(backbones.xyz_backbone_name, backbones.xyz_checkpoint,
                                     random_init=backbones.random_init, num_group=backbones.num_group,
                                     group_size=backbones.group_size)
        point.train(not backbones.backbone_eval)
    per_pixel = method is not None and method.family == "cfm"  # CFM maps the groups to every pixel itself
    return FeatureExtractor(rgb, point, img_size=backbones.img_size, device=device, seed=seed, clamp_pfa=clamp_pfa,
                            precision=backbones.precision, point_outputs=("groups",) if per_pixel else ("patches",))


def _btf_extractor(backbones: BackboneSettings, *, needs_rgb: bool, needs_xyz: bool, device, seed: int,
                   aligned: bool, grid: int) -> FeatureExtractor:
    """BTF's features: wide-ResNet-50-2 layers 2+3 in eval mode (frozen BatchNorm) and/or FPFH, both on ``grid``."""
    rgb = point_features = None
    if needs_rgb:
        rgb = build_wide_resnet(backbones.rgb_checkpoint, random_init=backbones.random_init, grid=grid,
                                aligned=aligned).eval()
    if needs_xyz:
        point_features = FPFHFeatures(grid=grid, aligned=aligned)
    return FeatureExtractor(rgb, None, img_size=backbones.img_size, device=device, seed=seed,
                            precision=backbones.precision, point_features=point_features)
