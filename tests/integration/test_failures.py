"""What each command leaves behind when it fails: a full disk (a real, small tmpfs), Ctrl-C, a second run into the
same output folder, a model file killed while being written, and resuming each. Every failure happens in the real
command in a process of its own (the resumes and the runs that only read what a failure left run main() in this
process) and the test checks its exit status, its one-line message and that the inputs and the finished outputs
are unchanged (docs/security.md)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

import main as main_module
from m3dm.app.lock import LOCK_NAME
from m3dm.app.predict import main as predict_main
from m3dm.data.synthetic import write_mvtec3d
from m3dm.preprocess.mvtec3d import preprocess_dataset

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "32", "--group_size", "16",
         "--random_init", "--device", "cpu", "--method_name", "DINO+Point_MAE", "-q"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
FULL = "cannot write, the disk is full (no space left on device): free some space and run again"


@contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder``: a real file system that fills up (needs root on Linux)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small file system cannot be mounted here ({mounted.stderr.strip() or 'mount failed'}): the "
                    f"full-disk cases need root on Linux")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def command(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child, before Python starts: SIGINT at its default, as in a terminal. A test runner started as a
    background job of a non-interactive shell (``nohup ... &``) ignores SIGINT, and a Python started with SIGINT
    ignored never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted(argv: list[str], ready, timeout: int = 900) -> subprocess.CompletedProcess:
    """Start a command, press Ctrl-C (SIGINT to its whole process group, as a terminal does) once ``ready()``,
    and return how it ended."""
    process = subprocess.Popen([sys.executable, *argv], cwd=PROJECT_ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=_ctrl_c_as_in_a_terminal)
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"the command ended before it could be interrupted:\n{process.stderr.read()}"
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def last_line(err: str) -> str:
    """The one line a failure prints (a random-weight banner may come before it; no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("!!!")]
    return lines[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    raw = write_mvtec3d(tmp_path_factory.mktemp("failures") / "raw", classes=("gadget", "widget"), size=64,
                        n_train=2, n_val=1, n_test_good=1, n_test_defect=1, progress=False)
    return preprocess_dataset(raw, workers=1).output


# ------------------------------------------------------------------------------------------- a full disk

@pytest.mark.slow
def test_main_on_a_full_disk_keeps_the_finished_class_and_names_the_file(two_classes, tmp_path):
    before = snapshot(two_classes)
    with small_disk(tmp_path / "disk", "4m") as disk:  # one class's model (2.9 MB) fits, not the second
        out = disk / "out"
        run = command("main.py", "--dataset_path", str(two_classes), "--output_dir", str(out), *SMALL,
                      "--save_model")
        assert run.returncode == 2
        widget = out / "models" / "widget.pt"
        assert last_line(run.stderr) == f"main.py: error: {widget}: {FULL}"
        assert json.loads((out / "classes/gadget.json").read_text())["class"] == "gadget"  # kept
        assert (out / "models/gadget.pt").is_file()
        assert not widget.exists() and not list(out.rglob(".*.tmp*"))  # nothing half-written
        assert not (out / "results.json").exists() and not (out / LOCK_NAME).exists()
    assert snapshot(two_classes) == before


@pytest.mark.slow
def test_a_full_spool_dir_is_one_line_naming_it(two_classes, tmp_path):
    with small_disk(tmp_path / "spool", "64k") as spool:
        run = command("main.py", "--dataset_path", str(two_classes), "--output_dir", str(tmp_path / "out"), *SMALL,
                      "--classes", "gadget", "--spool_dir", str(spool))
        assert run.returncode == 2
        assert last_line(run.stderr) == f"main.py: error: {spool}: {FULL}"
        assert list(spool.iterdir()) == []  # the spool file is anonymous: nothing left


@pytest.mark.slow
def test_preprocessing_on_a_full_disk_stops_in_one_line_and_resumes(tmp_path):
    raw = write_mvtec3d(tmp_path / "raw", classes=("gadget",), size=64, n_train=3, n_val=1, n_test_good=1,
                        n_test_defect=1, progress=False)
    before = snapshot(raw)
    with small_disk(tmp_path / "disk", "120k") as disk:
        run = command("utils/preprocessing.py", str(raw), "--output_root", str(disk / "out"), "--workers", "1")
        assert run.returncode == 2
        line = last_line(run.stderr)
        assert line.startswith(f"error: {disk / 'out'}") and line.endswith(FULL), line
        assert "requested" not in run.stderr
        assert not list((disk / "out").rglob(".*.tmp*"))
    assert snapshot(raw) == before


# ------------------------------------------------------------------------------------------------ Ctrl-C

@pytest.mark.slow
def test_ctrl_c_in_main_is_one_line_and_resume_finishes(two_classes, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["main.py", "--dataset_path", str(two_classes), "--output_dir", str(out), *SMALL]
    run = interrupted(argv, lambda: (out / "classes/gadget.json").is_file())
    assert run.returncode == 130
    assert last_line(run.stderr) == (f"main.py: interrupted: the classes finished so far are kept in "
                                     f"{out / 'classes'}; run the same command with --resume to run the others")
    kept = (out / "classes/gadget.json").read_bytes()
    assert not (out / LOCK_NAME).exists()
    # the resumed and the refused runs in this process: what they do is main()'s, not the process's
    # output flags may differ on resume: only the settings that change a number must match
    assert main_module.main([*argv[1:], "--resume", "--save_maps", "--save_preds"]) == 0
    assert (out / "classes/gadget.json").read_bytes() == kept
    assert set(json.loads((out / "results.json").read_text())["per_class"]) == {"gadget", "widget"}
    capsys.readouterr()
    assert main_module.main([*argv[1:], "--resume", "--num_group", "64"]) == 2
    assert "--num_group 32 there, 64 now" in last_line(capsys.readouterr().err)


@pytest.mark.slow
def test_ctrl_c_in_preprocessing_is_one_line_and_running_it_again_completes_it(tmp_path):
    raw = write_mvtec3d(tmp_path / "raw", classes=("gadget",), size=64, n_train=6, n_val=2, n_test_good=2,
                        n_test_defect=2, progress=False)
    reference = preprocess_dataset(raw, output=tmp_path / "reference", workers=1).output
    out = tmp_path / "out"
    argv = ["utils/preprocessing.py", str(raw), "--output_root", str(out), "--workers", "2"]
    run = interrupted(argv, lambda: any(out.rglob("*.tiff")))
    assert run.returncode == 130
    assert last_line(run.stderr) == (f"preprocessing.py: interrupted: the samples written so far are kept in {out}; "
                                     f"run the same command again to resume")
    assert not list(out.rglob(".*.tmp*"))
    again = command(*argv)
    assert again.returncode == 0, again.stderr
    assert command(*argv).returncode == 0  # a third time: everything is done already, nothing changes
    assert snapshot(out) == snapshot(reference)


# ---------------------------------------------------------------------------------- one run per folder

@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused_and_a_dead_runs_lock_taken_over(two_classes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock = {"pid": holder.pid, "host": os.uname().nodename, "started": "2026-01-01 00:00:00",
                "command": "main.py --output_dir out"}
        (out / LOCK_NAME).write_text(json.dumps(lock))
        for argv in (["main.py", "--dataset_path", str(two_classes), "--output_dir", str(out), *SMALL],
                     ["-m", "m3dm.compare", "--methods", "DINO", "--dataset_path", str(two_classes),
                      "--output_dir", str(out), *SMALL[:-3]]):
            run = command(*argv)
            assert run.returncode == 2
            assert last_line(run.stderr).endswith(
                f"error: --output_dir {out} is in use by process {holder.pid} on {lock['host']} (started "
                f"2026-01-01 00:00:00: main.py --output_dir out): wait for it to end, or give another --output_dir")
        run = command("-m", "m3dm.predict", "--model", str(tmp_path / "none.pt"), "--output", str(out))
        assert run.returncode == 2 and f"--output {out} is in use by process {holder.pid}" in run.stderr
        assert json.loads((out / LOCK_NAME).read_text()) == lock  # the live run's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over (the run then stops at the missing model)
    run = command("-m", "m3dm.predict", "--model", str(tmp_path / "none.pt"), "--output", str(out))
    assert run.returncode == 2 and "in use" not in run.stderr and str(tmp_path / "none.pt") in run.stderr
    assert not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------ saved models

@pytest.fixture(scope="module")
def fitted(two_classes, tmp_path_factory) -> Path:
    """gadget fitted with --save_model (point backbone in eval mode: a part's score is its own)."""
    out = tmp_path_factory.mktemp("fitted")
    assert main_module.main(["--dataset_path", str(two_classes), "--output_dir", str(out), *SMALL, "--classes",
                             "gadget", "--backbone_eval", "--save_model"]) == 0
    return out / "models" / "gadget.pt"


@pytest.mark.slow
def test_a_model_killed_while_being_saved_leaves_no_model_and_load_model_says_so(two_classes, fitted, tmp_path,
                                                                                  capsys):
    models = tmp_path / "models"
    models.mkdir()
    # what SIGKILL during the save leaves: the temporary file next to the model, cut short; no model file. Read by
    # main() in this process (the kill is over; what the next run makes of its leftovers is main()'s)
    data = fitted.read_bytes()
    (models / ".gadget.pt.k1ll3d.tmp.pt").write_bytes(data[: len(data) // 2])
    assert main_module.main(["--dataset_path", str(two_classes), "--output_dir", str(tmp_path / "out"), *SMALL,
                             "--classes", "gadget", "--backbone_eval", "--load_model", str(models)]) == 2
    assert last_line(capsys.readouterr().err) == (
        f"main.py: error: --load_model {models}: no saved model for gadget (expected {models / 'gadget.pt'}; fit "
        f"with main.py --save_model)")


# ------------------------------------------------------------------------------------------ predictions

def rows(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def many_parts(tmp_path_factory) -> Path:
    raw = write_mvtec3d(tmp_path_factory.mktemp("parts") / "raw", classes=("gadget",), size=64, n_train=1, n_val=0,
                        n_test_good=12, n_test_defect=4, progress=False)
    return preprocess_dataset(raw, workers=1).output / "gadget" / "test"


@pytest.mark.slow
def test_ctrl_c_in_predict_keeps_the_rows_writes_the_report_and_resume_scores_the_rest(fitted, many_parts,
                                                                                        tmp_path):
    # the uninterrupted run and the resume in this process (what they do is predict's main(), not the process's)
    full = tmp_path / "full"
    assert predict_main(["--model", str(fitted), str(many_parts), "--output", str(full), "-q", "--batch_size",
                         "2"]) == 0
    out = tmp_path / "out"
    argv = ["-m", "m3dm.predict", "--model", str(fitted), str(many_parts), "--output", str(out), "-q",
            "--batch_size", "2"]

    def two_rows() -> bool:
        jsonl = out / "predictions.jsonl"
        return jsonl.is_file() and len(jsonl.read_text().splitlines()) >= 2

    run = interrupted(argv, two_rows)
    assert run.returncode == 130
    kept = rows(out)
    assert 2 <= len(kept) < len(rows(full))
    assert last_line(run.stderr) == (f"m3dm-predict: interrupted: {len(kept)} finished part(s) are kept in "
                                     f"{out / 'predictions.csv'}; run the same command with --resume to score the "
                                     f"others")
    report = (out / "report.html").read_text()  # the report of what finished
    assert all(row["name"] in report for row in kept)
    assert predict_main([*argv[2:], "--resume"]) == 0
    assert rows(out)[: len(kept)] == kept  # the finished rows are kept as they were
    assert [(r["name"], r["result"]) for r in rows(out)] == [(r["name"], r["result"]) for r in rows(full)]
    for ours, theirs in zip(rows(out), rows(full)):
        assert float(ours["image_score"]) == pytest.approx(float(theirs["image_score"]), rel=1e-5)
    assert all(row["name"] in (out / "report.html").read_text() for row in rows(full))


@pytest.mark.slow
def test_predict_on_a_full_disk_keeps_whole_rows_and_names_the_file(fitted, many_parts, tmp_path):
    before = snapshot(many_parts)
    with small_disk(tmp_path / "disk", "160k") as disk:
        out = disk / "out"
        run = command("-m", "m3dm.predict", "--model", str(fitted), str(many_parts), "--output", str(out), "-q")
        assert run.returncode == 2
        line = last_line(run.stderr)
        assert line.startswith(f"error: {out}/") and line.endswith(FULL), line
        kept = rows(out)  # the CSV ends with a whole row; the JSON lines hold the same parts
        assert len(kept) < 16
        assert [json.loads(x)["name"] for x in (out / "predictions.jsonl").read_text().splitlines()] == \
            [row["name"] for row in kept]
        assert not list(out.rglob(".*.tmp*"))
    assert snapshot(many_parts) == before


# --------------------------------------------------------------------------------------- torchrun processes

def process_of_rank(port: int, rank: int) -> int | None:
    """The pid of the process of ``rank`` in the torchrun launch on ``port`` (from the processes' environments)."""
    wanted = {f"RANK={rank}".encode(), f"MASTER_PORT={port}".encode()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environment = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environment and b"TORCHELASTIC_RUN_ID" in b" ".join(environment):
            return int(pid)
    return None


@pytest.mark.slow
def test_a_torchrun_process_killed_during_pretraining_stops_the_other_in_one_line(tmp_path):
    from test_pretrain import free_port, write_dumps

    dumps = write_dumps(tmp_path / "dumps", files=16)
    out, port = tmp_path / "out", free_port()
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={port}", "fusion_pretrain.py", "--data_path", str(dumps), "--output_dir", str(out),
         "--batch_size", "2", "--epochs", "100", "--device", "cpu", "--num_workers", "0"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoint-0.pth").is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        finished = (out / "checkpoint-0.pth").read_bytes()
        os.kill(process_of_rank(port, 1), signal.SIGKILL)
        _, err = process.communicate(timeout=120)  # no hang: process 0 stops too
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    ours = [line for line in err.splitlines() if "fusion_pretrain.py:" in line and "stopped" in line]
    assert [line.split("fusion_pretrain.py: ", 1)[1] for line in ours] == [
        f"process 0 stopped: another process of the launch ended (killed or failed); the checkpoints written so far "
        f"are kept in {out}; run the same command with --resume {out}/checkpoint-<epoch>.pth to go on"]
    assert "[rank0]" not in err  # no traceback of process 0 (torchrun reports the killed process on its own)
    assert (out / "checkpoint-0.pth").read_bytes() == finished
    assert not list(out.glob(".*.tmp*"))
