"""Sample discovery for the MVTec 3D-AD layout (also used by converted Eyecandies).

Layout: ``<root>/<class>/<split>/<defect>/{rgb/*.png, xyz/*.tiff, gt/*.png}`` with split one of
``train``, ``validation``, ``test`` and defect ``good`` or a defect name. Unlike the reference, defect folders
are sorted and files are paired by stem; a missing or extra file is an error naming it. ``group_by_stem`` is
the one discovery of a ``{rgb,xyz,gt}`` folder's files, shared with inference on new parts (m3dm.app.predict).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from m3dm.errors import DataError

SPLITS = ("train", "validation", "test")
GOOD = "good"


@dataclass(frozen=True)
class Sample:
    class_name: str
    split: str
    defect: str
    stem: str
    rgb_path: Path
    xyz_path: Path
    gt_path: Path | None  # None for good samples

    @property
    def label(self) -> int:
        return 0 if self.defect == GOOD else 1

    @property
    def name(self) -> str:
        return f"{self.class_name}/{self.split}/{self.defect}/{self.stem}"


SUFFIXES = {"rgb": (".png",), "xyz": (".tiff", ".tif"), "gt": (".png",)}  # by kind (sub-folder), any case


def group_by_stem(folder: str | Path, kinds: tuple[str, ...] = ("rgb", "xyz", "gt")) -> dict[str, dict[str, Path]]:
    """The files of ``folder/<kind>/`` for each kind, grouped by file stem: ``{stem: {kind: path}}`` in stem
    order, with the kinds a stem has files of (a missing sub-folder has none; hidden files are skipped)."""
    groups: dict[str, dict[str, Path]] = {}
    for kind in kinds:
        directory = Path(folder) / kind
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):  # sorted: of a.tif and a.tiff, the latter is kept
            if path.is_file() and path.suffix.lower() in SUFFIXES[kind] and not path.name.startswith("."):
                groups.setdefault(path.stem, {})[kind] = path
    return {stem: groups[stem] for stem in sorted(groups)}


def _mismatch_message(where: str, kinds: tuple[str, ...], groups: dict[str, dict[str, Path]]) -> str:
    lines = [f"{where}: rgb/xyz{'/gt' if 'gt' in kinds else ''} files do not pair up by name:"]
    for kind in kinds:
        missing = [stem for stem, files in groups.items() if kind not in files]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            lines.append(f"  {kind}/ lacks {len(missing)} file(s) present elsewhere: {shown}")
    return "\n".join(lines)


def _defect_samples(defect_dir: Path, class_name: str, split: str) -> list[Sample]:
    defect = defect_dir.name
    kinds = ("rgb", "xyz") if defect == GOOD else ("rgb", "xyz", "gt")
    groups = group_by_stem(defect_dir, kinds)
    if any(len(files) != len(kinds) for files in groups.values()):
        raise DataError(_mismatch_message(str(defect_dir), kinds, groups))
    return [Sample(class_name, split, defect, stem, files["rgb"], files["xyz"], files.get("gt"))
            for stem, files in groups.items()]


def discover_samples(root: str | Path, class_name: str, split: str) -> list[Sample]:
    """List the samples of one class and split, sorted by defect folder then file stem.

    Raises DataError when the folder is missing or empty, or when rgb/xyz/gt files do not pair up.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_dir = Path(root) / class_name / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder not found (expected <root>/<class>/{split}/<defect>/...)")
    defect_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if split != "test":
        defect_dirs = [d for d in defect_dirs if d.name == GOOD]
    samples = [s for d in defect_dirs for s in _defect_samples(d, class_name, split)]
    if not samples:
        raise DataError(f"{split_dir}: no samples found (expected {'<defect>' if split == 'test' else 'good'}"
                        f"/rgb/*.png with matching xyz/*.tiff)")
    return samples


def available_classes(root: str | Path) -> list[str]:
    """Class folders under a dataset root (folders holding a train or test split), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and any((p / s).is_dir() for s in SPLITS))
