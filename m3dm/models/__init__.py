"""Feature backbones (timm ViT for RGB, Point-MAE / Point-BERT transformer for points) and their checkpoints."""

from m3dm.models.checkpoints import (
    CheckpointError,
    build_point_backbone,
    build_rgb_backbone,
    find_hf_cache_file,
    load_strict,
)
from m3dm.models.point_transformer import PointTransformer
from m3dm.models.rgb_backbone import RGBBackbone, timm_model_name

__all__ = [
    "CheckpointError",
    "PointTransformer",
    "RGBBackbone",
    "build_point_backbone",
    "build_rgb_backbone",
    "find_hf_cache_file",
    "load_strict",
    "timm_model_name",
]
