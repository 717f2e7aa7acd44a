"""Predict's parts say when they look raw without --preprocess, or preprocessed already with it."""

from __future__ import annotations

import shutil

import pytest
import tifffile

from m3dm.app import parts
from m3dm.app.parts import Part, load_part
from m3dm.data.io import BORDER_BAND
from m3dm.errors import DataError


def sample_part(root, name="000") -> Part:
    good = root / "gadget/train/good"
    return Part(name, good / f"rgb/{name}.png", good / f"xyz/{name}.tiff")


def test_a_raw_part_without_preprocess_is_said_to_look_unpreprocessed(raw_mvtec, caplog, monkeypatch):
    monkeypatch.setattr(parts, "_WARNED_FOLDERS", set())
    load_part(sample_part(raw_mvtec, "000"))
    load_part(sample_part(raw_mvtec, "001"))  # the same folder: said once
    said = [r.getMessage() for r in caplog.records if "looks unpreprocessed" in r.getMessage()]
    assert len(said) == 1 and "add --preprocess" in said[0] and "000.tiff" in said[0]


def test_preprocess_on_a_preprocessed_part_says_so(raw_mvtec, tmp_path, caplog):
    root = tmp_path / "copy"
    shutil.copytree(raw_mvtec / "gadget/train", root / "gadget/train")
    part = sample_part(root)
    cloud = tifffile.imread(part.xyz)
    cloud[:BORDER_BAND], cloud[-BORDER_BAND:], cloud[:, :BORDER_BAND], cloud[:, -BORDER_BAND:] = 0, 0, 0, 0
    tifffile.imwrite(part.xyz, cloud, photometric="rgb")
    with pytest.raises(DataError) as info:
        load_part(part, preprocess=True)
    assert str(info.value).startswith(f"{part.xyz}: cannot preprocess: only 0 valid points")
    assert str(info.value).endswith("(the part looks preprocessed already: nothing is left in its border, where the "
                                    "background plane was; run without --preprocess)")
    load_part(part)  # without --preprocess: read as it is, nothing said
    assert not any("unpreprocessed" in r.getMessage() for r in caplog.records)
