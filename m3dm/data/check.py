"""Checks of a whole dataset tree in one pass (``python -m m3dm.data check ROOT``; main.py runs the quick ones).

Every problem is collected, none stops the walk: pairing of the rgb/xyz/gt files, missing splits, image sizes,
cloud dtypes, NaN/inf coordinates, empty or nearly empty clouds, classes without defective test parts or without
masks. An *error* makes the tree unusable for a run (the loader would stop on it); a *warning* is a run that
works but gives less than expected (e.g. no pixel metrics); a *note* is worth knowing (no validation split).
``contents=False`` reads file headers only (sizes, dtypes, pairing): what main.py checks up front in a second;
the full check reads each cloud once.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from m3dm.data.io import (
    HUGE_COORDINATES,
    PREPROCESS_HOW,
    defect_pixels,
    huge_pixels,
    read_tiff,
    unpreprocessed_problem,
    unsupported_image_mode,
)
from m3dm.data.layout import GOOD, SPLITS, Sample, available_classes, group_by_stem, pairing_problems, sample_kinds
from m3dm.errors import DataError

log = logging.getLogger(__name__)

ERROR, WARNING, NOTE = "error", "warning", "note"
UNPREPROCESSED_KIND = "unpreprocessed"
SPARSE_FRACTION = 0.01  # a cloud with fewer valid points than this share of its pixels is "nearly empty"


@dataclass(frozen=True)
class Problem:
    severity: str  # ERROR, WARNING or NOTE (worth knowing, nothing lost: main.py logs it at debug level)
    kind: str  # short name of the check, e.g. "pairing", "size", "nonfinite" (counted in the summary)
    where: str  # the file or folder
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class SplitCounts:
    by_defect: Counter = field(default_factory=Counter)  # samples per defect folder
    masks: int = 0  # defective samples with a ground-truth mask

    @property
    def samples(self) -> int:
        return sum(self.by_defect.values())

    @property
    def defective(self) -> int:
        return sum(n for defect, n in self.by_defect.items() if defect != GOOD)


@dataclass
class DatasetReport:
    root: Path
    classes: list[str]
    counts: dict[str, dict[str, SplitCounts]] = field(default_factory=dict)  # class -> split -> counts
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def usable(self) -> bool:
        return not self.errors

    @property
    def looks_unpreprocessed(self) -> bool:
        return any(p.kind == UNPREPROCESSED_KIND for p in self.problems)

    def add(self, severity: str, kind: str, where, message: str) -> None:
        self.problems.append(Problem(severity, kind, str(where), message))

    def summary(self, shown_per_kind: int = 10) -> str:
        """The counts per class and split, then every problem (at most ``shown_per_kind`` of each kind and
        severity, with how many more), then the verdict."""
        lines = [f"dataset {self.root}: {len(self.classes)} class(es)"]
        for class_name in self.classes:
            for split, counts in self.counts.get(class_name, {}).items():
                defects = ", ".join(f"{d} {n}" for d, n in sorted(counts.by_defect.items()))
                masks = f"; masks {counts.masks}/{counts.defective}" if split == "test" and counts.defective else ""
                lines.append(f"  {class_name}/{split}: {counts.samples} sample(s) ({defects or 'none'}){masks}")
        for severity in (ERROR, WARNING, NOTE):
            found = [p for p in self.problems if p.severity == severity]
            if not found:
                continue
            kinds = Counter(p.kind for p in found)
            lines.append(f"{len(found)} {severity}(s): " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
            for kind in sorted(kinds):
                of_kind = [p for p in found if p.kind == kind]
                lines += [f"  {severity.upper()} {p}" for p in of_kind[:shown_per_kind]]
                if len(of_kind) > shown_per_kind:
                    lines.append(f"  ... and {len(of_kind) - shown_per_kind} more {kind} {severity}(s)")
        lines.append("the dataset can be used" if self.usable else "the dataset CANNOT be used as it is "
                                                                  "(fix the errors above)")
        if self.looks_unpreprocessed:
            lines.append(f"but it looks UNPREPROCESSED (raw MVTec 3D-AD scans): {PREPROCESS_HOW}, then use that")
        return "\n".join(lines)

    def raise_for_errors(self) -> None:
        """Log the warnings (and notes, at debug level); raise one DataError listing every error (each naming its
        file or folder)."""
        for problem in self.problems:
            if problem.severity != ERROR:
                log.log(logging.WARNING if problem.severity == WARNING else logging.DEBUG, "dataset check: %s",
                        problem)
        if self.errors:
            raise DataError(f"{self.root}: {len(self.errors)} problem(s) in the dataset (python -m m3dm.data check "
                            f"{self.root} also reads every value):\n  "
                            + "\n  ".join(str(p) for p in self.errors))


def check_dataset(root: str | Path, classes: list[str] | None = None, *, contents: bool = True,
                  fitting: bool = True, workers: int = 4, progress: bool = False) -> DatasetReport:
    """Check ``classes`` (default: every class folder) of a dataset in the MVTec 3D-AD layout.

    ``contents``: read every cloud and image (dtypes, NaN/inf, empty clouds, empty masks) besides the headers.
    ``fitting``: the train split is needed (not for evaluating a saved model). Never raises for a problem of
    the data: each one is in the report.
    """
    root = Path(root)
    report = DatasetReport(root, list(classes or []))
    if not root.is_dir():
        report.add(ERROR, "root", root, "dataset root not found")
        return report
    if classes is None:
        report.classes = available_classes(root)
        if not report.classes:
            report.add(ERROR, "classes", root, "no class folders (expected <root>/<class>/{train,test}/...)")
    samples = []
    for class_name in report.classes:
        class_samples = _check_class(report, root, class_name, fitting)
        if class_samples and not contents:  # one cloud read per class: raw scans are raw throughout
            _check_preprocessed(class_samples[0].xyz_path, report.add)
        samples += class_samples
    with ThreadPoolExecutor(max(1, workers)) as pool:  # the readers release the GIL while decoding
        checked = pool.map(lambda s: _check_sample(s, contents), samples)
        for problems in tqdm(checked, total=len(samples), desc="check samples", unit="sample", disable=not progress,
                             file=sys.stderr, leave=False):
            report.problems += problems
    return report


def _check_class(report: DatasetReport, root: Path, class_name: str, fitting: bool) -> list[Sample]:
    """The folder checks of one class (splits, pairing, defects, masks); returns its paired samples."""
    class_dir = root / class_name
    if not class_dir.is_dir():
        present = ", ".join(available_classes(root)) or "none"
        report.add(ERROR, "classes", class_dir, f"class folder not found (classes present: {present})")
        return []
    counts = report.counts.setdefault(class_name, {})
    samples = []
    for split in SPLITS:
        split_dir = class_dir / split
        required = split == "test" or (split == "train" and fitting)
        if not split_dir.is_dir():
            if required:
                report.add(ERROR, "split", split_dir, f"{split} split not found (expected {split}/good/...)")
            elif split == "validation":
                report.add(NOTE, "split", split_dir, "no validation split: --save_model takes its pass/fail "
                                                        "threshold parts from the last 10 % of train")
            continue
        counts[split] = split_counts = SplitCounts()
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if any(defect_dir.glob("*_depth.png")):
                report.add(ERROR, "not converted", defect_dir, "raw Eyecandies layout (*_depth.png): convert it first "
                                                               "with utils/preprocess_eyecandies.py")
                continue
            if split != "test" and defect_dir.name != GOOD:
                report.add(NOTE, "ignored", defect_dir, f"only good/ is read in the {split} split")
                continue
            samples += _check_defect_folder(report, defect_dir, class_name, split, split_counts)
        if not split_counts.samples and (required or split == "validation"):
            report.add(ERROR if required else WARNING, "split", split_dir,
                       "no samples (expected <defect>/rgb/*.png with matching xyz/*.tiff)")
    test = counts.get("test")
    if test is not None and test.samples:
        _check_test_labels(report, class_dir / "test", test)
    return samples


def _check_defect_folder(report: DatasetReport, defect_dir: Path, class_name: str, split: str,
                         counts: SplitCounts) -> list[Sample]:
    if (defect_dir / "depth").is_dir() and not (defect_dir / "xyz").is_dir():
        report.add(ERROR, "not converted", defect_dir, "depth/ images but no xyz/ clouds: convert the tree first "
                                                       "with utils/preprocess_depth.py (docs/own_data.md)")
        return []
    kinds = sample_kinds(defect_dir)
    groups = group_by_stem(defect_dir, kinds)
    problems = pairing_problems(groups, kinds)
    for line in problems:
        report.add(ERROR, "pairing", defect_dir, line)
    samples = [Sample(class_name, split, defect_dir.name, stem, files["rgb"], files["xyz"], files.get("gt"))
               for stem, files in groups.items() if {"rgb", "xyz"} <= set(files)]
    if not groups:
        report.add(WARNING, "empty folder", defect_dir, "no rgb/*.png or xyz/*.tiff files")
    counts.by_defect[defect_dir.name] += len(samples)
    counts.masks += sum(s.gt_path is not None for s in samples if s.label)
    if samples and not problems and split == "test" and defect_dir.name != GOOD and "gt" not in kinds:
        report.add(WARNING, "no masks", defect_dir, "no gt/ folder: these parts get image-level metrics only (the "
                                                    "class's pixel ROCAUC and AU-PRO are not available)")
    return samples


def _check_test_labels(report: DatasetReport, test_dir: Path, test: SplitCounts) -> None:
    if not test.defective:
        report.add(WARNING, "no defects", test_dir, f"only good test parts ({test.samples}): no image or pixel "
                                                    "metric is available (add defective test parts)")
    elif not test.by_defect.get(GOOD):
        report.add(WARNING, "no good", test_dir, f"no good test parts (test/good/): no image or pixel metric is "
                                                 f"available with {test.defective} defective ones only")


def _check_sample(sample: Sample, contents: bool) -> list[Problem]:
    """The file checks of one sample: the cloud (header, or every value), the image and mask sizes (and, reading
    every value, their pixel modes and the mask's values)."""
    problems = []
    add = lambda severity, kind, where, message: problems.append(Problem(severity, kind, str(where), message))
    shape = _check_cloud(sample.xyz_path, contents, add)
    for path, what in ((sample.rgb_path, "RGB image"), (sample.gt_path, "mask")):
        if path is None:
            continue
        try:
            with Image.open(path) as image:
                size = image.size
                problem = unsupported_image_mode(image)
                if problem:
                    add(ERROR, "image mode", path, problem)
                elif contents:
                    image.load()
                    if what == "mask":
                        _check_mask_values(image, path, sample.label, add)
        except Exception as exc:  # PIL raises several exception types for corrupt files
            add(ERROR, "unreadable", path, f"not a readable {what} ({type(exc).__name__}: {exc})")
            continue
        if shape is not None and size != (shape[1], shape[0]):
            add(ERROR, "size", path, f"{what} is {size[0]}x{size[1]} (WxH) but its point cloud {sample.xyz_path} "
                                     f"is {shape[1]}x{shape[0]}")
    return problems


def _check_mask_values(mask: Image.Image, path: Path, defective: int, add) -> None:
    """A mask of a defective part without a defect pixel, and any mask whose values are not only 0 and 255: a
    warning where the original M3DM's rule (the grey value above 127) reads some defect pixels as good, else a
    note (this project counts every non-zero pixel as a defect)."""
    defects = defect_pixels(mask, path)
    if defective and not defects.any():
        add(WARNING, "empty mask", path, "mask of a defective part has no defect pixel")
    values = np.asarray(mask)
    if mask.mode in ("1", "L") and np.isin(values, (0, 255)).all():
        return
    if values.ndim == 3 or mask.mode == "P":
        shown = f"colours (PIL mode {mask.mode})"
    else:
        unique = np.unique(values)
        shown = "values " + ", ".join(map(str, unique[:6].tolist())) + (", ..." if unique.size > 6 else "")
    message = f"mask holds {shown}, not only 0 and 255: every non-zero pixel counts as a defect"
    read_as_good = int((defects & (np.asarray(mask.convert("L")) <= 127)).sum())
    if read_as_good:
        add(WARNING, "mask values", path, f"{message}, {read_as_good} of which the original M3DM reads as good "
                                          f"(grey value up to 127)")
    else:
        add(NOTE, "mask values", path, message)


def _check_cloud(path: Path, contents: bool, add) -> tuple[int, ...] | None:
    """Check one organized cloud; returns its shape (None when unreadable)."""
    try:
        cloud, shape, dtype = read_tiff(path, header_only=not contents)
    except DataError as exc:
        add(ERROR, "unreadable", path, str(exc).removeprefix(f"{path}: "))
        return None
    if len(shape) != 3 or shape[2] != 3:
        add(ERROR, "shape", path, f"expected an organized point cloud of shape (H, W, 3), got {tuple(shape)}")
        return None
    if not np.issubdtype(dtype, np.floating):
        add(ERROR, "dtype", path, f"expected float32 coordinates, got dtype {dtype}")
        return shape
    if dtype != np.float32:
        add(WARNING, "dtype", path, f"coordinates are {dtype}, float32 expected (MVTec 3D-AD stores float32)")
    if cloud is not None:  # the values were read (contents)
        finite = np.asarray(np.isfinite(cloud).all(axis=2))
        if not finite.all():
            add(ERROR, "nonfinite", path, f"{int((~finite).sum())} pixels hold NaN or infinite coordinates")
        huge = huge_pixels(np.where(finite[..., None], cloud, 0))
        if huge:
            add(ERROR, "huge", path, f"{huge} {HUGE_COORDINATES}")
        valid = int(((cloud != 0).all(axis=2) & finite).sum())
        pixels = shape[0] * shape[1]
        if valid == 0:
            add(ERROR, "empty cloud", path, "the point cloud has no valid point (every pixel has a zero coordinate)")
        elif valid < SPARSE_FRACTION * pixels:
            add(WARNING, "sparse cloud", path, f"nearly empty point cloud: {valid} valid points of {pixels} pixels "
                                               f"({100 * valid / pixels:.2f} %)")
        _check_preprocessed(path, add, np.where(finite[..., None], cloud, 0))
    return shape


def _check_preprocessed(path: Path, add, cloud: np.ndarray | None = None) -> None:
    """A warning where the cloud (read from ``path`` unless given) looks like a raw MVTec 3D-AD scan."""
    if cloud is None:
        try:
            cloud = read_tiff(path)[0]
        except DataError:
            return  # the header checks report an unreadable file
    if cloud is None or cloud.ndim != 3 or cloud.shape[2] != 3:
        return  # the header checks report the shape
    problem = unpreprocessed_problem(cloud)
    if problem:
        add(WARNING, UNPREPROCESSED_KIND, path, f"{problem}; {PREPROCESS_HOW}")


def require_usable_dataset(root: str | Path, classes: list[str], fitting: bool = True) -> DatasetReport:
    """main.py's check before building the models: the header-only checks of the classes it will use; logs the
    warnings and raises one DataError listing every error."""
    report = check_dataset(root, classes, contents=False, fitting=fitting)
    report.raise_for_errors()
    return report
