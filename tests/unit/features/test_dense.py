"""Per-pixel features for CFM: the extractor's point groups give its PFA patches, and their full-grid projection
equals the fast PFA matrix at the full size; the RGB map's upsampling is the separable
bilinear formula."""

import pytest
import torch

from m3dm.features.alignment import pfa_patches
from m3dm.features.dense import dense_points, dense_rgb, valid_pixels
from m3dm.features.extractor import XYZ_PATCH_GRID, FeatureExtractor


def organized_cloud(size: int, radius: float) -> torch.Tensor:
    v, u = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    cloud = torch.stack([u - 0.5, v - 0.5, 0.4 + 0.03 * torch.sin(8 * u) * torch.cos(6 * v)])
    cloud[:, ((u - 0.5) ** 2 + (v - 0.5) ** 2).sqrt() > radius] = 0
    return cloud


@pytest.fixture(scope="module")
def sample(small_backbones):
    rgb, point = small_backbones
    point.eval()
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    extractor = FeatureExtractor(rgb, point, img_size=48, point_outputs=("patches", "groups"))
    return extractor(image, organized_cloud(48, 0.4)[None])[0]


def test_point_groups_are_those_behind_the_pfa_patches(sample):
    g = sample.xyz_groups
    patches = pfa_patches(g.points, g.flat_index, g.centres, g.features, g.img_size, XYZ_PATCH_GRID)
    torch.testing.assert_close(patches, sample.xyz, rtol=1e-5, atol=1e-6)


def test_full_grid_projection_equals_the_pfa_matrix_at_full_size(sample):
    g = sample.xyz_groups
    dense = dense_points(g)
    expected = pfa_patches(g.points, g.flat_index, g.centres, g.features, g.img_size, out_size=g.img_size)
    assert dense.shape == (48 * 48, 1152)
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-5)
    valid = valid_pixels(dense, by_sum=False)
    cloud = torch.zeros(48 * 48, dtype=torch.bool)
    cloud[g.flat_index] = True
    assert valid[cloud].all()  # every pixel with a point, and the pool's one-pixel rim
    assert valid.sum() > cloud.sum() and not valid.all()
    by_sum = valid_pixels(dense)  # the reference's rule: a subset (random LayerNorm weights make sums vanish)
    assert not (by_sum & ~valid).any() and by_sum.sum() > 0.9 * valid.sum()


def bilinear_matrix(cells: int, size: int) -> torch.Tensor:
    """``(size, cells)`` 1-D linear interpolation with half-pixel centres (align_corners=False), edges clamped."""
    matrix = torch.zeros(size, cells, dtype=torch.float64)
    for x in range(size):
        source = max((x + 0.5) * cells / size - 0.5, 0.0)
        low = min(int(source), cells - 1)
        high = min(low + 1, cells - 1)
        matrix[x, low] += 1 - (source - low)
        matrix[x, high] += source - low
    return matrix


def test_rgb_upsampling_is_the_separable_bilinear_formula(sample):
    rgb_map = sample.rgb_map  # (192, 14, 14) for a /16 ViT at 224
    a = bilinear_matrix(14, 224)
    expected = (a @ rgb_map.double() @ a.T).reshape(192, -1).T
    torch.testing.assert_close(dense_rgb(rgb_map, 224).double(), expected, rtol=1e-5, atol=1e-5)
