"""One run per output folder (``m3dm.app.lock``) and what ``--resume`` compares (``m3dm.app.class_results``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from m3dm.app.class_results import compared_settings
from m3dm.app.lock import LOCK_NAME, output_lock
from m3dm.app.predict import CSV_FIELDS, finished_rows
from m3dm.config import Settings
from m3dm.errors import OutputInUseError


def test_the_lock_names_this_process_and_is_removed_after(tmp_path):
    with output_lock(tmp_path / "out", "--output_dir"):
        record = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["command"]
        with pytest.raises(OutputInUseError, match=f"--output_dir {tmp_path / 'out'} is in use by process "
                                                   f"{os.getpid()} "), output_lock(tmp_path / "out", "--output_dir"):
            pass
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_a_lock_of_a_process_that_ended_is_taken_over(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(ended.stdout), "host": os.uname().nodename}))
    with output_lock(tmp_path, "--output"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_lock_is_released_after_an_error_or_ctrl_c(tmp_path):
    for error in (ValueError, KeyboardInterrupt):
        with pytest.raises(error), output_lock(tmp_path, "--output"):
            raise error()
        assert not (tmp_path / LOCK_NAME).exists()


def test_resume_compares_the_settings_that_change_numbers_not_the_output_flags():
    base = Settings()
    outputs = base.replace(run={"save_maps": True, "save_preds": True, "save_feature": True, "num_workers": 2,
                                "output_dir": "elsewhere", "bank_storage": "memory"},
                           models={"save_model": True})
    assert compared_settings(outputs) == compared_settings(base)
    for changed in ({"backbones": {"num_group": 64}}, {"detector": {"f_coreset": 0.2}}, {"run": {"seed": 1}},
                    {"run": {"dataset_path": "other"}}, {"run": {"batch_size": 4}}):
        assert compared_settings(base.replace(**changed)) != compared_settings(base), changed


def test_predict_resume_refuses_a_table_with_other_columns(tmp_path):
    # an earlier version's predictions.csv (no normalised_score column): rows appended to it would not line up
    thresholds = SimpleNamespace(image=1.5)
    (tmp_path / "predictions.jsonl").write_text(json.dumps({"name": "a", "result": "pass", "image_threshold": "1.5"})
                                                + "\n")
    old = [f for f in CSV_FIELDS if f != "normalised_score"]
    (tmp_path / "predictions.csv").write_text(",".join(old) + "\n")
    with pytest.raises(ValueError, match="has the columns of another version of m3dm-predict"):
        finished_rows(tmp_path, thresholds)
    (tmp_path / "predictions.csv").write_text(",".join(CSV_FIELDS) + "\n")
    assert [row["name"] for row in finished_rows(tmp_path, thresholds)] == ["a"]
