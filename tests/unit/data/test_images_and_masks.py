"""Reading images (8- and 16-bit, grey, palette, RGB, RGBA; 32-bit pixels refused by name) and masks (a pixel is
defective when non-zero), against the reference's PIL conversions."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m3dm.data.io import read_mask, read_rgb
from m3dm.data.synthetic import make_mvtec_scene, sample_rng
from m3dm.data.transforms import mask_to_tensor, rgb_to_tensor
from m3dm.errors import DataError


def reference_mask_tensor(path: Path) -> torch.Tensor:
    """The original M3DM's mask: PIL grey ('L'), nearest resize to 224, ToTensor, then > 0.5."""
    with Image.open(path) as mask:
        return mask_to_tensor(mask.convert("L"))


def photo(seed: int = 0, size: int = 48) -> np.ndarray:
    return make_mvtec_scene(sample_rng(seed, "gadget", "test", "good", 0), size, size, "gadget", "good").rgb


def test_8_bit_rgb_images_read_exactly_as_the_reference_converts_them(tmp_path):
    for mode in ("RGB", "RGBA", "L", "P", "LA", "1"):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(photo()).convert(mode).save(path)
        with Image.open(path) as image:
            expected = image.convert("RGB")
        assert read_rgb(path).mode == "RGB"
        assert np.array_equal(np.asarray(read_rgb(path)), np.asarray(expected)), mode
        assert torch.equal(rgb_to_tensor(read_rgb(path)), rgb_to_tensor(expected)), mode


def test_a_16_bit_grey_image_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    grey = photo()[..., 1]
    path = tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # 8-bit v -> 16-bit v * 257 (full range)
    with Image.open(path) as image:
        assert image.mode == "I;16" and np.asarray(image.convert("RGB")).min() == 255  # PIL's own: all white
    assert np.array_equal(np.asarray(read_rgb(path)), np.repeat(grey[..., None], 3, axis=2))


def test_16_bit_values_keep_their_high_byte_as_pil_reads_16_bit_colour_pngs(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.array([[0, 255, 256, 32767, 65535]], dtype=np.uint16)).save(path)
    assert np.asarray(read_rgb(path))[..., 0].tolist() == [[0, 0, 1, 127, 255]]


@pytest.mark.parametrize("mode, array", [("F", np.full((8, 8), 0.5, np.float32)),
                                         ("I", np.full((8, 8), 70000, np.int32))])
def test_32_bit_pixels_are_refused_naming_the_file(tmp_path, mode, array):
    path = tmp_path / "rgb.png"
    Image.fromarray(array, mode).save(path, format="TIFF")  # a TIFF under a .png name: PIL opens it
    for reader in (read_rgb, read_mask):
        with pytest.raises(DataError, match=rf"^{path}: 32-bit .* pixels \(PIL mode {mode}\) are not supported"):
            reader(path)


def masks(tmp_path: Path) -> dict[str, Path]:
    """0/255, 0/1, 16-bit 0/1, coloured (pure red), palette and antialiased masks of the same defect."""
    defect = np.zeros((40, 40), bool)
    defect[10:25, 12:30] = True
    files = {
        "0/255": Image.fromarray(np.where(defect, 255, 0).astype(np.uint8)),
        "0/1": Image.fromarray(defect.astype(np.uint8)),
        "16-bit 0/1": Image.fromarray(defect.astype(np.uint16)),
        "red": Image.fromarray(np.stack([defect * 255, 0 * defect, 0 * defect], axis=2).astype(np.uint8)),
        "palette": Image.fromarray(np.where(defect, 255, 0).astype(np.uint8)).convert("P"),
        "rgba": Image.fromarray(np.stack([defect * 200] * 3 + [np.full_like(defect, 255)], 2).astype(np.uint8)),
    }
    paths = {}
    for i, (name, image) in enumerate(files.items()):
        paths[name] = tmp_path / f"mask{i}.png"
        image.save(paths[name])
    return paths


def test_a_mask_pixel_is_defective_when_non_zero_whatever_the_encoding(tmp_path):
    paths = masks(tmp_path)
    expected = mask_to_tensor(read_mask(paths["0/255"]))
    assert expected.sum() > 0
    for name, path in paths.items():
        assert np.isin(np.asarray(read_mask(path)), (0, 255)).all(), name
        assert torch.equal(mask_to_tensor(read_mask(path)), expected), name
    # the reference's rule reads the 0/1 and the pure red masks as empty
    assert reference_mask_tensor(paths["0/1"]).sum() == 0 and reference_mask_tensor(paths["red"]).sum() == 0


def test_the_rule_gives_the_reference_masks_on_the_real_mvtec_3d_ad_masks(real_mvtec_subset):
    paths = sorted((real_mvtec_subset / "cable_gland" / "test").glob("*/gt/*.png"))
    assert len(paths) == 5
    for path in paths:
        ours, reference = mask_to_tensor(read_mask(path)), reference_mask_tensor(path)
        assert ours.shape == (1, 224, 224) and torch.equal(ours, reference), path
        assert ours.sum() > 0 or path.parent.parent.name == "good"


def test_the_rule_gives_the_reference_masks_on_the_synthetic_masks(raw_mvtec):
    paths = sorted(raw_mvtec.glob("*/test/*/gt/*.png"))
    assert len(paths) >= 4
    for path in paths:
        ours = mask_to_tensor(read_mask(path))
        assert torch.equal(ours, reference_mask_tensor(path)), path
        assert ours.sum() > 0 or path.parent.parent.name == "good"
