"""RGB backbone: a timm Vision Transformer returning its last-block patch tokens as a feature map.

The reference calls `timm.create_model(name, pretrained=True)` with timm-0.6 names. Here the model is always
built with `pretrained=False` (nothing is ever downloaded) and its weights are loaded by
`m3dm.features.weights.build_rgb_backbone` (official DINO file, a timm state dict, or an offline Hugging Face
cache).

Forward (same as the reference): patch embedding -> prefix tokens + positional embedding -> `norm_pre` ->
all blocks -> final `norm` -> prefix tokens (CLS / registers) dropped -> `(B, C, H/p, W/p)`, token t at cell
`(t // (W/p), t % (W/p))`. The grid comes from the patch size and the input size (quirk 14: the reference
hard-codes 28 x 28 and batch 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import Tensor, nn

# timm-0.6 names accepted by the reference -> timm >= 0.9 "architecture.tag" names with the same weights.
# timm 0.6's plain `vit_base_patch8_224` pointed to the AugReg B/8 in21k -> in1k (lr 0.01) npz, i.e. the
# `augreg_in21k_ft_in1k` tag (the timm >= 0.9 default tag `augreg2_in21k_ft_in1k` is a later fine-tune).
REFERENCE_RGB_NAMES = {
    "vit_base_patch8_224_dino": "vit_base_patch8_224.dino",
    "vit_base_patch8_224": "vit_base_patch8_224.augreg_in21k_ft_in1k",
    "vit_base_patch8_224_in21k": "vit_base_patch8_224.augreg_in21k",
    "vit_small_patch8_224_dino": "vit_small_patch8_224.dino",
}
DEFAULT_RGB_BACKBONE = "vit_base_patch8_224_dino"


def timm_model_name(name: str) -> str:
    """Reference (timm 0.6) name -> current timm name; any other name is passed through unchanged."""
    return REFERENCE_RGB_NAMES.get(name, name)


def create_vit(name: str, **timm_kwargs: Any) -> Any:
    """Randomly initialised timm ViT without classifier head; never downloads anything. Typed ``Any``: the model is
    checked for the attributes used here (timm's ViT-like models share no typed interface)."""
    timm_name = timm_model_name(name)
    if not timm.is_model(timm_name.split(".")[0]):
        raise ValueError(f"unknown timm model {name!r}")
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)
    for attribute in ("patch_embed", "num_prefix_tokens", "forward_features", "embed_dim"):
        if not hasattr(model, attribute):
            raise ValueError(f"{name!r} is not a timm VisionTransformer (no {attribute!r})")
    return model


class RGBBackbone(nn.Module):
    """timm ViT feature extractor: `forward(rgb (B, 3, H, W)) -> (B, C, H/p, W/p)`, randomly initialised.

    It reads no file: `m3dm.features.weights.build_rgb_backbone` loads its weights and records the file in
    `checkpoint_path`. Extra keyword arguments go to `timm.create_model` (e.g. `depth=2` or `img_size=64` in
    tests).
    """

    def __init__(self, name: str = DEFAULT_RGB_BACKBONE, **timm_kwargs: Any) -> None:
        super().__init__()
        self.name = name
        self.timm_name = timm_model_name(name)
        self.vit = create_vit(name, **timm_kwargs)
        self.checkpoint_path: Path | None = None  # the weight file, set by weights.build_rgb_backbone

    @property
    def feature_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def patch_size(self) -> tuple[int, int]:
        size = self.vit.patch_embed.patch_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def forward(self, rgb: Tensor) -> Tensor:
        batch, _, height, width = rgb.shape
        patch_h, patch_w = self.patch_size
        grid_h, grid_w = height // patch_h, width // patch_w
        tokens = self.vit.forward_features(rgb)[:, self.vit.num_prefix_tokens:]
        if tokens.shape[1] != grid_h * grid_w:
            raise RuntimeError(f"expected {grid_h * grid_w} patch tokens for a {height}x{width} input, "
                               f"got {tokens.shape[1]}")
        return tokens.transpose(1, 2).reshape(batch, self.feature_dim, grid_h, grid_w)
