"""Sample discovery for the MVTec 3D-AD layout (also used by converted Eyecandies).

Layout: ``<root>/<class>/<split>/<defect>/{rgb/*.png, xyz/*.tiff, gt/*.png}`` with split one of
``train``, ``validation``, ``test`` and defect ``good`` or a defect name. Unlike the reference, defect folders
are sorted and files are paired by stem; a missing or extra file is an error naming it.
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


def _files_by_stem(folder: Path, suffix: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in folder.iterdir()
            if p.is_file() and p.suffix == suffix and not p.name.startswith(".")}


def _mismatch_message(where: str, kinds: dict[str, dict[str, Path]]) -> str:
    all_stems = set().union(*(set(files) for files in kinds.values()))
    lines = [f"{where}: rgb/xyz{'/gt' if 'gt' in kinds else ''} files do not pair up by name:"]
    for kind, files in kinds.items():
        missing = sorted(all_stems - set(files))
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            lines.append(f"  {kind}/ lacks {len(missing)} file(s) present elsewhere: {shown}")
    return "\n".join(lines)


def _defect_samples(defect_dir: Path, class_name: str, split: str) -> list[Sample]:
    defect = defect_dir.name
    kinds = {"rgb": _files_by_stem(defect_dir / "rgb", ".png"),
             "xyz": _files_by_stem(defect_dir / "xyz", ".tiff")}
    if defect != GOOD:
        kinds["gt"] = _files_by_stem(defect_dir / "gt", ".png")
    stem_sets = [set(files) for files in kinds.values()]
    if any(s != stem_sets[0] for s in stem_sets):
        raise DataError(_mismatch_message(str(defect_dir), kinds))
    return [Sample(class_name, split, defect, stem, kinds["rgb"][stem], kinds["xyz"][stem],
                   kinds["gt"][stem] if "gt" in kinds else None)
            for stem in sorted(stem_sets[0])]


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
