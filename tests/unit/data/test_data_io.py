import os
import stat
import tempfile

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from m3dm.data.dataset import AnomalyDataset, make_loader
from m3dm.data.io import read_organized_pc, write_text, write_tiff
from m3dm.data.transforms import mask_to_tensor, organized_pc_to_tensor, rgb_to_tensor
from m3dm.errors import ConfigError, DataError


@pytest.mark.parametrize("content, message", [
    (b"this is not a tiff", "not a readable TIFF"),
    (np.zeros((8, 8), np.float32), r"shape \(H, W, 3\)"),
    (np.ones((8, 8, 3), np.int32), "float coordinates"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN or infinite"),
])
def test_bad_point_cloud_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.tiff"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        tifffile.imwrite(path, content, photometric="rgb" if content.ndim == 3 else None)
    with pytest.raises(DataError, match=message) as info:
        read_organized_pc(path)
    assert str(path) in str(info.value)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "cloud.tiff"
    good = np.ones((4, 4, 3), np.float32)
    write_tiff(path, good)
    with pytest.raises(Exception):  # noqa: B017 - whatever tifffile raises for an object it cannot write
        write_tiff(path, object())
    np.testing.assert_array_equal(tifffile.imread(path), good)
    assert [p.name for p in tmp_path.iterdir()] == ["cloud.tiff"]  # no temporary left behind


def test_rgb_transform_matches_torchvision():
    from torchvision import transforms

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (150, 170, 3), dtype=np.uint8))
    reference = transforms.Compose([
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    torch.testing.assert_close(rgb_to_tensor(image), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size_in", [96, 400, 800, 250])
def test_point_cloud_resize_is_legacy_nearest(size_in):
    rng = np.random.default_rng(size_in)
    cloud = rng.normal(size=(size_in, size_in + 7, 3)).astype(np.float32)
    rows = np.floor(np.arange(224) * size_in / 224).astype(int)
    cols = np.floor(np.arange(224) * (size_in + 7) / 224).astype(int)
    expected = cloud[rows][:, cols].transpose(2, 0, 1)
    np.testing.assert_array_equal(organized_pc_to_tensor(cloud, 224).numpy(), expected)


def test_mask_threshold():
    mask = Image.fromarray(np.array([[0, 127], [128, 255]], np.uint8))
    out = mask_to_tensor(mask, size=2)
    assert out.shape == (1, 2, 2) and out.tolist() == [[[0.0, 0.0], [1.0, 1.0]]]


def test_dataset_items_and_batches(raw_mvtec):
    dataset = AnomalyDataset(raw_mvtec, "gadget", "test", img_size=224)
    item = dataset[0]
    assert item["rgb"].shape == (3, 224, 224) and item["pc"].shape == (3, 224, 224)
    assert item["gt"].shape == (1, 224, 224) and item["pc"].dtype == torch.float32
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    assert sorted(set(labels)) == [0, 1]
    for i, s in enumerate(dataset.samples):
        if s.label:
            assert dataset[i]["gt"].sum() > 0
    batch = next(iter(make_loader(dataset, batch_size=3)))
    assert batch["rgb"].shape == (3, 3, 224, 224) and batch["label"].shape == (3,)
    assert len(batch["rgb_path"]) == 3


def test_dataset_rejects_size_mismatch_and_empty_cloud(raw_mvtec, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(raw_mvtec, root)
    dataset = AnomalyDataset(root, "gadget", "train")
    Image.open(dataset.samples[0].rgb_path).resize((50, 60)).save(dataset.samples[0].rgb_path)
    with pytest.raises(DataError, match="50x60"):
        dataset[0]
    tifffile.imwrite(dataset.samples[1].xyz_path, np.zeros((96, 96, 3), np.float32), photometric="rgb")
    with pytest.raises(DataError, match="no valid point") as info:
        dataset[1]
    assert str(dataset.samples[1].xyz_path) in str(info.value)


def test_real_samples_load(real_mvtec_subset):
    dataset = AnomalyDataset(real_mvtec_subset, "cable_gland", "test")
    for i in range(len(dataset)):
        item = dataset[i]
        valid = (item["pc"] != 0).all(0)
        assert 0.3 < valid.float().mean() < 0.9  # raw real clouds: about 55 % valid
        assert item["pc"][:, valid][2].min() > 0.5  # metres from the sensor
        assert (item["gt"].sum() > 0) == bool(item["label"])


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path, umask):
    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        write_text(tmp_path / "atomic.txt", "x")
        write_tiff(tmp_path / "atomic.tiff", np.ones((2, 2, 3), np.float32))
    finally:
        os.umask(previous)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("atomic.txt", "atomic.tiff"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_worker_processes_refuse_a_temporary_folder_too_long_for_their_sockets(tmp_path, monkeypatch):
    # with a temporary folder past the socket path's limit a worker's batch never arrives: refused in one line
    long = tmp_path / ("x" * (120 - len(str(tmp_path))))
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    with pytest.raises(ConfigError, match=r"--num_workers: the temporary folder .* too long a path .* TMPDIR"):
        make_loader([torch.zeros(1), torch.zeros(1)], num_workers=1)
    assert len(make_loader([torch.zeros(1)], num_workers=0)) == 1  # no worker process, no socket: no check
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    assert len(make_loader([torch.zeros(1), torch.zeros(1)], num_workers=1)) == 2
