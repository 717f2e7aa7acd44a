"""FeatureExtractor: batches equal single samples, shapes at the full configuration, bf16 option, bad clouds."""

import pytest
import torch

from m3dm.features.alignment import pfa_patches_reference, valid_points
from m3dm.errors import DataError
from m3dm.features.extractor import FeatureExtractor
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


@pytest.fixture(scope="module")
def small_backbones():
    torch.manual_seed(0)
    rgb = RGBBackbone("vit_tiny_patch16_224", random_init=True, quiet=True, depth=2).eval()
    point = PointTransformer("Point_MAE", num_group=32, group_size=16)
    return rgb, point


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


def test_full_configuration_shapes():
    """ViT-B/8 at 224 px and Point-MAE 1024 x 128: RGB (B, 768, 28, 28), PFA (B * 3136, 1152)."""
    torch.manual_seed(0)
    rgb_backbone = RGBBackbone("vit_base_patch8_224_dino", random_init=True, quiet=True).eval()
    extractor = FeatureExtractor(rgb_backbone, PointTransformer("Point_MAE"), img_size=224)
    clouds = torch.stack([organized_cloud(224, 0, 0.3), organized_cloud(224, 1, 0.25)])
    features = extractor(torch.randn(2, 3, 224, 224), clouds)
    assert [f.rgb_map.shape for f in features] == [(768, 28, 28)] * 2
    assert torch.cat([f.xyz for f in features]).shape == (2 * 3136, 1152)
    assert features[0].rgb_aligned().shape == (3136, 768)


def test_empty_cloud_is_named(small_backbones):
    _, point_backbone = small_backbones
    extractor = FeatureExtractor(None, point_backbone, img_size=64)
    clouds = torch.stack([organized_cloud(64, 0, 0.4), torch.zeros(3, 64, 64)])
    with pytest.raises(DataError, match="widget/test/good/001"):
        extractor(None, clouds, names=["widget/test/good/000", "widget/test/good/001"])
