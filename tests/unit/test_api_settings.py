"""The Python API without fitting: ``import m3dm`` stays light, its names load on first use, and ``fit``'s settings
come from the defaults, a configuration file or a ``Settings`` object, then the method and the keywords; a
misspelt keyword is refused with the closest name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

import m3dm
from m3dm import api
from m3dm.config import Settings
from m3dm.errors import ConfigError, ModelFileError

HEAVY = ("torch", "open3d", "matplotlib", "sklearn", "timm", "scipy")


def test_import_m3dm_loads_no_heavy_library():
    code = ("import sys, m3dm; m3dm.Settings; m3dm.read_settings; "
            f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_public_names_load_on_first_use():
    assert (m3dm.fit, m3dm.load, m3dm.Model, m3dm.Prediction, m3dm.Evaluation) == \
        (api.fit, api.load, api.Model, api.Prediction, api.Evaluation)
    assert {"fit", "load", "Model", "Settings"} <= set(dir(m3dm))
    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        m3dm.fitt  # noqa: B018


def fit_settings(config=None, method=None, **values) -> Settings:
    return api.fit_settings(config, method, values, Path("data"), "bagel")


def test_the_method_brings_its_memory_bank_and_fit_keeps_thresholds():
    settings = fit_settings(method="DINO+Point_MAE", f_coreset=0.05, backbone_eval=True)
    assert (settings.detector.method_name, settings.detector.memory_bank) == ("DINO+Point_MAE", "multiple")
    assert (settings.detector.f_coreset, settings.backbones.backbone_eval) == (0.05, True)
    assert (settings.run.dataset_path, settings.run.classes, settings.models.save_model) == ("data", ["bagel"], True)
    assert fit_settings(method="BTF_FPFH").detector.memory_bank == "single"


def test_keywords_override_a_file_and_a_settings_object(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method_name: DINO\nmemory_bank: single\nf_coreset: 0.2\nseed: 4\n")
    from_file = fit_settings(str(path), f_coreset=0.3)
    assert (from_file.detector.method_name, from_file.detector.f_coreset, from_file.run.seed) == ("DINO", 0.3, 4)
    base = Settings().replace(detector={"method_name": "Point_MAE", "memory_bank": "single"}, run={"seed": 7})
    from_object = fit_settings(base, "DINO")
    assert (from_object.detector.method_name, from_object.run.seed) == ("DINO", 7)


@pytest.mark.parametrize(("values", "message"), [
    ({"method": "DINO", "f_corset": 0.1}, "m3dm.fit: unknown setting 'f_corset' (did you mean 'f_coreset'?)"),
    ({"method": "DINO+PointMAE"}, "(did you mean 'DINO+Point_MAE'?)"),
    ({"method": "DINO", "seed": "zero"}, "m3dm.fit: seed: 'zero' is not an integer"),
    ({}, "m3dm.fit: give the method"),
    ({"method": "DINO", "classes": ["bagel"]}, "m3dm.fit: classes: the data is fit's first argument"),
    ({"method": "DINO", "memory_bank": "multiple"}, "--memory_bank single"),  # main.py's validation
])
def test_wrong_settings_are_refused_before_anything_loads(values, message):
    with pytest.raises(ConfigError) as caught:
        fit_settings(**values)
    assert message in str(caught.value)


def test_a_class_folder_or_a_root_names_the_class(tmp_path):
    locate_class = api.locate_class
    for name in ("bagel", "tire"):
        (tmp_path / name / "train").mkdir(parents=True)
    assert locate_class(tmp_path / "bagel") == (tmp_path, "bagel")
    assert locate_class(tmp_path, "tire") == (tmp_path, "tire")
    assert locate_class(tmp_path, fallback="tire") == (tmp_path, "tire")
    with pytest.raises(ConfigError, match="give class_name= or a class folder \\(classes there: bagel, tire\\)"):
        locate_class(tmp_path)


def test_a_file_that_is_no_model_is_refused_naming_it(tmp_path):
    path = tmp_path / "gadget.pt"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match=r"gadget\.pt is not an M3DM model file"):
        m3dm.load(path)
