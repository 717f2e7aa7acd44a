"""Input that must never run code or silently change a result, tried through the real commands (main.py,
fusion_pretrain.py, python -m m3dm.predict, python -m m3dm.data check) as subprocesses: each is refused in one
line that names the file or the flag (exit status 2), or gives the correct result; inputs and finished outputs
are left as they were."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT
from test_pretrain import write_dumps

from m3dm.data.synthetic import write_mvtec3d
from m3dm.preprocess.mvtec3d import preprocess_dataset

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "32", "--group_size", "16",
         "--random_init", "--device", "cpu", "--method_name", "DINO+Point_MAE", "-q"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    raw = write_mvtec3d(tmp_path_factory.mktemp("unsafe_input") / "raw", classes=("gadget",), size=64, n_train=2,
                        n_val=0, n_test_good=1, n_test_defect=1, progress=False)
    return preprocess_dataset(raw, workers=1).output


def run(*argv: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """A command of the project (``main.py ...``, ``-m m3dm.predict ...``) run from the repository root."""
    return subprocess.run([sys.executable, *argv], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def error_line(result: subprocess.CompletedProcess, prog: str) -> str:
    """The one error line of a refused command (exit status 2), without ``<prog>: error: ``; the random-weight
    banner aside, nothing else is on stderr (no traceback, no warning of a library)."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith("!!!")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0].removeprefix(f"{prog}: error: ")


# ----------------------------------------------------------------------------------- code in a checkpoint


class RunsCode:
    """Unpickling it creates the file ``target``: what a crafted checkpoint could do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def crafted_checkpoint(folder: Path, layout: dict) -> tuple[Path, Path]:
    """A checkpoint in an official layout that also pickles ``RunsCode``; returns it and the file its code would
    create."""
    target = folder / "code-ran"
    path = folder / "crafted.pth"
    torch.save({**layout, "args": RunsCode(target)}, path)
    return path, target


REFUSED = "{kind} file {path} is refused: it pickles {system}, which is not a tensor or a plain value and could " \
          "run code when loaded"
SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux and macOS


@pytest.mark.parametrize("flag", ["--rgb_checkpoint", "--xyz_checkpoint", "--fusion_module_path"])
def test_main_refuses_a_checkpoint_that_would_run_code(dataset, tmp_path, flag):
    path, target = crafted_checkpoint(tmp_path, {"model": {}, "base_model": {}})
    fusion = ["--method_name", "DINO+Point_MAE+Fusion", "--use_uff"] if flag == "--fusion_module_path" else []
    output = tmp_path / "out"
    result = run("main.py", "--dataset_path", str(dataset), "--output_dir", str(output), *SMALL, *fusion, flag,
                 str(path))
    kind = "UFF checkpoint" if flag == "--fusion_module_path" else "checkpoint"
    assert error_line(result, "main.py") == REFUSED.format(kind=kind, path=path, system=SYSTEM)
    assert not target.exists()
    assert not any(output.rglob("*.json"))  # nothing fitted, no result written


def test_fusion_pretrain_refuses_to_resume_from_a_checkpoint_that_would_run_code(tmp_path):
    dumps = write_dumps(tmp_path / "dumps", files=2, rows=16)
    before = {p: p.read_bytes() for p in dumps.iterdir()}
    path, target = crafted_checkpoint(tmp_path, {"model": {}, "epoch": 0})
    output = tmp_path / "out"
    result = run("fusion_pretrain.py", "--data_path", str(dumps), "--output_dir", str(output), "--device", "cpu",
                 "--batch_size", "2", "--num_workers", "0", "--resume", str(path), "-q")
    assert error_line(result, "fusion_pretrain.py") == REFUSED.format(kind="--resume", path=path, system=SYSTEM)
    assert not target.exists()
    assert not any(output.glob("checkpoint-*.pth"))
    assert {p: p.read_bytes() for p in dumps.iterdir()} == before


def project_python_files() -> list[Path]:
    return [p for p in PROJECT_ROOT.rglob("*.py") if not {".venv", ".git", "datasets"} & set(p.parts)]


def test_no_code_of_the_project_unpickles_arbitrary_objects():
    """No torch.load with weights_only set to False, no NumPy load that allows pickles, no plain unpickling; every
    torch.load call asks for the weights-only loader."""
    unsafe = ("weights_only=" + "False", "allow_pickle=" + "True", "pickle." + "load(", "pickle." + "loads(")
    offending = []
    for path in project_python_files():
        source = path.read_text()
        offending += [f"{path}: {text}" for text in unsafe if text in source.replace(" ", "")]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offending.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    assert len(project_python_files()) > 100
    assert offending == []
