"""Classes evaluated by two processes under torchrun give the single-process tables and per-sample results."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

import main as main_module
from m3dm.data.synthetic import write_mvtec3d
from m3dm.preprocess.mvtec3d import preprocess_dataset
from m3dm.report.data import REPORT_DATA_DIR, load_class_data

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "32", "--group_size", "16",
         "--random_init", "--device", "cpu", "--method_name", "DINO+Point_MAE"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    raw = write_mvtec3d(tmp_path_factory.mktemp("parallel") / "raw", classes=("gadget", "widget"), size=64,
                        n_train=3, n_val=0, n_test_good=2, n_test_defect=1, progress=False)
    return preprocess_dataset(raw, workers=1).output


@pytest.mark.slow
def test_two_processes_give_the_single_process_tables(two_classes, tmp_path):
    single = tmp_path / "single"
    assert main_module.main(["--dataset_path", str(two_classes), "--output_dir", str(single), *SMALL]) == 0
    parallel = tmp_path / "parallel"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={free_port()}", "main.py", "--dataset_path", str(two_classes),
                    "--output_dir", str(parallel), *SMALL], cwd=PROJECT_ROOT, env=env, check=True, timeout=600)
    expected = json.loads((single / "results.json").read_text())
    got = json.loads((parallel / "results.json").read_text())
    assert list(got["per_class"]) == ["gadget", "widget"]
    assert got["per_class"] == expected["per_class"]
    assert got["config"]["processes"] == 2
    for table in ("image_rocauc_results.md", "pixel_rocauc_results.md", "au_pro_results.md"):
        assert (parallel / table).read_text() == (single / table).read_text()
    # the per-sample rows travel with the gathered results: written once, in class order, as one process writes
    for name in ("per_sample.csv", "per_sample.json"):
        assert (parallel / name).read_text() == (single / name).read_text()
    classes = [row["class"] for row in json.loads((parallel / "per_sample.json").read_text())]
    assert classes == ["gadget"] * classes.count("gadget") + ["widget"] * classes.count("widget")
    assert classes.count("gadget") == classes.count("widget") == 2 + 4  # 2 good + 1 per defect type
    # each process writes the report data of its classes; process 0 builds the report from all of them
    for class_name in ("gadget", "widget"):
        mine, theirs = (load_class_data(f / REPORT_DATA_DIR / f"{class_name}.npz") for f in (parallel, single))
        assert mine.names == theirs.names and mine.scores.tolist() == theirs.scores.tolist()
    cards = re.findall(r'<figure class="part[^"]*" data-name="([^"]+)"', (parallel / "report.html").read_text())
    assert sorted(cards) == sorted("/".join((r["class"], r["split"], r["defect_type"], r["stem"]))
                                   for r in json.loads((parallel / "per_sample.json").read_text()))
