"""The UFF pretraining dumps of ``main.py --save_feature`` (quirk 20): one ``(3136, 1152 + C)`` tensor
per training sample, xyz patches then RGB, in the reference's file names; written here, and read back (checked)
as the pretraining dataset."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from m3dm.constants import XYZ_FEATURE_DIM
from m3dm.data.io import atomic_path
from m3dm.errors import FeatureDumpError


def scrambled_rgb_rows(rgb_patches: torch.Tensor, rows: int) -> torch.Tensor:
    """The reference's RGB layout in pretraining dumps (quirk 20): row ``t`` holds RGB token
    ``(4 (t mod n) + floor(t / n)) mod n`` of the ``n`` ViT tokens, instead of the token above it."""
    n = rgb_patches.shape[0]
    if rows != 4 * n:
        raise ValueError(f"the reference's dump layout needs 4 x {n} = {4 * n} xyz patches, got {rows}: use "
                         f"--fix_quirks for spatially aligned dumps")
    t = torch.arange(rows)
    return rgb_patches[(4 * (t % n) + t // n) % n]


def pretraining_features(xyz: torch.Tensor, rgb_patches: torch.Tensor, rgb_aligned: torch.Tensor,
                         aligned: bool) -> torch.Tensor:
    """One dumped training sample: ``(3136, 1152 + C)``, unnormalised xyz patches then RGB, with
    the reference's scrambled RGB rows unless ``aligned``."""
    rgb = rgb_aligned if aligned else scrambled_rgb_rows(rgb_patches, xyz.shape[0])
    return torch.cat([xyz, rgb], dim=1).float().contiguous()


def save_pretraining_features(folder: str | Path, class_name: str, index: int, features: torch.Tensor) -> Path:
    """``<folder>/<class><index>.pt`` as the reference names them, written atomically."""
    path = Path(folder) / f"{class_name}{index}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(features.clone(), tmp)
    return path


class FeatureDumpDataset(Dataset):
    """Every ``*.pt`` file of a folder in name order, each a ``(patches, 1152 + C)`` float tensor: unnormalised
    xyz patch features, then RGB features of width ``C`` (768 for ViT-B). Every file is checked up front
    (memory-mapped, so only the headers are read) for one common shape."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FeatureDumpError(f"feature folder '{folder}' not found (write it with main.py --save_feature)")
        # dot files are the temporaries of interrupted atomic writes
        self.files = sorted(p for p in self.folder.iterdir()
                            if p.suffix == ".pt" and p.is_file() and not p.name.startswith("."))
        if not self.files:
            raise FeatureDumpError(f"feature folder '{self.folder}' holds no .pt feature files (write them with "
                                   f"main.py --method_name DINO+Point_MAE --save_feature --save_feature_path "
                                   f"{self.folder})")
        self.shape = self._check(self.files[0], self._read(self.files[0], mmap=True), None)
        for path in self.files[1:]:
            self._check(path, self._read(path, mmap=True), self.shape)

    @property
    def rgb_dim(self) -> int:
        return self.shape[1] - XYZ_FEATURE_DIM

    @staticmethod
    def _read(path: Path, mmap: bool) -> torch.Tensor:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:
            if mmap:  # legacy (non-zip) serialisation cannot be memory-mapped
                return FeatureDumpDataset._read(path, mmap=False)
            raise FeatureDumpError(f"{path}: not a readable feature tensor ({type(exc).__name__}: {exc})") from exc

    def _check(self, path: Path, features, expected: tuple[int, int] | None) -> tuple[int, int]:
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] <= XYZ_FEATURE_DIM:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise FeatureDumpError(f"{path}: expected a (patches, {XYZ_FEATURE_DIM} + C) feature tensor "
                                   f"(C = RGB width, 768 for ViT-B), got {got}")
        if expected is not None and tuple(features.shape) != expected:
            raise FeatureDumpError(f"{path}: shape {tuple(features.shape)} differs from {expected} of "
                                   f"{self.files[0]} (mixed backbones or layouts in '{self.folder}'?)")
        rows, width = features.shape
        return rows, width

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        features = self._read(path, mmap=False)
        self._check(path, features, self.shape)  # the file may have changed since the scan
        if not torch.isfinite(features).all():  # checked as each file is read: the scan would read every dump twice
            bad = int((~torch.isfinite(features)).any(dim=1).sum())
            raise FeatureDumpError(f"{path}: {bad} of its {features.shape[0]} patches hold NaN or infinite "
                                   f"features (write the dumps again with main.py --save_feature)")
        return features.float()
