"""Bad input found before any fitting (classes, output folders), results kept class by class with --resume, and
one-line errors from data-loading worker processes (no traceback, no temporary folder left behind)."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

import main as main_module
from m3dm.app.cli import build_parser
from m3dm.data.synthetic import write_mvtec3d
from m3dm.errors import ModelFileError
from m3dm.preprocess.mvtec3d import preprocess_dataset

TRUNCATED = re.compile(r"not a readable TIFF file \(ValueError: failed to read \d+ bytes, got \d+\)")


def truncate(path: Path) -> None:
    """Cut a cloud's file to half: a valid TIFF header, too little data (found only when the cloud is read)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "32", "--group_size", "16",
         "--random_init", "--device", "cpu", "--method_name", "DINO+Point_MAE", "-q"]


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    raw = write_mvtec3d(tmp_path_factory.mktemp("bad_input") / "raw", classes=("gadget", "widget"), size=64,
                        n_train=2, n_val=0, n_test_good=1, n_test_defect=1, progress=False)
    return preprocess_dataset(raw, workers=1).output


def main_error(capsys, *argv: str) -> str:
    """Run main.py in this process; it must fail with exit status 2 and one error line, returned without the
    program name that starts it."""
    assert main_module.main(list(argv)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("!!!")]
    assert len(err) == 1, err  # the random-weight banner aside, one line
    prog, _, message = err[0].partition(": error: ")
    assert prog.endswith(".py") and message
    return message


def test_an_output_dir_that_is_a_file_is_refused_before_fitting(two_classes, tmp_path, capsys):
    output = tmp_path / "results"
    output.write_text("the user's file")
    line = main_error(capsys, "--dataset_path", str(two_classes), "--output_dir", str(output), *SMALL)
    assert line == (f"--output_dir {output} is a file, not a folder: give a folder (it is made if "
                    f"missing)")
    assert output.read_text() == "the user's file"


def test_an_output_root_under_a_file_is_refused(two_classes, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    output = tmp_path / "file" / "results"
    line = main_error(capsys, "--dataset_path", str(two_classes), "--output_dir", str(output), *SMALL)
    assert line == (f"--output_dir {output}: cannot write there (Not a directory): choose a "
                    f"folder you can write")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_an_output_root_the_user_cannot_write_is_refused(two_classes, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    output = locked / "results"
    try:
        line = main_error(capsys, "--dataset_path", str(two_classes), "--output_dir", str(output), *SMALL)
    finally:
        locked.chmod(0o700)
    assert line == (f"--output_dir {output}: cannot write there (Permission denied): choose a "
                    f"folder you can write")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's sysfs, which no one can write")
def test_an_output_root_no_one_can_write_is_refused_even_for_root(two_classes, capsys):
    output = Path("/sys/m3dm-results")  # sysfs: mkdir fails for root too (the test above is skipped as root)
    line = main_error(capsys, "--dataset_path", str(two_classes), "--output_dir", str(output), *SMALL)
    assert re.fullmatch(rf"--output_dir {output}: cannot write there \((Operation not permitted|Permission denied)\): "
                        r"choose a folder you can write", line), line


def test_a_missing_class_is_found_before_the_first_class_is_fitted(two_classes, tmp_path, capsys):
    output = tmp_path / "out"
    line = main_error(capsys, "--dataset_path", str(two_classes), "--output_dir", str(output), *SMALL,
                      "--classes", "gadget", "nope", "neither")
    assert line == (f"--classes: nope, neither not found under {two_classes} (classes there: "
                    f"gadget, widget)")
    assert not output.exists()  # found before anything was made or fitted


def test_load_model_without_a_model_for_every_class_is_refused_up_front(two_classes, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "gadget.pt").write_bytes(b"")
    line = main_error(capsys, "--dataset_path", str(two_classes), "--output_dir", str(tmp_path / "out"), *SMALL,
                      "--load_model", str(models))
    assert line == (f"--load_model {models}: no saved model for widget (expected "
                    f"{models / 'widget.pt'}; fit with main.py --save_model)")


def test_a_class_resume_skips_needs_no_saved_model(two_classes, tmp_path):
    from m3dm.app.outputs import check_before_fitting
    from m3dm.config import settings_from_flags

    models = tmp_path / "models"
    models.mkdir()
    (models / "gadget.pt").write_bytes(b"")
    settings = settings_from_flags(build_parser().parse_args(
        ["--dataset_path", str(two_classes), "--output_dir", str(tmp_path / "out"), *SMALL, "--load_model",
         str(models), "--resume"]))
    check_before_fitting(settings, ["gadget", "widget"], finished={"widget"})  # widget is finished: no model needed
    with pytest.raises(ModelFileError, match="no saved model for widget"):
        check_before_fitting(settings, ["gadget", "widget"])


def test_load_model_with_a_text_file_as_model_is_one_clear_line(two_classes, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("gadget", "widget"):
        (models / f"{name}.pt").write_text("not a model\n")
    line = main_error(capsys, "--dataset_path", str(two_classes), "--output_dir", str(tmp_path / "out"), *SMALL,
                      "--load_model", str(models))
    assert line == (f"{models / 'gadget.pt'} is not an M3DM model file: it is not a torch archive (main.py "
                    f"--save_model writes <output_dir>/models/<class>.pt)")


@pytest.mark.slow
def test_an_interrupted_run_keeps_its_finished_classes_and_resume_completes_it(two_classes, tmp_path, capsys,
                                                                              caplog):
    data = tmp_path / "data"
    shutil.copytree(two_classes, data)
    full = tmp_path / "full"  # the uninterrupted run
    assert main_module.main(["--dataset_path", str(data), "--output_dir", str(full), *SMALL]) == 0
    cloud = data / "widget/test/good/xyz/000.tiff"
    truncate(cloud)  # its header is sound, so the check before fitting passes: it fails when widget reads it
    output = tmp_path / "out"
    args = ["--dataset_path", str(data), "--output_dir", str(output), *SMALL]
    line = main_error(capsys, *args)
    assert TRUNCATED.fullmatch(line.removeprefix(f"{cloud}: ")), line
    # gadget finished before widget failed: its metrics and per-sample rows are on disk
    kept = json.loads((output / "classes/gadget.json").read_text())
    expected = json.loads((full / "results.json").read_text())["per_class"]
    assert kept["metrics"] == expected["gadget"]
    assert kept["samples"] == [r for r in json.loads((full / "per_sample.json").read_text()) if r["class"] == "gadget"]
    assert sorted(p.name for p in output.iterdir()) == ["classes", "config.yaml", "report_data"]  # + gadget report data
    assert sorted(p.name for p in (output / "report_data").iterdir()) == ["gadget.npz"]

    shutil.copyfile(two_classes / "widget/test/good/xyz/000.tiff", cloud)
    caplog.set_level("INFO", logger="m3dm")
    assert main_module.main([*args, "--resume"]) == 0
    assert f"--resume: 1 finished class(es) in {output / 'classes'} skipped: gadget" in caplog.messages
    assert "Class: gadget" not in capsys.readouterr().out  # not run again
    assert json.loads((output / "results.json").read_text())["per_class"] == expected
    for name in ("per_sample.csv", "per_sample.json", "image_rocauc_results.md", "au_pro_results.md"):
        assert (output / name).read_text() == (full / name).read_text()
    assert "gadget" in (output / "report.html").read_text()  # the skipped class is in the report too
    # the time per stage counts the skipped class as it was measured when it ran
    per_class = [json.loads((output / f"classes/{c}.json").read_text())["timings_s"] for c in ("gadget", "widget")]
    total = json.loads((output / "results.json").read_text())["timings_s"]
    assert per_class[0] and set(total) == set(per_class[0]) | set(per_class[1])
    for stage, seconds in total.items():
        assert seconds == pytest.approx(sum(t.get(stage, 0.0) for t in per_class))

    line = main_error(capsys, *args, "--resume", "--num_group", "64")
    assert line == (f"--resume: {output / 'classes/gadget.json'} was written with other settings "
                    f"(--num_group 32 there, 64 now): resume with the same flags, or give another --output_dir")


@pytest.mark.slow
def test_a_bad_sample_read_by_a_worker_process_is_one_line_and_leaves_no_temporary_folder(two_classes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(two_classes, data)
    cloud = data / "gadget/train/good/xyz/001.tiff"
    truncate(cloud)  # past the check before fitting (headers only): read by a worker
    errors = {}
    for workers in (0, 1):
        # a short temporary folder: the worker processes' sockets live there (check_socket_folder)
        tmp = Path(tempfile.mkdtemp(prefix=f"m3dm{workers}-", dir="/tmp"))
        result = subprocess.run([sys.executable, "main.py", "--dataset_path", str(data), "--output_dir",
                                 str(tmp_path / "out"), *SMALL, "--classes", "gadget", "--num_workers", str(workers)],
                                cwd=PROJECT_ROOT, env=dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1"),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 2
        errors[workers] = result.stderr
        leftovers = [p.name for p in tmp.iterdir() if p.name.startswith("pymp-")]
        shutil.rmtree(tmp)
        assert leftovers == []
    assert errors[1] == errors[0]  # the same stderr as without workers: the banner, then one line
    last = errors[1].rstrip().splitlines()[-1]
    assert TRUNCATED.fullmatch(last.removeprefix(f"main.py: error: {cloud}: ")), last
    assert "Traceback" not in errors[1]


@pytest.mark.slow
def test_worker_processes_give_the_results_of_the_main_process(two_classes, tmp_path):
    """The error-forwarding loader of --num_workers >= 1 changes nothing for good data: same results, same maps."""
    outputs = {}
    for workers in (0, 1):
        out = tmp_path / f"workers{workers}"
        assert main_module.main(["--dataset_path", str(two_classes), "--output_dir", str(out), *SMALL, "--classes",
                                 "gadget", "--num_workers", str(workers), "--save_maps"]) == 0
        outputs[workers] = out
    for name in ("per_sample.json", "image_rocauc_results.md", "au_pro_results.md"):
        assert (outputs[1] / name).read_text() == (outputs[0] / name).read_text()
    assert (outputs[1] / "maps/gadget.npz").read_bytes() == (outputs[0] / "maps/gadget.npz").read_bytes()
