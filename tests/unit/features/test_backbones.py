"""Point transformer and RGB ViT backbones (docs/original.md): names, shapes, batching, mode semantics.

The reference formulations below are written from docs/original.md with plain torch ops (standard `nn.BatchNorm1d` in
training mode on a batch-1 run, explicit softmax attention, DropPath as described in the module docstring).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from m3dm.features.point_transformer import PointTransformer
from m3dm.features.pointops import group_points
from m3dm.features.vit import RGBBackbone, timm_model_name
from m3dm.features.weights import build_rgb_backbone

SMALL_G, SMALL_K = 32, 16
ATOL = 1e-5


def make_clouds(sizes=(300, 220, 410), seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, generator=gen) * torch.tensor([1.0, 0.8, 0.3]) + 0.2 for n in sizes]


@pytest.fixture(scope="module", params=["Point_MAE", "Point_Bert"])
def point_model(request) -> PointTransformer:
    torch.manual_seed(1)
    model = PointTransformer(request.param, num_group=SMALL_G, group_size=SMALL_K)
    # non-trivial BatchNorm affine parameters and running statistics
    with torch.no_grad():
        for bn in (model.encoder.first_conv[1], model.encoder.second_conv[1]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def expected_point_keys(variant: str) -> dict[str, tuple[int, ...]]:
    """Official encoder names and shapes, written out from the reference's checkpoints."""
    enc = 384 if variant == "Point_MAE" else 256
    keys: dict[str, tuple[int, ...]] = {}
    for stage, (cin, mid, cout) in {"first_conv": (3, 128, 256), "second_conv": (512, 512, enc)}.items():
        keys[f"encoder.{stage}.0.weight"] = (mid, cin, 1)
        keys[f"encoder.{stage}.0.bias"] = (mid,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"encoder.{stage}.1.{name}"] = (mid,)
        keys[f"encoder.{stage}.1.num_batches_tracked"] = ()
        keys[f"encoder.{stage}.3.weight"] = (cout, mid, 1)
        keys[f"encoder.{stage}.3.bias"] = (cout,)
    keys.update({"pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,),
                 "pos_embed.2.weight": (384, 128), "pos_embed.2.bias": (384,),
                 "norm.weight": (384,), "norm.bias": (384,)})
    for i in range(12):
        p = f"blocks.blocks.{i}."
        keys.update({p + "norm1.weight": (384,), p + "norm1.bias": (384,),
                     p + "attn.qkv.weight": (1152, 384),
                     p + "attn.proj.weight": (384, 384), p + "attn.proj.bias": (384,),
                     p + "norm2.weight": (384,), p + "norm2.bias": (384,),
                     p + "mlp.fc1.weight": (1536, 384), p + "mlp.fc1.bias": (1536,),
                     p + "mlp.fc2.weight": (384, 1536), p + "mlp.fc2.bias": (384,)})
    if variant == "Point_Bert":
        keys.update({"reduce_dim.weight": (384, 256), "reduce_dim.bias": (384,),
                     "cls_token": (1, 1, 384), "cls_pos": (1, 1, 384)})
    return keys


def reference_forward(model: PointTransformer, cloud: torch.Tensor, generator: torch.Generator | None,
                      train: bool) -> torch.Tensor:
    """Batch-1 forward of one cloud as the reference computes it -> (1152, G)."""
    model = copy.deepcopy(model).train(train)
    neigh, centres = group_points(cloud[None], model.num_group, model.group_size)
    G, K = neigh.shape[1:3]
    x = neigh.reshape(G, K, 3).transpose(1, 2)
    f = model.encoder.first_conv(x)  # nn.BatchNorm1d: batch statistics in train mode, running ones in eval
    f = torch.cat([f.max(dim=2, keepdim=True)[0].expand(-1, -1, K), f], dim=1)
    tokens = model.encoder.second_conv(f).max(dim=2)[0][None]  # (1, G, E)
    pos = model.pos_embed(centres)
    if model.variant == "Point_Bert":
        tokens = torch.cat([model.cls_token, model.reduce_dim(tokens)], dim=1)
        pos = torch.cat([model.cls_pos, pos], dim=1)
    if train:
        u = torch.rand(24, generator=generator)
    outputs = []
    x = tokens
    for i, blk in enumerate(model.blocks.blocks):
        keep = 1.0 - 0.1 * i / 11
        x = x + pos
        h = blk.norm1(x)
        q, k, v = blk.attn.qkv(h).reshape(1, -1, 3, 6, 64).permute(2, 0, 3, 1, 4)
        attn = ((q * 64 ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        a = blk.attn.proj((attn @ v).transpose(1, 2).reshape(1, -1, 384))
        if train:
            a = a * (float(u[2 * i] < keep) / keep)
        x = x + a
        m = blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
        if train:
            m = m * (float(u[2 * i + 1] < keep) / keep)
        x = x + m
        if i in (3, 7, 11):
            y = model.norm(x)
            outputs.append(y[0, 1:] if model.variant == "Point_Bert" else y[0])
    return torch.cat([o.T for o in outputs], dim=0)


def test_point_state_dict_has_official_names_and_shapes(point_model):
    got = {k: tuple(v.shape) for k, v in point_model.state_dict().items()}
    assert got == expected_point_keys(point_model.variant)


def test_unknown_point_variant_rejected():
    with pytest.raises(ValueError):
        PointTransformer("PointNet")


def test_point_model_defaults_to_training_mode(point_model):
    assert PointTransformer("Point_MAE", num_group=8, group_size=4).training
    rates = point_model.drop_path_rates
    assert len(rates) == 12 and rates[0] == 0 and rates[11] == pytest.approx(0.1)


@pytest.mark.parametrize("train", [True, False])
def test_point_forward_matches_reference_formulation(point_model, train):
    clouds = make_clouds()
    point_model.train(train)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        features, centres = point_model(clouds, generator=gen)
        ref_gen = torch.Generator().manual_seed(123)
        expected = torch.stack([reference_forward(point_model, c, ref_gen, train) for c in clouds])
    point_model.train()
    assert features.shape == (3, 1152, SMALL_G) and centres.shape == (3, SMALL_G, 3)
    torch.testing.assert_close(features, expected, atol=ATOL, rtol=1e-4)
    for cloud, c in zip(clouds, centres):  # centres are points of their own cloud
        assert (c[:, None] - cloud[None]).abs().sum(-1).min(dim=1)[0].max() == 0


@pytest.mark.parametrize("train", [True, False])
def test_point_forward_with_autograd_equals_the_in_place_one(point_model, train):
    """Without autograd the mini-PointNet normalises in place; with it, out of place: the same values."""
    clouds = make_clouds(seed=5)
    point_model.train(train)
    with torch.no_grad():
        in_place, _ = point_model(clouds, generator=torch.Generator().manual_seed(9))
    recorded, _ = point_model(clouds, generator=torch.Generator().manual_seed(9))
    point_model.train()
    assert recorded.requires_grad
    assert torch.equal(recorded.detach(), in_place)


@pytest.mark.parametrize("train", [True, False])
def test_point_batch_equals_single_calls(point_model, train):
    clouds = make_clouds(seed=5)
    point_model.train(train)
    # large drop rates so that the per-sample keep/drop decisions really matter
    saved_rates = point_model.drop_path_rates
    point_model.drop_path_rates = [0.0] + [0.5] * 11
    try:
        with torch.no_grad():
            batched, centres = point_model(clouds, generator=torch.Generator().manual_seed(7))
            gen = torch.Generator().manual_seed(7)
            singles = [point_model([c], generator=gen) for c in clouds]
            scales = point_model.drop_path_scales(3, torch.Generator().manual_seed(7))
    finally:
        point_model.drop_path_rates = saved_rates
        point_model.train()
    torch.testing.assert_close(batched, torch.cat([s[0] for s in singles]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(centres, torch.cat([s[1] for s in singles]), atol=0, rtol=0)
    if train:
        assert (scales == 0).any() and (scales == 2).any()
    else:
        assert scales is None


def test_point_train_mode_is_stochastic_eval_mode_is_not(point_model):
    cloud = make_clouds(sizes=(350,))
    with torch.no_grad():
        a = point_model(cloud, generator=torch.Generator().manual_seed(0))[0]
        b = point_model(cloud, generator=torch.Generator().manual_seed(1))[0]
        a_again = point_model(cloud, generator=torch.Generator().manual_seed(0))[0]
        point_model.eval()
        e1 = point_model(cloud, generator=torch.Generator().manual_seed(0))[0]
        e2 = point_model(cloud, generator=torch.Generator().manual_seed(1))[0]
        point_model.train()
    assert torch.equal(a, a_again)
    assert not torch.allclose(a, b)
    assert torch.equal(e1, e2)
    assert not torch.allclose(a, e1)  # batch statistics differ from the running ones


def test_point_tensor_input_equals_list_input(point_model):
    clouds = make_clouds(sizes=(260, 260))
    point_model.eval()
    with torch.no_grad():
        from_tensor = point_model(torch.stack(clouds))
        from_list = point_model(clouds)
    point_model.train()
    torch.testing.assert_close(from_tensor[0], from_list[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(from_tensor[1], from_list[1], atol=0, rtol=0)


class FormerMlp(torch.nn.Module):
    """The point backbone's own MLP class before timm's replaced it."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("train", [True, False])
def test_point_mlp_equals_the_former_class_bit_for_bit(point_model, train):
    """timm's Mlp in the blocks: the former keys and shapes, the former initial weights from the same seed, and
    exactly the former outputs (exact erf GELU, dropout 0) in both modes."""
    mlp = point_model.blocks.blocks[4].mlp
    torch.manual_seed(5)
    former = FormerMlp(384, 1536)
    torch.manual_seed(5)
    fresh = type(mlp)(384, 1536)
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in former.state_dict().items()}
    assert all(torch.equal(value, fresh.state_dict()[key]) for key, value in former.state_dict().items())
    former.load_state_dict(mlp.state_dict())
    x = torch.randn(3, 7, 384, generator=torch.Generator().manual_seed(2))
    mlp.train(train)
    with torch.no_grad():
        assert torch.equal(mlp(x), former(x))
    point_model.train()


@pytest.mark.slow
def test_point_transformer_full_config_shape():
    torch.manual_seed(0)
    model = PointTransformer("Point_MAE")  # G = 1024, K = 128
    cloud = torch.rand(5000, 3) + 0.1
    with torch.no_grad():
        features, centres = model([cloud], generator=torch.Generator().manual_seed(0))
    assert features.shape == (1, 1152, 1024)
    assert centres.shape == (1, 1024, 3)
    assert torch.isfinite(features).all()


# ------------------------------------------------------------------------------------------------ RGB


def reference_vit_tokens(backbone: RGBBackbone, rgb: torch.Tensor) -> torch.Tensor:
    """ViT forward written out: patchify, prefix tokens, pos add, blocks with explicit attention, norm."""
    vit = backbone.vit
    x = vit.patch_embed.proj(rgb).flatten(2).transpose(1, 2)
    prefix = [vit.cls_token] + ([vit.reg_token] if vit.reg_token is not None else [])
    x = torch.cat([p.expand(x.shape[0], -1, -1) for p in prefix] + [x], dim=1) + vit.pos_embed
    for blk in vit.blocks:
        h = blk.norm1(x)
        B, N, C = h.shape
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(h).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(C // heads)).softmax(-1)
        x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        x = x + blk.mlp(blk.norm2(x))
    return vit.norm(x)


def tiny_vit(**kwargs) -> RGBBackbone:
    torch.manual_seed(3)
    return RGBBackbone("vit_tiny_patch16_224", depth=2, img_size=64, **kwargs)


def test_rgb_forward_matches_written_out_vit():
    backbone = tiny_vit()
    rgb = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = backbone(rgb)
        tokens = reference_vit_tokens(backbone, rgb)
    assert out.shape == (2, 192, 4, 4) and backbone.feature_dim == 192 and backbone.patch_size == (16, 16)
    for t in range(16):  # token t (after the CLS token) sits at cell (t // 4, t % 4)
        torch.testing.assert_close(out[:, :, t // 4, t % 4], tokens[:, 1 + t], atol=ATOL, rtol=1e-4)


def test_rgb_drops_all_prefix_tokens():
    backbone = tiny_vit(reg_tokens=4)
    assert backbone.vit.num_prefix_tokens == 5
    rgb = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = backbone(rgb)
        tokens = reference_vit_tokens(backbone, rgb)
    assert out.shape == (1, 192, 4, 4)
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), tokens[:, 5:], atol=ATOL, rtol=1e-4)


def test_rgb_random_init_warns(caplog):
    backbone = build_rgb_backbone("vit_tiny_patch16_224", random_init=True, hf_cache=False,
                                  checkpoint_dir="/nonexistent", depth=2, img_size=64)
    assert backbone.checkpoint_path is None
    assert "RANDOM WEIGHTS: RGB backbone 'vit_tiny_patch16_224' is randomly initialised" in caplog.text
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_rgb_reference_names_map_to_current_timm():
    assert timm_model_name("vit_base_patch8_224_dino") == "vit_base_patch8_224.dino"
    assert timm_model_name("vit_base_patch8_224") == "vit_base_patch8_224.augreg_in21k_ft_in1k"
    assert timm_model_name("vit_base_patch8_224_in21k") == "vit_base_patch8_224.augreg_in21k"
    assert timm_model_name("vit_small_patch8_224_dino") == "vit_small_patch8_224.dino"
    assert timm_model_name("vit_tiny_patch16_224") == "vit_tiny_patch16_224"


def test_rgb_rejects_non_vit_and_unknown_names():
    for name in ("resnet18", "no_such_model"):
        with pytest.raises(ValueError):
            RGBBackbone(name)
        with pytest.raises(ValueError):
            build_rgb_backbone(name, random_init=True, hf_cache=False, checkpoint_dir="/nonexistent", quiet=True)


@pytest.mark.slow
def test_rgb_vit_base_patch8_full_shape():
    torch.manual_seed(0)
    backbone = RGBBackbone("vit_base_patch8_224_dino")
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 768, 28, 28) and backbone.feature_dim == 768
