"""Sample discovery for the MVTec 3D-AD layout (also used by converted Eyecandies).

Layout: ``<root>/<class>/<split>/<defect>/{rgb/*.png, xyz/*.tiff, gt/*.png}`` with split one of
``train``, ``validation``, ``test`` and defect ``good`` or a defect name. Unlike the reference, defect folders
are sorted and files are paired by stem; a missing or extra file is an error naming it. A defect folder
without ``gt/`` is a dataset without pixel masks (image-level metrics only). ``group_by_stem`` is
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
    gt_path: Path | None  # None for good samples and in a defect folder without gt/ (no pixel masks)

    @property
    def label(self) -> int:
        return 0 if self.defect == GOOD else 1

    @property
    def name(self) -> str:
        return f"{self.class_name}/{self.split}/{self.defect}/{self.stem}"


SUFFIXES = {"rgb": (".png",), "xyz": (".tiff", ".tif"), "gt": (".png",),  # by kind (sub-folder), any case
            "depth": (".png", ".tiff", ".tif")}  # depth images before their conversion (m3dm.preprocess.depth)


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


def pairing_problems(groups: dict[str, dict[str, Path]], kinds: tuple[str, ...]) -> list[str]:
    """What is wrong with the pairing of one defect folder's files (``group_by_stem``), one line per kind:
    stems a required kind lacks, and ground-truth files of a stem with no image or cloud (an extra gt file is
    not a missing rgb/xyz). Empty when every stem has a file of each kind."""
    lines = []
    for kind in kinds:
        missing = [stem for stem, files in groups.items() if kind not in files and set(files) - {"gt"}]
        if missing:
            lines.append(f"{kind}/ lacks {len(missing)} file(s) present elsewhere: {_shown(missing)}")
    if "gt" in kinds:
        extra = [stem for stem, files in groups.items() if set(files) == {"gt"}]
        if extra:
            others = " or ".join(f"{kind}/" for kind in kinds if kind != "gt")
            lines.append(f"gt/ has {len(extra)} extra file(s) with no {others} file: {_shown(extra)}")
    return lines


def _shown(stems: list[str], limit: int = 10) -> str:
    return ", ".join(stems[:limit]) + (" ..." if len(stems) > limit else "")


def sample_kinds(defect_dir: Path) -> tuple[str, ...]:
    """The files every sample of a defect folder must have: rgb and xyz, and gt in a defect folder that has a
    ``gt/`` sub-folder (a dataset without pixel masks has none: its samples get image-level metrics only)."""
    if defect_dir.name == GOOD or not (defect_dir / "gt").is_dir():
        return ("rgb", "xyz")
    return ("rgb", "xyz", "gt")


def _defect_samples(defect_dir: Path, class_name: str, split: str) -> tuple[list[Sample], list[str]]:
    """The samples of one defect folder and the lines saying what does not pair up (then no samples)."""
    kinds = sample_kinds(defect_dir)
    groups = group_by_stem(defect_dir, kinds)
    problems = pairing_problems(groups, kinds)
    if problems:
        return [], problems
    return [Sample(class_name, split, defect_dir.name, stem, files["rgb"], files["xyz"], files.get("gt"))
            for stem, files in groups.items()], []


def defect_folders(root: str | Path, class_name: str, split: str) -> list[Path]:
    """The defect folders of one class and split that hold samples (only ``good`` outside the test split)."""
    split_dir = Path(root) / class_name / split
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return folders if split == "test" else [d for d in folders if d.name == GOOD]


def discover_samples(root: str | Path, class_name: str, split: str) -> list[Sample]:
    """List the samples of one class and split, sorted by defect folder then file stem.

    Raises DataError when the folder is missing or empty, or when rgb/xyz/gt files do not pair up (naming every
    folder and stem that does not). A defect folder without ``gt/`` gives samples without masks.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_dir = Path(root) / class_name / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder not found (expected <root>/<class>/{split}/<defect>/...)")
    samples, problems = [], []
    for defect_dir in defect_folders(root, class_name, split):
        found, wrong = _defect_samples(defect_dir, class_name, split)
        samples += found
        problems += [f"{defect_dir}: {line}" for line in wrong]
    if problems:  # every folder's problems at once, not one folder per run
        raise DataError(f"{split_dir}: rgb/xyz/gt files do not pair up by name:\n  " + "\n  ".join(problems))
    if not samples:
        raise DataError(f"{split_dir}: no samples found (expected {'<defect>' if split == 'test' else 'good'}"
                        f"/rgb/*.png with matching xyz/*.tiff)")
    return samples


def masks_available(samples: list[Sample]) -> bool:
    """Whether every defective sample has a ground-truth mask (the pixel metrics need them all)."""
    return all(s.gt_path is not None for s in samples if s.label)


def available_classes(root: str | Path) -> list[str]:
    """Class folders under a dataset root (folders holding a train or test split), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and any((p / s).is_dir() for s in SPLITS))
