"""``--demo`` runs the method and memory bank asked for (the demo's data are not needed to choose them)."""

from __future__ import annotations

import pytest

from m3dm.app.demo import demo_detector
from m3dm.config import build_parser, settings_from_flags
from m3dm.errors import ConfigError


def demo_settings(*flags: str):
    settings = settings_from_flags(build_parser().parse_args(["--demo", *flags]))
    return settings.replace(detector=demo_detector(settings.detector, settings.uff.use_uff))


@pytest.mark.parametrize("flags, method, memory_bank", [
    ((), "DINO+Point_MAE", "multiple"),
    (("--method_name", "BTF_FPFH"), "BTF_FPFH", "single"),
    (("--method_name", "DINO+Point_MAE+add"), "DINO+Point_MAE+add", "single"),
    (("--method_name", "Point_MAE", "--memory_bank", "single"), "Point_MAE", "single"),
    (("--method_name", "G2SF"), "G2SF", "multiple"),
    (("--method_name", "CFM"), "CFM", "multiple"),
])
def test_demo_runs_the_method_asked_for(flags, method, memory_bank):
    settings = demo_settings(*flags)
    settings.validate()
    assert (settings.detector.method_name, settings.detector.memory_bank) == (method, memory_bank)


def test_demo_refuses_a_memory_bank_its_method_cannot_use():
    settings = demo_settings("--method_name", "DINO+Point_MAE", "--memory_bank", "single")
    assert settings.detector.memory_bank == "single"
    with pytest.raises(ConfigError, match="--memory_bank multiple"):
        settings.validate()
