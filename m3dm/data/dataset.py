"""Torch dataset and loader over the MVTec 3D-AD layout (and converted Eyecandies)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..constants import RGB_SIZE
from .io import DataError, check_same_size, read_mask, read_organized_pc, read_rgb
from .layout import Sample, discover_samples
from .transforms import mask_to_tensor, organized_pc_to_tensor, rgb_to_tensor, valid_point_mask


class AnomalyDataset(Dataset):
    """One class and split of a dataset in the MVTec 3D-AD layout.

    Each item is a dict: ``rgb (3, 224, 224)``, ``pc (3, S, S)``, ``gt (1, 224, 224)`` (zeros for good
    samples), ``label`` (0 good, 1 anomalous), ``index``, ``name`` and ``rgb_path``.
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
        cloud = read_organized_pc(sample.xyz_path)
        image = read_rgb(sample.rgb_path)
        check_same_size(cloud, image, sample.xyz_path, sample.rgb_path)
        pc = organized_pc_to_tensor(cloud, self.img_size)
        if not valid_point_mask(pc).any():
            raise DataError(f"{sample.xyz_path}: the point cloud has no valid point (every pixel has a zero "
                            f"coordinate) after resizing to {self.img_size}x{self.img_size}")
        if sample.gt_path is None:
            gt = torch.zeros(1, RGB_SIZE, RGB_SIZE)
        else:
            mask = read_mask(sample.gt_path)
            check_same_size(cloud, mask, sample.xyz_path, sample.gt_path)
            gt = mask_to_tensor(mask)
        return {"rgb": rgb_to_tensor(image), "pc": pc, "gt": gt, "label": sample.label, "index": index,
                "name": sample.name, "rgb_path": str(sample.rgb_path)}


def make_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    """Ordered (no shuffle, no drop-last) loader; the reference uses batch size 1."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False)
