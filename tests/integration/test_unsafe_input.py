"""Input that must never run code or silently change a result, tried through the real commands (main.py,
fusion_pretrain.py, python -m m3dm.predict, python -m m3dm.data check) as subprocesses where the process matters
(no Open3D, worker processes, a whole run, what reaches stderr of a dataset check), the refusals made before any
fitting through the command's main() in this process: each is refused in one line that names the file or the flag
(exit status 2), or gives the correct result; inputs and finished outputs are left as they were."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import PROJECT_ROOT
from PIL import Image
from test_pretrain import write_dumps

import main as main_module
from m3dm.app.pretrain import main as pretrain_main
from m3dm.data.io import write_tiff
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


PROGRESS_BAR = re.compile(r"^[^:]*: +\d+%\|")  # tqdm's "<what>:  40%|████..."


def error_line(result: subprocess.CompletedProcess, prog: str) -> str:
    """The one error line of a refused command (exit status 2), without ``<prog>: error: ``; the random-weight
    banner and progress bars aside, nothing else is on stderr (no traceback, no warning of a library)."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines()
             if line and not line.startswith("!!!") and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0].removeprefix(f"{prog}: error: ")


def main_error_line(status: int, capsys, prog: str = "main.py") -> str:
    """The one error line of ``prog``'s ``main()`` run in this process (exit status 2), as ``error_line``."""
    captured = capsys.readouterr()
    return error_line(subprocess.CompletedProcess([prog], status, captured.out, captured.err), prog)


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


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--rgb_checkpoint", "--xyz_checkpoint", "--fusion_module_path"])
def test_main_refuses_a_checkpoint_that_would_run_code(dataset, tmp_path, flag, capsys):
    path, target = crafted_checkpoint(tmp_path, {"model": {}, "base_model": {}})
    fusion = ["--method_name", "DINO+Point_MAE+Fusion", "--use_uff"] if flag == "--fusion_module_path" else []
    output = tmp_path / "out"
    status = main_module.main(["--dataset_path", str(dataset), "--output_dir", str(output), *SMALL, *fusion, flag,
                               str(path)])
    kind = "UFF checkpoint" if flag == "--fusion_module_path" else "checkpoint"
    assert main_error_line(status, capsys) == REFUSED.format(kind=kind, path=path, system=SYSTEM)
    assert not target.exists()
    assert not any(output.rglob("*.json"))  # nothing fitted, no result written


@pytest.mark.slow
def test_fusion_pretrain_refuses_to_resume_from_a_checkpoint_that_would_run_code(tmp_path, capsys):
    dumps = write_dumps(tmp_path / "dumps", files=2, rows=16)
    before = {p: p.read_bytes() for p in dumps.iterdir()}
    path, target = crafted_checkpoint(tmp_path, {"model": {}, "epoch": 0})
    output = tmp_path / "out"
    status = pretrain_main(["--data_path", str(dumps), "--output_dir", str(output), "--device", "cpu",
                            "--batch_size", "2", "--num_workers", "0", "--resume", str(path), "-q"])
    assert main_error_line(status, capsys, "fusion_pretrain.py") == REFUSED.format(kind="--resume", path=path,
                                                                                    system=SYSTEM)
    assert not target.exists()
    assert not any(output.glob("checkpoint-*.pth"))
    assert {p: p.read_bytes() for p in dumps.iterdir()} == before


def project_python_files() -> list[Path]:
    """The project's .py files; the virtual environment (thousands of folders where it is a real folder), git's
    folder and the datasets are not walked at all."""
    files = []
    for folder, subfolders, names in os.walk(PROJECT_ROOT):
        subfolders[:] = [name for name in subfolders if name not in {".venv", ".git", "datasets"}]
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(files)


def test_no_code_of_the_project_unpickles_arbitrary_objects():
    """No torch.load with weights_only set to False, no NumPy load that allows pickles, no plain unpickling; every
    torch.load call asks for the weights-only loader."""
    unsafe = ("weights_only=" + "False", "allow_pickle=" + "True", "pickle." + "load(", "pickle." + "loads(")
    offending = []
    files = project_python_files()
    for path in files:
        source = path.read_text()
        offending += [f"{path}: {text}" for text in unsafe if text in source.replace(" ", "")]
        if "torch" not in source or "load" not in source:  # no call `torch.load` without both names: not parsed
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offending.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    assert len(files) > 100
    assert offending == []


# ------------------------------------------------------------------------- images, masks, clouds, classes


def cut_short(path: Path) -> None:
    """A cloud whose image directory lies past the file's end, as in an MVTec 3D-AD file cut short (the dataset
    stores the directory after the data): tifffile finds no image in it."""
    data = bytearray(path.read_bytes())
    assert data[:2] == b"II"  # little-endian TIFF: the first directory's offset is bytes 4..8
    data[4:8] = (len(data) + 4096).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # a process of the command: its imports alone cost seconds
def test_main_names_a_cut_short_cloud_in_one_line_before_fitting(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    cloud = data / "gadget/train/good/xyz/001.tiff"
    cut_short(cloud)
    output = tmp_path / "out"
    result = run("main.py", "--dataset_path", str(data), "--output_dir", str(output), *SMALL)
    assert result.returncode == 2
    # the dataset check's error: its count, then the file; no stray line of tifffile's on stderr
    assert [line for line in result.stderr.splitlines() if not line.startswith("!!!")] == [
        f"main.py: error: {data}: 1 problem(s) in the dataset (python -m m3dm.data check {data} also reads every "
        f"value):",
        f"  {cloud}: not a readable TIFF file (truncated? no image found: invalid offset to first page "
        f"{cloud.stat().st_size + 4096})"]
    assert not output.exists()


def test_the_dataset_check_reports_images_masks_and_clouds_by_file(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    test = data / "gadget/test"
    defects = sorted(p.name for p in test.iterdir() if p.name != "good")
    masks = {name: test / name / "gt/000.png" for name in defects}
    grey = np.asarray(Image.open(masks[defects[0]]))
    Image.fromarray((grey > 0).astype(np.uint8)).save(masks[defects[0]])  # 0/1
    Image.fromarray(np.stack([grey, 0 * grey, 0 * grey], axis=2)).save(masks[defects[1]])  # red on black
    sixteen = test / "good/rgb/000.png"
    with Image.open(sixteen) as image:
        Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257).save(sixteen)  # 16-bit grey
    float_image = test / defects[2] / "rgb/000.png"
    Image.fromarray(np.zeros((64, 64), np.float32), "F").save(float_image, format="TIFF")
    cloud = test / defects[3] / "xyz/000.tiff"
    cut_short(cloud)
    before = snapshot(data)
    result = run("-m", "m3dm.data", "check", str(data), "-q")
    assert result.returncode == 1 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert f"  ERROR {float_image}: 32-bit float pixels (PIL mode F) are not supported: save it as an 8- or " \
           f"16-bit PNG (grey, RGB or RGBA)" in lines
    assert f"  ERROR {cloud}: not a readable TIFF file (truncated? no image found: invalid offset to first page " \
           f"{cloud.stat().st_size + 4096})" in lines
    read_as_good = int((grey > 0).sum())
    assert f"  WARNING {masks[defects[0]]}: mask holds values 0, 1, not only 0 and 255: every non-zero pixel " \
           f"counts as a defect, {read_as_good} of which the original M3DM reads as good (grey value up to " \
           f"127)" in lines
    assert f"  WARNING {masks[defects[1]]}: mask holds colours (PIL mode RGB), not only 0 and 255: every " \
           f"non-zero pixel counts as a defect, {read_as_good} of which the original M3DM reads as good (grey " \
           f"value up to 127)" in lines
    assert not any(str(sixteen) in line for line in lines)  # a 16-bit image is read, nothing to report
    assert snapshot(data) == before


@pytest.mark.slow
def test_class_names_with_a_path_separator_are_refused_before_anything_is_made(dataset, tmp_path, capsys):
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_status:  # the usage message, then the line
        main_module.main(["--dataset_path", str(dataset), "--output_dir", str(output), *SMALL, "--classes",
                          "gadget/test"])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "main.py: error: --classes 'gadget/test' is not a class: give the name of a class folder under the dataset "
        "root (no '/', '\\', '.' or '..')")
    assert not output.exists()
    # a completed folder name's slash is dropped: gadget/ is the class gadget (the missing one is named alone)
    status = main_module.main(["--dataset_path", str(dataset), "--output_dir", str(output), *SMALL, "--classes",
                               "gadget/", "nope/"])
    assert main_error_line(status, capsys) == f"--classes: nope not found under {dataset} (classes there: gadget)"
    assert not output.exists()


@pytest.mark.slow
def test_sixteen_bit_images_masks_of_any_encoding_and_a_completed_class_name_give_the_same_results(dataset,
                                                                                                   tmp_path, capsys):
    """One test image as 8-bit grey, the masks 0/255 (A) against the same image as 16-bit grey, the masks 0/1
    or coloured, ``--classes gadget/``, 512 workers, a batch of 100000 and no Open3D (B): the same results, the
    model in models/gadget.pt; m3dm.predict runs B's model without Open3D too. A's model is then refused for
    another method and for another class."""
    runs, no_open3d = {}, without_open3d(tmp_path)
    for variant in ("A", "B"):
        data = tmp_path / f"data{variant}"
        shutil.copytree(dataset, data)
        test = data / "gadget/test"
        rgb = test / "good/rgb/000.png"
        with Image.open(rgb) as image:
            grey = np.asarray(image.convert("L"))
        Image.fromarray(grey if variant == "A" else grey.astype(np.uint16) * 257).save(rgb)
        if variant == "B":
            for i, mask in enumerate(sorted(test.glob("*/gt/*.png"))):
                values = np.asarray(Image.open(mask))
                binary = (values > 0).astype(np.uint8)
                Image.fromarray(binary if i % 2 else np.stack([binary * 200, 0 * binary, 0 * binary], 2)).save(mask)
        before = snapshot(data)
        output = tmp_path / f"out{variant}"
        extra = [] if variant == "A" else ["--classes", "gadget/", "--num_workers", "512", "--batch_size", "100000"]
        result = run("main.py", "--dataset_path", str(data), "--output_dir", str(output), *SMALL, "--save_model",
                     *extra, env=None if variant == "A" else no_open3d)
        assert result.returncode == 0, result.stderr[-3000:]
        assert snapshot(data) == before
        assert sorted(p.name for p in (output / "models").iterdir()) == ["gadget.pt"]
        runs[variant] = output
    for name in ("per_sample.json", "image_rocauc_results.md", "pixel_rocauc_results.md", "au_pro_results.md"):
        same_paths = (runs["B"] / name).read_text().replace(str(tmp_path / "dataB"), str(tmp_path / "dataA"))
        assert same_paths == (runs["A"] / name).read_text(), name
    metrics = json.loads((runs["B"] / "results.json").read_text())["per_class"]["gadget"]
    assert all(np.isfinite(value) for value in metrics.values())

    predictions = tmp_path / "predictions"  # m3dm.predict needs no Open3D either (M3DM's features)
    result = run("-m", "m3dm.predict", "--model", str(runs["B"] / "models/gadget.pt"),
                 str(tmp_path / "dataB/gadget/test"), "--output", str(predictions), "--device", "cpu", env=no_open3d)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((predictions / "predictions.csv").read_text().splitlines()) == 1 + len(list(
        (tmp_path / "dataB/gadget/test").glob("*/rgb/*.png")))

    # the two refusals come before any model is fitted: main.py's main() in this process (the other tests of this
    # module run the command as a process), which spares two starts of Python, torch and timm
    capsys.readouterr()
    model = runs["A"] / "models/gadget.pt"
    status = main_module.main(["--dataset_path", str(tmp_path / "dataA"), "--output_dir", str(tmp_path / "other"),
                               *SMALL, "--method_name", "DINO", "--memory_bank", "single", "--load_model",
                               str(model.parent)])
    assert main_error_line(status, capsys) == f"{model}: holds a DINO+Point_MAE model, but DINO was asked for"
    widget = tmp_path / "widget_data"
    (widget / "widget").parent.mkdir()
    shutil.copytree(tmp_path / "dataA/gadget", widget / "widget")
    (tmp_path / "widget_models").mkdir()
    shutil.copyfile(model, tmp_path / "widget_models/widget.pt")
    status = main_module.main(["--dataset_path", str(widget), "--output_dir", str(tmp_path / "other"), *SMALL,
                               "--load_model", str(tmp_path / "widget_models")])
    assert main_error_line(status, capsys) == (f"{tmp_path / 'widget_models/widget.pt'}: holds a model of class "
                                               f"'gadget', not 'widget'")
    assert not (tmp_path / "other" / "results.json").exists()


# ------------------------------------------------------------------------------------------ without Open3D


def without_open3d(folder: Path) -> dict:
    """The environment of a Python in which ``import open3d`` fails, as where it is not installed."""
    shim = folder / "no_open3d"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['open3d'] = None  # import open3d fails\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(shim), str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}


NO_OPEN3D = "cannot run: Open3D is not installed here (pip install open3d; the other methods on a preprocessed " \
            "dataset, m3dm.predict and the report run without it)"


@pytest.mark.slow  # a process of the command: its imports alone cost seconds
def test_without_open3d_the_steps_that_need_it_say_so_in_one_line(dataset, raw_mvtec, tmp_path):
    env = without_open3d(tmp_path)
    probe = run("-c", "import open3d", env=env)
    assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr
    output = tmp_path / "out"
    result = run("main.py", "--dataset_path", str(dataset), "--output_dir", str(output), *SMALL, "--method_name",
                 "BTF_FPFH", "--memory_bank", "single", env=env)
    assert error_line(result, "main.py") == f"BTF's FPFH features {NO_OPEN3D}"
    assert not any(output.rglob("*.json"))
    before = snapshot(raw_mvtec)
    converted = tmp_path / "converted"
    # the MVTec 3D-AD preprocessing fits its plane without Open3D (m3dm's RANSAC, Open3D's plane: test_plane.py)
    result = run("utils/preprocessing.py", str(raw_mvtec), "--output_root", str(converted), env=env)
    assert result.returncode == 0 and "open3d is not installed" in result.stderr
    assert any(converted.rglob("*.tiff")) and snapshot(raw_mvtec) == before
    check = run("-m", "m3dm.data", "check", str(dataset), "-q", env=env)  # the dataset check needs no Open3D
    assert check.returncode == 0 and check.stdout.splitlines()[-1] == "the dataset can be used"


# ------------------------------------------------------------------- clouds, feature dumps, workers, models


def pretrain(dumps: Path, output: Path, *flags: str) -> subprocess.CompletedProcess:
    return run("fusion_pretrain.py", "--data_path", str(dumps), "--output_dir", str(output), "--device", "cpu",
               "--batch_size", "2", "--epochs", "1", "-q", *flags)


@pytest.mark.slow  # a process of the command: its imports alone cost seconds
@pytest.mark.parametrize("workers", ["0", "2"])
def test_fusion_pretrain_names_a_dump_with_nan_features_in_one_line(tmp_path, workers):
    dumps = write_dumps(tmp_path / "dumps", files=4, rows=16)
    bad = dumps / "gadget2.pt"
    features = torch.load(bad, weights_only=True)
    features[3, 5] = float("nan")
    torch.save(features, bad)
    before = snapshot(dumps)
    output = tmp_path / "out"
    result = pretrain(dumps, output, "--num_workers", workers)
    assert error_line(result, "fusion_pretrain.py") == (f"{bad}: 1 of its 16 patches hold NaN or infinite features "
                                                        f"(write the dumps again with main.py --save_feature)")
    assert not any(output.glob("checkpoint-*.pth")) and snapshot(dumps) == before


@pytest.mark.slow
def test_fusion_pretrain_refuses_dumps_of_mixed_widths_naming_the_file(tmp_path, capsys):
    dumps = write_dumps(tmp_path / "dumps", files=2, rows=16)
    torch.save(torch.randn(16, 1152 + 32), dumps / "widget.pt")  # another backbone's RGB width
    status = pretrain_main(["--data_path", str(dumps), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
                            "--batch_size", "2", "--epochs", "1", "-q", "--num_workers", "0"])
    first = sorted(dumps.iterdir())[0]
    assert main_error_line(status, capsys, "fusion_pretrain.py") == (
        f"{dumps / 'widget.pt'}: shape (16, 1184) differs from (16, {1152 + 48}) of {first} (mixed backbones or "
        f"layouts in '{dumps}'?)")


def test_the_dataset_check_names_clouds_with_nan_huge_values_no_point_or_another_size(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    clouds = sorted((data / "gadget/test").glob("*/xyz/000.tiff"))
    edits = {"nan": lambda c: c.__setitem__((1, 1, 0), np.nan), "inf": lambda c: c.__setitem__((2, 2, 1), np.inf),
             "huge": lambda c: c.__setitem__((3, 3, 2), 1e30), "zeros": lambda c: c.__setitem__(Ellipsis, 0.0)}
    for cloud_path, edit in zip(clouds, edits.values(), strict=False):
        cloud = tifffile.imread(cloud_path)
        edit(cloud)
        write_tiff(cloud_path, cloud)
    smaller, its_cloud = data / "gadget/train/good/rgb/000.png", data / "gadget/train/good/xyz/000.tiff"
    height, width = tifffile.imread(its_cloud).shape[:2]
    with Image.open(smaller) as image:
        image.resize((32, 32)).save(smaller)
    before = snapshot(data)
    result = run("-m", "m3dm.data", "check", str(data), "-q")
    assert result.returncode == 1 and result.stderr == ""
    lines = result.stdout.splitlines()
    expected = [f"  ERROR {clouds[0]}: 1 pixels hold NaN or infinite coordinates",
                f"  ERROR {clouds[1]}: 1 pixels hold NaN or infinite coordinates",
                f"  ERROR {clouds[2]}: 1 pixels hold coordinates beyond ±1e+18, whose squared distances overflow "
                f"float32 (MVTec 3D-AD's are in metres)",
                f"  ERROR {clouds[3]}: the point cloud has no valid point (every pixel has a zero coordinate)",
                f"  ERROR {smaller}: RGB image is 32x32 (WxH) but its point cloud {its_cloud} is {width}x{height}"]
    assert [line for line in expected if line not in lines] == []
    assert snapshot(data) == before
