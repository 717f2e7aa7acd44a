"""The files besides the samples (calibration, readme) are copied, also from symlinked class folders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from m3dm.preprocess.common import copy_other_files

pytestmark = pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")


def class_folder(root: Path, with_other_files: bool = True) -> set[Path]:
    """A class folder's layout: one sample's two files, and (optionally) calibration/ and readme.txt; returns
    the sample files."""
    samples = {root / "train/good/rgb/000.png", root / "train/good/xyz/000.tiff"}
    others = [root / "calibration/camera_parameters.json", root / "readme.txt"] if with_other_files else []
    for path in [*samples, *others]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(path.name)
    return samples


def test_a_symlinked_class_folder_has_its_other_files_copied(tmp_path, caplog):
    stored, source, output = tmp_path / "stored", tmp_path / "dataset", tmp_path / "out"
    source.mkdir()
    class_folder(stored / "cable_gland")
    os.symlink(stored / "cable_gland", source / "cable_gland", target_is_directory=True)
    sample_files = {source / "cable_gland" / path.relative_to(stored / "cable_gland")
                    for path in class_folder(stored / "cable_gland")}
    os.symlink(source, stored / "cable_gland" / "calibration" / "loop", target_is_directory=True)  # a cycle
    with caplog.at_level(logging.WARNING):
        assert copy_other_files(source, output, sample_files) == 2
    assert (output / "cable_gland/calibration/camera_parameters.json").read_text() == "camera_parameters.json"
    assert (output / "cable_gland/readme.txt").is_file()
    assert not (output / "cable_gland/train").exists()  # samples are the converter's to write
    assert "no file besides the samples" not in caplog.text
    assert copy_other_files(source, output, sample_files) == 0  # already there: kept


def test_a_class_without_other_files_is_named_in_a_warning(tmp_path, caplog):
    source = tmp_path / "dataset"
    sample_files = class_folder(source / "gadget", with_other_files=False) | class_folder(source / "widget")
    with caplog.at_level(logging.WARNING):
        assert copy_other_files(source, tmp_path / "out", sample_files) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{source / 'gadget'}: no file besides the samples to copy (calibration/, readme.txt): "
                        f"the output class has only the samples"]


def test_the_loop_guard_lists_each_real_folder_once(tmp_path):
    source = tmp_path / "dataset"
    sample_files = class_folder(source / "gadget")
    os.symlink(source / "gadget", source / "gadget" / "again", target_is_directory=True)
    assert copy_other_files(source, tmp_path / "out", sample_files) == 2
    assert not (tmp_path / "out/gadget/again").exists()
