"""Torch dataset and loader over the MVTec 3D-AD layout (and converted Eyecandies)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from m3dm.constants import RGB_SIZE
from m3dm.data.io import check_same_size, read_mask, read_organized_pc, read_rgb
from m3dm.data.layout import Sample, discover_samples
from m3dm.data.transforms import mask_to_tensor, organized_pc_to_tensor, rgb_to_tensor, valid_point_mask
from m3dm.errors import ConfigError, DataError, M3DMError


class AnomalyDataset(Dataset):
    """One class and split of a dataset in the MVTec 3D-AD layout.

    Each item is a dict: ``rgb (3, 224, 224)``, ``pc (3, S, S)``, ``gt (1, 224, 224)`` (zeros for good
    samples), ``label`` (0 good, 1 anomalous), ``index``, ``name``, ``rgb_path`` and ``xyz_path``.
    """

    def __init__(self, root: str | Path, class_name: str, split: str, img_size: int = 224):
        self.root = Path(root)
        self.class_name = class_name
        self.split = split
        self.img_size = img_size
        self.samples: list[Sample] = discover_samples(root, class_name, split)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        cloud, image, mask = read_sample(sample.rgb_path, sample.xyz_path, sample.gt_path)
        rgb, pc, gt = sample_tensors(cloud, image, mask, self.img_size, sample.xyz_path)
        if gt is None:
            gt = torch.zeros(1, RGB_SIZE, RGB_SIZE)
        return {"rgb": rgb, "pc": pc, "gt": gt, "label": sample.label, "index": index,
                "name": sample.name, "rgb_path": str(sample.rgb_path), "xyz_path": str(sample.xyz_path)}


def read_sample(rgb_path, xyz_path, gt_path=None):
    """``(cloud (H, W, 3), RGB image, mask image or None)`` of one sample, sizes checked against the cloud."""
    cloud = read_organized_pc(xyz_path)
    image = read_rgb(rgb_path)
    check_same_size(cloud, image, xyz_path, rgb_path)
    mask = None
    if gt_path is not None:
        mask = read_mask(gt_path)
        check_same_size(cloud, mask, xyz_path, gt_path)
    return cloud, image, mask


def sample_tensors(cloud, image, mask, img_size: int, xyz_path, note: str = ""):
    """Per-sample tensors (docs/original.md): ``rgb (3, 224, 224)``, ``pc (3, S, S)``, ``gt (1, 224, 224)`` or None.
    A cloud without a valid point is an error naming ``xyz_path`` (``note`` says at which step)."""
    pc = organized_pc_to_tensor(cloud, img_size)
    if not valid_point_mask(pc).any():
        raise DataError(f"{xyz_path}: the point cloud has no valid point{note} (every pixel has a zero "
                        f"coordinate) after resizing to {img_size}x{img_size}")
    return rgb_to_tensor(image), pc, None if mask is None else mask_to_tensor(mask)


def make_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Ordered (no shuffle, no drop-last) loader; the reference uses batch size 1. With worker processes, a bad
    sample is raised in the main process with its own one-line message (``SampleLoader``). ``pin_memory`` for a
    CUDA device (page-locked batches copy to the GPU asynchronously; on the CPU they would only cost time). At most
    one worker per CPU core and per sample is started (more would only cost memory; the batches are the same)."""
    return error_forwarding_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                   pin_memory=pin_memory, drop_last=False)


def error_forwarding_loader(dataset: Dataset, num_workers: int = 0, **options) -> DataLoader:
    """A DataLoader (``options`` as DataLoader's) with at most one worker process per CPU core and per item, whose
    workers hand an error of ours back as data, raised in the main process with its own message."""
    num_workers = min(num_workers, os.cpu_count() or 1, len(dataset))  # type: ignore[arg-type]  # as above
    if num_workers > 0:
        check_socket_folder()
        return SampleLoader(_ErrorsAsData(dataset), num_workers=num_workers, collate_fn=_collate, **options)
    return DataLoader(dataset, num_workers=0, **options)


# A worker process hands its tensors over through a Unix socket that multiprocessing makes in the temporary
# folder, at <tmp>/pymp-XXXXXXXX/listener-XXXXXXXX; a socket's path holds at most 108 bytes. Past that the worker
# fails and the main process would wait for its batch for ever.
SOCKET_PATH_BYTES, SOCKET_NAME_BYTES = 108, len("/pymp-XXXXXXXX/listener-XXXXXXXX")


def check_socket_folder() -> None:
    """Raise ConfigError when the temporary folder is too long a path for the worker processes' sockets."""
    folder = tempfile.gettempdir()
    if len(os.fsencode(folder)) + SOCKET_NAME_BYTES > SOCKET_PATH_BYTES:
        raise ConfigError(f"--num_workers: the temporary folder {folder} is too long a path for the sockets of "
                          f"worker processes ({len(os.fsencode(folder))} bytes, at most "
                          f"{SOCKET_PATH_BYTES - SOCKET_NAME_BYTES}): set TMPDIR to a shorter folder, or use "
                          f"--num_workers 0")


@dataclass(frozen=True)
class _Failure:
    """An error of ours (DataError, ...) raised while a worker process read a sample: it travels to the main
    process as data, to be raised there with its own message. (Raised in the worker, torch would re-raise it with
    the worker's whole traceback inside the message.)"""

    error_type: type
    message: str


class _ErrorsAsData(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; these have one

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except M3DMError as exc:
            return _Failure(type(exc), str(exc))


def _collate(items: list):
    failure = next((item for item in items if isinstance(item, _Failure)), None)
    return failure if failure is not None else default_collate(items)


class SampleLoader(DataLoader):
    """A loader whose worker processes hand a bad sample's error back as data (``_ErrorsAsData``); iterating
    raises it with its message, after the workers are shut down (each exits cleanly and removes its temporary
    folder, which a worker killed at the main process's exit would leave behind)."""

    def __iter__(self):
        batches = super().__iter__()
        try:
            for batch in batches:
                if isinstance(batch, _Failure):
                    raise batch.error_type(batch.message)
                yield batch
        finally:
            del batches  # the last reference: its workers are joined now, not when the traceback is dropped
