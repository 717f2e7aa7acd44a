"""docs/api.md's examples run: its Python blocks, in order and in one namespace, from a folder laid out as the page
assumes (``datasets/mvtec3d/bagel``, ``part.png``/``part.tiff``, ``run.yaml`` from its YAML block), on a small
synthetic class with the tiny test configuration in place of the full backbones. ``slow``: they fit models."""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import PROJECT_ROOT, preprocessed_mvtec

from m3dm import api
from m3dm.config import Settings, settings_with, settings_yaml

DOC = PROJECT_ROOT / "docs" / "api.md"
# the test configuration: a tiny ViT, small point groups, random weights (no checkpoint needed)
SMALL = {"rgb_backbone_name": "vit_tiny_patch16_224", "num_group": 32, "group_size": 16, "random_init": True,
         "device": "cpu"}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def small_lines() -> str:
    """The test configuration as lines of a configuration file."""
    small = settings_with(Settings(), SMALL)
    return "".join(line + "\n" for line in settings_yaml(small).splitlines() if line.split(":")[0] in SMALL)


@pytest.mark.slow
def test_the_python_examples_of_docs_api_run(tmp_path, monkeypatch):
    data = preprocessed_mvtec(tmp_path / "data", n_train=3, n_val=1, n_test_good=1, n_test_defect=1)
    work = tmp_path / "work"
    shutil.copytree(data / "gadget", work / "datasets" / "mvtec3d" / "bagel")
    good = work / "datasets" / "mvtec3d" / "bagel" / "test" / "good"
    shutil.copy(sorted((good / "rgb").glob("*.png"))[0], work / "part.png")
    shutil.copy(sorted((good / "xyz").glob("*.tiff"))[0], work / "part.tiff")
    (run_yaml,) = code_blocks("yaml")
    (work / "run.yaml").write_text(run_yaml + small_lines())
    monkeypatch.setattr(api, "DEFAULTS", settings_with(Settings(), SMALL))
    monkeypatch.chdir(work)
    python = code_blocks("python")
    assert len(python) >= 4
    namespace: dict = {}
    for code in python:
        exec(compile(code, str(DOC), "exec"), namespace)
    assert (work / "models" / "bagel.pt").is_file()
    assert namespace["evaluation"].metrics["image_rocauc"] >= 0.0


def test_the_configuration_file_of_docs_api_is_valid(tmp_path):
    from m3dm.config import read_settings

    (run_yaml,) = code_blocks("yaml")
    path = tmp_path / "run.yaml"
    path.write_text(run_yaml)
    read_settings(path).validate()
