"""The exported path's pieces that must equal their PyTorch counterparts bit for bit: the Pillow blur in integer
matrix products, the runner's NumPy farthest point sampling and DropPath draws; and the runner's light imports."""

import subprocess
import sys

import numpy as np
import torch
from PIL import Image, ImageFilter

from m3dm.export.blur import box_pass_matrix, pillow_gaussian_blur, quantised_blur
from m3dm.features.pointops import farthest_point_sample, pad_clouds
from m3dm.memory.maps import blur_map
from m3dm_runner import pointops


def test_integer_blur_is_pillows_gaussian_blur():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56)).astype(np.uint8)
    expected = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(4)))
    got = pillow_gaussian_blur(torch.from_numpy(pixels).long(), box_pass_matrix(56), box_pass_matrix(40))
    assert np.array_equal(got.numpy(), expected)


def test_quantised_blur_is_the_maps_pil_blur():
    maps = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(0)) * 3
    maps[1] = 0  # an all-zero map stays zero
    got = quantised_blur(maps, box_pass_matrix(64), box_pass_matrix(64))
    for score_map, blurred in zip(maps, got):
        assert torch.equal(blurred, blur_map(score_map)[0])


def test_numpy_farthest_point_sample_is_the_torch_one():
    generator = torch.Generator().manual_seed(0)
    clouds = [torch.rand(300, 3, generator=generator), torch.rand(257, 3, generator=generator)]
    clouds[1][:5] = 0.01  # points near the origin are never chosen
    points, _ = pad_clouds(clouds)
    expected = farthest_point_sample(points, 40)
    padded, _ = pointops.pad_clouds([c.numpy() for c in clouds], [np.arange(len(c)) for c in clouds])
    assert np.array_equal(pointops.farthest_point_sample(padded, 40), expected.numpy())


def test_drop_path_draws_continue_the_torch_generator():
    generator = torch.Generator().manual_seed(7)
    torch.rand(30, generator=generator)
    draws = pointops.DropPathDraws.from_torch_state(generator.get_state().numpy())
    expected = torch.stack([torch.rand(24, generator=generator) for _ in range(3)]).view(3, 12, 2)
    assert np.array_equal(draws.draw(2), expected[:2].numpy())
    assert np.array_equal(draws.draw(1), expected[2:].numpy())


def test_valid_points_match_the_extractor():
    from m3dm.features.alignment import valid_points

    cloud = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(1))
    cloud[:, :5] = 0
    cloud[2, 10, 3] = 0
    points, index = valid_points(cloud)
    got_points, got_index = pointops.valid_points(cloud.numpy())
    assert np.array_equal(got_points, points.numpy()) and np.array_equal(got_index, index.numpy())


def test_runner_imports_no_training_stack():
    code = ("import sys, m3dm_runner, m3dm_runner.model, m3dm_runner.__main__; "
            "heavy = {'torch', 'timm', 'open3d', 'sklearn', 'scipy', 'm3dm'} & set(sys.modules); print(sorted(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
