"""What ``main.py`` checks before fitting anything: the classes exist, their data is usable (m3dm.data.check),
every output folder can be written, and ``--load_model`` has a model for every class. Each problem names the flag
or the file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection
from pathlib import Path

from m3dm.config import Settings
from m3dm.data.check import require_usable_dataset
from m3dm.detection.persistence import MODELS_DIR, model_path
from m3dm.errors import ConfigError, ModelFileError


def check_before_fitting(settings: Settings, classes: list[str], finished: Collection[str] = ()) -> None:
    """Raise ConfigError (or DataError, ModelFileError) for the first problem a run would otherwise meet only
    after fitting the classes before it (``finished``: the classes ``--resume`` skips need no saved model)."""
    run = settings.run
    check_classes_exist(run.dataset_path, classes)
    # the data next (file headers, pairing, splits: every problem in one message), before any folder is made
    require_usable_dataset(run.dataset_path, classes, fitting=settings.models.load_model is None)
    check_writable_folder(run.output_dir, "--output_dir")
    if run.save_feature:
        check_writable_folder(run.save_feature_path, "--save_feature_path")
    if run.spool_folder is not None:
        check_writable_folder(run.spool_folder, "--spool_dir")
    check_saved_models(settings, [c for c in classes if c not in finished])


def check_saved_models(settings: Settings, classes: list[str]) -> None:
    """With ``--load_model``: a saved model for every class in ``classes`` (ModelFileError naming the missing)."""
    if settings.models.load_model is not None:
        folder = Path(settings.models.load_model or Path(settings.run.output_dir) / MODELS_DIR)
        missing = [c for c in classes if not model_path(folder, c).is_file()]
        if missing:
            raise ModelFileError(f"--load_model {folder}: no saved model for {', '.join(missing)} (expected "
                                 f"{model_path(folder, missing[0])}; fit with main.py --save_model)")


def check_classes_exist(root: str | Path, classes: list[str]) -> None:
    root = Path(root)
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []
        raise ConfigError(f"--classes: {', '.join(missing)} not found under {root} (classes there: "
                          f"{', '.join(present) or 'none'})")


def check_writable_folder(folder: str | Path, flag: str) -> None:
    """The folder exists or can be made, and a file can be written in it (tried: permissions, read-only file
    systems and quotas all count); the folder is left in place, empty of the trial file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file, not a folder: give a folder (it is made if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, trial = tempfile.mkstemp(prefix=".m3dm-write-check.", dir=folder)
        os.close(fd)
        os.unlink(trial)
    except OSError as exc:
        raise ConfigError(f"{flag} {folder}: cannot write there ({exc.strerror or exc}): choose a folder you can "
                          f"write") from exc
