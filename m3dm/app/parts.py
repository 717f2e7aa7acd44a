"""New parts to score: found in folders or given as pairs, and read one by one into the dataset loader's tensors.

Folders hold ``{rgb,xyz[,gt]}`` or ``<defect>/{rgb,xyz[,gt]}`` (files paired by stem, ``m3dm.data.layout``); raw
scans go through the MVTec 3D-AD preprocessing first when asked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from m3dm.data.dataset import read_sample, sample_tensors
from m3dm.data.io import PREPROCESSED_BORDER_SHARE, border_band_share, unpreprocessed_problem
from m3dm.data.layout import group_by_stem
from m3dm.errors import DataError
from m3dm.preprocess.mvtec3d import preprocess_arrays

log = logging.getLogger(__name__)


@dataclass
class Part:
    name: str
    rgb: Path | None
    xyz: Path | None
    gt: Path | None = None
    problem: str | None = None  # known before reading (unpaired file, missing folder)


def _is_group(folder: Path) -> bool:
    return (folder / "rgb").is_dir() or (folder / "xyz").is_dir()


def _group_parts(folder: Path, prefix: str) -> list[Part]:
    """The parts of one ``{rgb,xyz[,gt]}`` folder, paired by stem, sorted; an unpaired file is a bad part."""
    parts = []
    for stem, files in group_by_stem(folder).items():
        if "rgb" not in files and "xyz" not in files:
            continue  # a ground truth alone is no part
        problem = None
        if "xyz" not in files:
            problem = f"{files['rgb']}: no matching point cloud {folder / 'xyz' / stem}.tiff"
        elif "rgb" not in files:
            problem = f"{files['xyz']}: no matching RGB image {folder / 'rgb' / stem}.png"
        parts.append(Part(f"{prefix}/{stem}", files.get("rgb"), files.get("xyz"), files.get("gt"), problem))
    return parts


def _folder_parts(folder: Path) -> list[Part]:
    label = folder.resolve().name
    if not folder.is_dir():
        return [Part(label, None, None, problem=f"{folder}: folder not found")]
    if _is_group(folder):
        groups = [(folder, label)]
    else:
        groups = [(sub, f"{label}/{sub.name}") for sub in sorted(folder.iterdir())
                  if sub.is_dir() and not sub.name.startswith(".") and _is_group(sub)]
    parts = [part for group, prefix in groups for part in _group_parts(group, prefix)]
    if not parts:
        return [Part(label, None, None, problem=f"{folder}: no parts found (expected {folder}/rgb/*.png with "
                                                f"{folder}/xyz/*.tiff, or <defect>/rgb + <defect>/xyz below it)")]
    return parts


def _unique_names(parts: list[Part]) -> list[Part]:
    seen: dict[str, int] = {}
    for part in parts:
        count = seen.get(part.name, 0)
        seen[part.name] = count + 1
        if count:
            part.name = f"{part.name}~{count + 1}"
    return parts


def discover_parts(folders: list[str], rgb_files: list[str], xyz_files: list[str]) -> list[Part]:
    """Single pairs first, then every folder's parts in sorted order."""
    if len(rgb_files) != len(xyz_files):
        raise ValueError(f"--rgb and --xyz must come in pairs ({len(rgb_files)} RGB, {len(xyz_files)} xyz files)")
    parts = [Part(Path(r).stem, Path(r), Path(x)) for r, x in zip(rgb_files, xyz_files)]
    for folder in folders:
        parts += _folder_parts(Path(folder))
    return _unique_names(parts)


@dataclass
class LoadedPart:
    part: Part
    rgb: torch.Tensor  # (3, 224, 224) ImageNet-normalised
    pc: torch.Tensor  # (3, S, S) organized cloud
    gt: np.ndarray | None  # (224, 224) bool


_WARNED_FOLDERS: set[Path] = set()


def _warn_unpreprocessed(xyz: Path, problem: str) -> None:
    """Once per folder: its parts come from the same scanner."""
    if xyz.parent not in _WARNED_FOLDERS:
        _WARNED_FOLDERS.add(xyz.parent)
        log.warning("%s %s; add --preprocess (the MVTec 3D-AD preprocessing) if the parts of %s are raw scans", xyz,
                    problem, xyz.parent)


def _preprocessed_hint(cloud: np.ndarray) -> str:
    """Why the background plane cannot be fitted, when the scan has (almost) no point left in its border."""
    if border_band_share(cloud) > PREPROCESSED_BORDER_SHARE:
        return ""
    return (" (the part looks preprocessed already: nothing is left in its border, where the background plane "
            "was; run without --preprocess)")


def load_part(part: Part, img_size: int = 224, preprocess: bool = False, seed: int = 0) -> LoadedPart:
    """Read (and with ``preprocess`` clean) one part into the tensors ``AnomalyDataset`` builds."""
    if part.problem:
        raise DataError(part.problem)
    cloud, image, mask = read_sample(part.rgb, part.xyz, part.gt)
    return part_from_arrays(part, cloud, image, mask, img_size, preprocess, seed)


def part_from_arrays(part: Part, cloud: np.ndarray, image: Image.Image, mask: Image.Image | None = None,
                     img_size: int = 224, preprocess: bool = False, seed: int = 0) -> LoadedPart:
    """A part read already (organized cloud ``(H, W, 3)``, RGB image, mask or None), (with ``preprocess``
    cleaned and) turned into the tensors ``AnomalyDataset`` builds; ``part`` names it (its paths may be None)."""
    if not preprocess and part.xyz is not None:
        problem = unpreprocessed_problem(cloud)
        if problem:
            _warn_unpreprocessed(Path(part.xyz), problem)
    if preprocess:
        try:
            cloud, rgb, gt, _ = preprocess_arrays(cloud, np.asarray(image), None if mask is None else np.asarray(mask),
                                                  seed=seed)
        except DataError as exc:
            raise DataError(f"{part.xyz}: cannot preprocess: {exc}{_preprocessed_hint(cloud)}") from exc
        image = Image.fromarray(rgb)
        mask = None if gt is None else Image.fromarray(gt)
    rgb, pc, gt = sample_tensors(cloud, image, mask, img_size, part.xyz,
                                 note=" after preprocessing" if preprocess else "")
    return LoadedPart(part, rgb, pc, None if gt is None else gt[0].numpy() > 0)
