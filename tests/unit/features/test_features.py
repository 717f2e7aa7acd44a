"""FeatureExtractor: batches equal single samples, shapes at the full configuration, bf16 option, bad clouds, the
DropPath generator's state and seed, and build_extractor from backbone settings."""

import dataclasses

import pytest
import torch

from m3dm.config import BackboneSettings
from m3dm.errors import DataError
from m3dm.features.alignment import pfa_patches_reference, valid_points
from m3dm.features.extractor import FeatureExtractor, build_extractor
from m3dm.features.point_transformer import PointTransformer
from m3dm.features.vit import RGBBackbone


def organized_cloud(size: int, seed: int, radius: float) -> torch.Tensor:
    """A bumpy disc of valid points on a ``size`` grid; zeros elsewhere (a different count per seed)."""
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    z = 0.4 + 0.03 * torch.sin(8 * u + seed) * torch.cos(6 * v) + 0.001 * torch.randn(size, size, generator=g)
    cloud = torch.stack([u - 0.5, v - 0.5, z])
    cloud[:, ((u - 0.5) ** 2 + (v - 0.5) ** 2).sqrt() > radius] = 0
    return cloud


@pytest.mark.parametrize("train_mode", [True, False])
def test_batch_equals_single_samples(small_backbones, train_mode):
    rgb_backbone, point_backbone = small_backbones
    point_backbone.train(train_mode)
    clouds = torch.stack([organized_cloud(64, s, r) for s, r in ((0, 0.45), (1, 0.3), (2, 0.38))])
    rgb = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    batched = FeatureExtractor(rgb_backbone, point_backbone, img_size=64, seed=7)(rgb, clouds)
    single = FeatureExtractor(rgb_backbone, point_backbone, img_size=64, seed=7)
    for i, features in enumerate(batched):
        alone = single(rgb[i:i + 1], clouds[i:i + 1])[0]
        torch.testing.assert_close(features.xyz, alone.xyz, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(features.rgb, alone.rgb, rtol=1e-5, atol=1e-6)
    assert batched[0].xyz.shape == (56 * 56, 1152) and batched[0].rgb.shape == (14 * 14, 192)


def test_fast_alignment_inside_the_extractor_matches_the_reference_path(small_backbones):
    _, point_backbone = small_backbones
    point_backbone.eval()
    cloud = organized_cloud(64, 4, 0.4)
    features = FeatureExtractor(None, point_backbone, img_size=64)(None, cloud[None])[0]
    points, flat_index = valid_points(cloud)
    groups, centres = point_backbone([points])
    expected = pfa_patches_reference(points, flat_index, centres[0], groups[0].T, 64)
    torch.testing.assert_close(features.xyz, expected, rtol=1e-4, atol=1e-5)


def test_bf16_precision_stays_close_to_fp32(small_backbones):
    rgb_backbone, point_backbone = small_backbones
    point_backbone.eval()
    cloud = organized_cloud(64, 5, 0.4)[None]
    rgb = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    fp32 = FeatureExtractor(rgb_backbone, point_backbone, img_size=64)(rgb, cloud)[0]
    bf16 = FeatureExtractor(rgb_backbone, point_backbone, img_size=64, precision="bf16")(rgb, cloud)[0]
    assert bf16.xyz.dtype == torch.float32
    for a, b in ((fp32.xyz, bf16.xyz), (fp32.rgb, bf16.rgb)):
        assert (a - b).norm() / a.norm() < 0.05
        assert not torch.equal(a, b)  # bf16 really ran


@pytest.mark.slow
def test_full_configuration_shapes():
    """ViT-B/8 at 224 px and Point-MAE 1024 x 128: RGB (B, 768, 28, 28), PFA (B * 3136, 1152)."""
    torch.manual_seed(0)
    rgb_backbone = RGBBackbone("vit_base_patch8_224_dino").eval()
    extractor = FeatureExtractor(rgb_backbone, PointTransformer("Point_MAE"), img_size=224)
    clouds = torch.stack([organized_cloud(224, 0, 0.3), organized_cloud(224, 1, 0.25)])
    features = extractor(torch.randn(2, 3, 224, 224), clouds)
    assert [f.rgb_map.shape for f in features] == [(768, 28, 28)] * 2
    assert torch.cat([f.xyz for f in features]).shape == (2 * 3136, 1152)
    assert features[0].rgb_aligned().shape == (3136, 768)


def test_empty_cloud_is_named(small_backbones):
    _, point_backbone = small_backbones
    point_backbone.eval()
    extractor = FeatureExtractor(None, point_backbone, img_size=64)
    clouds = torch.stack([organized_cloud(64, 0, 0.4), torch.zeros(3, 64, 64)])
    with pytest.raises(DataError, match="widget/test/good/001"):
        extractor(None, clouds, names=["widget/test/good/000", "widget/test/good/001"])


def test_rng_state_set_rng_state_and_reseed_replay_the_drop_path_draws(small_backbones):
    _, point_backbone = small_backbones
    point_backbone.train()  # the reference's mode: DropPath draws from the extractor's generator
    cloud = organized_cloud(64, 6, 0.4)[None]
    extractor = FeatureExtractor(None, point_backbone, img_size=64, seed=7)
    start = extractor.rng_state()
    first, second = extractor(None, cloud)[0].xyz, extractor(None, cloud)[0].xyz
    assert not torch.equal(first, second)  # the draws moved on
    after_two = extractor.rng_state()
    extractor.set_rng_state(start)
    assert torch.equal(extractor(None, cloud)[0].xyz, first)
    assert torch.equal(extractor(None, cloud)[0].xyz, second) and torch.equal(extractor.rng_state(), after_two)
    extractor.reseed(7)
    assert torch.equal(extractor(None, cloud)[0].xyz, first)
    assert torch.equal(FeatureExtractor(None, point_backbone, img_size=64, seed=7)(None, cloud)[0].xyz, first)


def test_build_extractor_builds_the_needed_backbones_from_their_files(tmp_path):
    torch.manual_seed(2)
    vit = RGBBackbone("vit_tiny_patch16_224").vit
    torch.save(vit.state_dict(), tmp_path / "rgb.pth")
    point_state = PointTransformer("Point_MAE", num_group=32, group_size=16).state_dict()
    torch.save({"base_model": {f"module.MAE_encoder.{k}": v for k, v in point_state.items()}}, tmp_path / "xyz.pth")
    settings = BackboneSettings(rgb_backbone_name="vit_tiny_patch16_224", rgb_checkpoint=str(tmp_path / "rgb.pth"),
                                xyz_checkpoint=str(tmp_path / "xyz.pth"), num_group=32, group_size=16, img_size=64)
    extractor = build_extractor(settings, needs_rgb=True, needs_xyz=True, device="cpu", seed=3, clamp_pfa=True)
    assert not extractor.rgb_backbone.training and extractor.point_backbone.training  # the reference's modes
    assert extractor.rgb_backbone.checkpoint_path == tmp_path / "rgb.pth"
    assert extractor.point_backbone.checkpoint_path == tmp_path / "xyz.pth"
    assert torch.equal(extractor.rgb_backbone.vit.pos_embed, vit.pos_embed)
    assert torch.equal(extractor.point_backbone.norm.weight, point_state["norm.weight"])
    assert extractor.img_size == 64 and extractor.clamp_pfa and extractor.precision == "fp32"
    assert torch.equal(extractor.rng_state(), FeatureExtractor(None, extractor.point_backbone, seed=3).rng_state())

    only_xyz = build_extractor(dataclasses.replace(settings, backbone_eval=True, precision="bf16"),
                               needs_rgb=False, needs_xyz=True, device="cpu", seed=0, clamp_pfa=False)
    assert only_xyz.rgb_backbone is None and not only_xyz.point_backbone.training
    assert only_xyz.precision == "bf16" and not only_xyz.clamp_pfa
    only_rgb = build_extractor(settings, needs_rgb=True, needs_xyz=False, device="cpu", seed=0, clamp_pfa=False)
    assert only_rgb.point_backbone is None
