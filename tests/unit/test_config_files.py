"""Configuration files: ``main.py --print_config`` writes every setting as YAML that ``--config`` reads back, flags
override the file, and an unknown or mistyped key is refused in one line naming the file, the key and the closest
valid name."""

from __future__ import annotations

import pytest

from m3dm.app.cli import main, parse_settings
from m3dm.config import Settings, checked_settings, read_settings, read_settings_file, settings_yaml
from m3dm.errors import ConfigError


def test_print_config_writes_every_default_and_reads_back_as_the_defaults(tmp_path, capsys):
    assert main(["--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "f_coreset: 0.1\n" in printed and "method_name: DINO+Point_MAE+Fusion\n" in printed
    path = tmp_path / "run.yaml"
    path.write_text(printed)
    assert read_settings(path) == Settings()
    assert set(read_settings_file(path)) == set(Settings().flags())  # every setting is in it


def test_every_value_reads_back_as_written(tmp_path):
    settings = Settings().replace(run={"classes": ["bagel", "cable_gland"], "spool_dir": "/tmp/x"},
                                  detector={"lr": 1.5e-5, "n_hidden": "512,256", "random_state": 3},
                                  models={"load_model": ""})
    path = tmp_path / "config.yaml"
    path.write_text(settings_yaml(settings))
    assert read_settings(path) == settings


def test_flags_override_the_file_and_the_file_overrides_the_defaults(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("method_name: DINO\nmemory_bank: single\nf_coreset: 0.2\nseed: 3\n")
    settings, _ = parse_settings(["--config", str(path), "--f_coreset", "0.3"])
    assert (settings.detector.method_name, settings.detector.f_coreset, settings.run.seed) == ("DINO", 0.3, 3)
    assert settings.backbones == Settings().backbones
    assert main(["--config", str(path), "--seed", "5", "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "method_name: DINO\n" in printed and "seed: 5\n" in printed and "f_coreset: 0.2\n" in printed


@pytest.mark.parametrize(("text", "message"), [
    ("f_corset: 0.2\n", "unknown setting 'f_corset' (did you mean 'f_coreset'?)"),
    ("methodname: DINO\n", "unknown setting 'methodname' (did you mean 'method_name'?)"),
    ("zzz: 1\n", "unknown setting 'zzz' (main.py --print_config lists every setting)"),
    ("f_coreset: many\n", "f_coreset: 'many' is not a number"),
    ("seed: 1.5\n", "seed: 1.5 is not an integer"),
    ("random_init: 1\n", "random_init: 1 is not true or false"),
    ("method_name: DINO+PointMAE\n", "(did you mean 'DINO+Point_MAE'?)"),
    ("- seed\n", "expected 'setting: value' lines"),
    ("seed: [\n", "not valid YAML (line 2)"),
])
def test_a_wrong_key_or_value_is_refused_in_one_line_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"main.py: error: {path}: ") and message in err and err.count("\n") == 1, err


def test_a_missing_file_is_named(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert f"{tmp_path / 'none.yaml'}: cannot read the configuration file" in capsys.readouterr().err


def test_yaml_spellings_are_taken_for_what_they_mean():
    checked = checked_settings({"lr": "1e-4", "f_coreset": 1, "n_hidden": 512, "classes": "bagel",
                                "random_state": None}, "test")
    assert checked == {"lr": 1e-4, "f_coreset": 1.0, "n_hidden": "512", "classes": ["bagel"], "random_state": None}
    assert isinstance(checked["f_coreset"], float)
    with pytest.raises(ConfigError, match="classes: 3 is not a list of names"):
        checked_settings({"classes": 3}, "test")
