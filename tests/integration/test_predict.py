"""``python -m m3dm.app.predict``: defects found and localised on new parts, outputs, raw inputs, bad inputs.

Data: a "fixtured" part, as on a production line: one synthetic MVTec-like scene (m3dm.data.synthetic) copied with
fresh sensor noise, plus 6 mm dents and bumps at random places on the part. With random backbone weights the
detector cannot cope with the free poses of m3dm.data.synthetic's datasets (measured: the map maximum lands in the
defect for under a third of the parts), but it does here: the model is Point_MAE (single bank) with the point
backbone in eval mode, fitted with ``main.py --save_model`` in the small test configuration (the tests that use it
are ``slow``).
"""

import csv
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import PROJECT_ROOT
from PIL import Image

import main as main_module
from m3dm.app import predict
from m3dm.app.run import ClassRun
from m3dm.data.io import write_png, write_tiff
from m3dm.data.synthetic import OBJECT, make_mvtec_scene, sample_rng
from m3dm.features.point_transformer import PointTransformer
from m3dm.preprocess.mvtec3d import preprocess_dataset

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "64", "--group_size", "32",
         "--random_init", "--device", "cpu", "--batch_size", "4"]
DEFECT_DEPTH = 0.006  # metres; geometric defects only (Point_MAE sees no colour)
DEFECTS = ("bump", "dent")


def noisy_copy(scene, rng, defect: str | None):
    """The scene with fresh sensor noise (z: 0.2 mm, RGB: 4 levels) and optionally a smooth 6 mm dent or bump
    of radius 4-6 px fully on the part; returns the raw cloud, RGB and GT mask (255 inside 0.8 x radius)."""
    cloud, rgb = scene.cloud.copy(), scene.rgb.astype(np.float64)
    valid = (cloud != 0).all(axis=2)
    cloud[..., 2] += np.where(valid, rng.normal(0, 0.0002, valid.shape), 0).astype(np.float32)
    rgb += rng.normal(0, 4, rgb.shape)
    gt = np.zeros(valid.shape, np.uint8)
    if defect is not None:
        rows, cols = np.indices(valid.shape)
        on_part = np.argwhere(scene.labels == OBJECT)
        while True:
            row, col = on_part[rng.integers(len(on_part))]
            radius = rng.uniform(4, 6)
            distance = np.hypot(rows - row, cols - col)
            if (scene.labels[distance < 1.5 * radius] == OBJECT).all():
                break
        weight = np.where(distance < radius, 0.5 * (1 + np.cos(np.pi * distance / radius)), 0.0)
        sign = 1 if defect == "dent" else -1  # z grows away from the camera
        cloud[..., 2] += np.where(valid, sign * DEFECT_DEPTH * weight, 0).astype(np.float32)
        gt = ((distance < 0.8 * radius) * 255).astype(np.uint8)
    return cloud, np.clip(np.rint(rgb), 0, 255).astype(np.uint8), gt


def write_fixtured_dataset(root: Path, n_train=8, n_val=6, n_good=6, n_defect=3, size=96) -> Path:
    scene = make_mvtec_scene(sample_rng(0, "fixtured"), size, size, "gadget", "good")
    rng = np.random.default_rng(1)
    plan = [("train", "good", n_train), ("validation", "good", n_val), ("test", "good", n_good)]
    plan += [("test", defect, n_defect) for defect in DEFECTS]
    for split, defect, count in plan:
        for i in range(count):
            cloud, rgb, gt = noisy_copy(scene, rng, None if defect == "good" else defect)
            folder = root / "gadget" / split / defect
            write_png(folder / "rgb" / f"{i:03d}.png", rgb)
            if defect != "good":
                write_png(folder / "gt" / f"{i:03d}.png", gt)
            write_tiff(folder / "xyz" / f"{i:03d}.tiff", cloud)
    return root


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return write_fixtured_dataset(tmp_path_factory.mktemp("predict") / "raw")


@pytest.fixture(scope="module")
def dataset(raw) -> Path:
    return preprocess_dataset(raw, workers=1).output


@pytest.fixture(scope="module")
def fitted(dataset, tmp_path_factory) -> dict:
    """Point_MAE fitted and saved; its in-process evaluation of the test split is kept for comparison."""
    out = tmp_path_factory.mktemp("fit")
    results = []
    evaluate = ClassRun.evaluate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClassRun, "evaluate", lambda self: results.append(evaluate(self)) or results[-1])
        argv = ["--dataset_path", str(dataset), "--output_dir", str(out), *SMALL, "--method_name", "Point_MAE",
                "--memory_bank", "single", "--backbone_eval", "--save_model"]
        assert main_module.main(argv) == 0
    return {"model": out / "models" / "gadget.pt", "result": results[0]}


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def gt_mask(path: Path) -> np.ndarray:
    """The ground truth at the 224 x 224 map size (nearest neighbour, as the dataset loader)."""
    return np.asarray(Image.open(path).convert("L").resize((224, 224), Image.NEAREST)) > 127


@pytest.fixture(scope="module")
def test_split_predictions(dataset, fitted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred")
    argv = ["--model", str(fitted["model"]), str(dataset / "gadget" / "test"), "--output", str(out),
            "--batch_size", "4", "--save_maps", "--quiet"]
    assert predict.main(argv) == 0
    return out


@pytest.mark.slow
def test_defects_fail_and_are_localised_good_parts_pass(dataset, test_split_predictions):
    rows = read_rows(test_split_predictions)
    assert len(rows) == 6 + 3 * len(DEFECTS)
    good = [r for r in rows if r["name"].split("/")[1] == "good"]
    defective = [r for r in rows if r["name"].split("/")[1] != "good"]
    inside = []
    for row in defective:
        _, defect, stem = row["name"].split("/")
        score_map = np.load(row["map"])
        assert score_map.shape == (224, 224) and score_map.dtype == np.float32
        peak = np.unravel_index(np.argmax(score_map), score_map.shape)
        inside.append(bool(gt_mask(dataset / "gadget" / "test" / defect / "gt" / f"{stem}.png")[peak]))
    # measured with this data: 6 / 6 maxima inside, 6 / 6 defects fail, 6 / 6 good parts pass
    assert sum(inside) >= 4
    assert sum(r["result"] == "fail" for r in defective) >= 4
    assert sum(r["result"] == "pass" for r in good) >= 4
    for row in rows:  # the verdict is the stored rule: fail iff score > image threshold
        assert (row["result"] == "fail") == (float(row["image_score"]) > float(row["image_threshold"]))
        assert 0 <= float(row["normalised_score"]) <= 1
        assert (row["result"] == "fail") == (float(row["normalised_score"]) > 0.5)


@pytest.mark.slow
def test_outputs_csv_jsonl_and_pictures(test_split_predictions):
    rows = read_rows(test_split_predictions)
    lines = [json.loads(line) for line in (test_split_predictions / "predictions.jsonl").read_text().splitlines()]
    assert [line["name"] for line in lines] == [row["name"] for row in rows]
    for row in rows:
        picture = Image.open(row["heatmap"])
        with_gt = row["name"].split("/")[1] != "good"
        assert picture.size == ((3 if with_gt else 2) * 224, 224 + 18)
        # outlined region pixels are pure white on the overlay panel; there are some iff pixels pass the threshold
        overlay = np.asarray(picture.convert("RGB"))[18:, 224:448]
        assert (overlay == 255).all(axis=2).any() == (int(row["anomalous_pixels"]) > 0)


@pytest.mark.slow
def test_the_batch_gets_a_report_with_every_part_and_the_threshold(test_split_predictions):
    import re

    rows = read_rows(test_split_predictions)
    page = (test_split_predictions / "report.html").read_text()
    cards = re.findall(r'<figure class="part[^"]*" data-name="([^"]+)" data-score="([^"]+)"', page)
    assert sorted(name for name, _ in cards) == sorted(r["name"] for r in rows)
    assert [float(score) for _, score in cards] == sorted((float(r["image_score"]) for r in rows), reverse=True)
    assert 'alt="Image score histogram"' in page and 'alt="ROC curve"' not in page  # no labels, no ROC
    assert f"image threshold {float(rows[0]['image_threshold']):.5g}" in page
    assert page.count('class="tag fail">FAIL') == sum(r["result"] == "fail" for r in rows)


@pytest.mark.slow
def test_predictions_equal_the_in_process_evaluation(fitted, test_split_predictions):
    rows = read_rows(test_split_predictions)
    expected = fitted["result"]
    assert [r["name"] for r in rows] == ["test/" + n.split("/", 2)[2] for n in expected.names]
    assert np.array_equal(np.array([float(r["image_score"]) for r in rows]), expected.image_scores)
    assert np.array_equal(np.stack([np.load(r["map"]) for r in rows]), expected.maps)


@pytest.mark.slow
def test_raw_inputs_with_preprocess_score_as_the_preprocessed_files(raw, dataset, fitted, tmp_path):
    stems = [("dent", "000"), ("good", "001")]
    results = {}
    for kind, root, extra in (("raw", raw, ["--preprocess"]), ("preprocessed", dataset, [])):
        pairs = [(root / "gadget" / "test" / d / "rgb" / f"{s}.png", root / "gadget" / "test" / d / "xyz" / f"{s}.tiff")
                 for d, s in stems]
        argv = ["--model", str(fitted["model"]), "--rgb", *[str(p[0]) for p in pairs], "--xyz",
                *[str(p[1]) for p in pairs], "--output", str(tmp_path / kind), "--save_maps", "--quiet", *extra]
        assert predict.main(argv) == 0
        results[kind] = read_rows(tmp_path / kind)
    assert [r["image_score"] for r in results["raw"]] == [r["image_score"] for r in results["preprocessed"]]
    for a, b in zip(results["raw"], results["preprocessed"]):
        assert np.array_equal(np.load(a["map"]), np.load(b["map"]))


@pytest.mark.slow
def test_bad_parts_are_reported_and_the_others_processed(dataset, fitted, tmp_path):
    folder = tmp_path / "incoming"
    source = dataset / "gadget" / "test" / "good"
    for stem in ("a_good", "b_corrupt", "c_empty", "d_no_cloud"):
        write_png(folder / "rgb" / f"{stem}.png", np.asarray(Image.open(source / "rgb" / "000.png")))
    cloud = tifffile.imread(source / "xyz" / "000.tiff")
    write_tiff(folder / "xyz" / "a_good.tiff", cloud)
    (folder / "xyz" / "b_corrupt.tiff").write_bytes(b"this is not a TIFF file")
    write_tiff(folder / "xyz" / "c_empty.tiff", np.zeros_like(cloud))
    run = subprocess.run([sys.executable, "-m", "m3dm.app.predict", "--model", str(fitted["model"]), str(folder),
                          "--output", str(tmp_path / "out"), "--quiet"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    rows = {r["name"].split("/")[-1]: r for r in read_rows(tmp_path / "out")}
    assert rows["a_good"]["result"] in ("pass", "fail") and Path(rows["a_good"]["heatmap"]).is_file()
    assert rows["b_corrupt"]["result"] == "error"
    assert "b_corrupt.tiff: not a readable TIFF" in rows["b_corrupt"]["error"]
    assert rows["c_empty"]["result"] == "error" and "no valid point" in rows["c_empty"]["error"]
    assert rows["d_no_cloud"]["result"] == "error" and "no matching point cloud" in rows["d_no_cloud"]["error"]
    for stem in ("b_corrupt", "c_empty", "d_no_cloud"):
        assert f"error: incoming/{stem}:" in run.stderr
    assert "4 parts: " in run.stderr and "3 errors" in run.stderr


@pytest.mark.slow
def test_cloud_empty_after_preprocessing_is_a_part_error(raw, fitted, tmp_path):
    """A raw scan of the bare background plane: preprocessing removes every point."""
    good = raw / "gadget" / "test" / "good"
    cloud = tifffile.imread(good / "xyz" / "000.tiff")
    rows, cols = np.indices(cloud.shape[:2])
    plane = np.stack([cols * 0.001, rows * 0.001, 0.65 + 0.02 * cols * 0.001], axis=-1).astype(np.float32)
    write_tiff(tmp_path / "plane.tiff", plane)
    argv = ["--model", str(fitted["model"]), "--preprocess", "--output", str(tmp_path / "out"), "--quiet",
            "--rgb", str(good / "rgb" / "000.png"), str(good / "rgb" / "000.png"),
            "--xyz", str(good / "xyz" / "000.tiff"), str(tmp_path / "plane.tiff")]
    assert predict.main(argv) == 1
    first, second = read_rows(tmp_path / "out")
    assert first["result"] in ("pass", "fail")
    assert second["result"] == "error" and "no valid point after preprocessing" in second["error"]


@pytest.mark.slow
def test_bad_model_file_is_fatal(fitted, dataset, tmp_path, capsys):
    data = fitted["model"].read_bytes()
    broken = tmp_path / "gadget.pt"
    broken.write_bytes(data[:1000])
    argv = ["--model", str(broken), str(dataset / "gadget" / "test"), "--output", str(tmp_path / "out")]
    assert predict.main(argv) == 2
    assert f"{broken}: not a readable m3dm model file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_other_weights_than_the_model_was_fitted_with_are_fatal(fitted, dataset, tmp_path, capsys):
    torch.manual_seed(5)
    state = PointTransformer("Point_MAE", num_group=64, group_size=32).state_dict()
    torch.save({"base_model": {f"MAE_encoder.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    argv = ["--model", str(fitted["model"]), str(dataset / "gadget" / "test"), "--output", str(tmp_path / "out"),
            "--xyz_checkpoint", str(tmp_path / "w.pth")]
    assert predict.main(argv) == 2
    assert "RANDOM weights (seed 0), this run uses weight file" in capsys.readouterr().err


@pytest.mark.slow
def test_threshold_overrides(dataset, fitted, tmp_path):
    from m3dm.detection.persistence import load_class_model

    good_scores = sorted(load_class_model(fitted["model"]).thresholds.good_image_scores)
    split = str(dataset / "gadget" / "test")
    common = ["--model", str(fitted["model"]), split, "--no_pictures", "--quiet"]
    assert predict.main([*common, "--output", str(tmp_path / "far"), "--far", "0.5"]) == 0
    # 6 good validation parts, far 0.5: the 3rd smallest of their scores
    assert {float(r["image_threshold"]) for r in read_rows(tmp_path / "far")} == {good_scores[2]}
    assert predict.main([*common, "--output", str(tmp_path / "high"), "--image_threshold", "1e9"]) == 0
    assert {r["result"] for r in read_rows(tmp_path / "high")} == {"pass"}


def test_the_command_starts(capsys):
    # m3dm.app.predict's own main, which `python -m m3dm.app.predict` runs, in this process
    with pytest.raises(SystemExit) as done:
        predict.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--model" in out and "--quiet" in out


@pytest.mark.slow  # a new process pays the import of torch, timm and the whole app: 9-12 s CPU
def test_the_shim_starts_in_a_new_process():
    run = subprocess.run([sys.executable, "-m", "m3dm.predict", "--help"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "--model" in run.stdout and "--quiet" in run.stdout


@pytest.mark.slow
def test_an_output_with_earlier_predictions_is_refused_unless_overwrite(dataset, fitted, tmp_path, capsys):
    split = dataset / "gadget" / "test"
    out = tmp_path / "out"
    common = ["--model", str(fitted["model"]), "--output", str(out), "--save_maps", "--quiet"]
    assert predict.main([*common, str(split / "dent")]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert "dent/000" in (out / "report.html").read_text()
    capsys.readouterr()
    assert predict.main([*common, str(split / "good")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --output {out} already holds predictions (predictions.csv, "
                                               f"predictions.jsonl, heatmaps, maps, report.html, report_files, "
                                               f"report_data): give "
                                               f"--overwrite to replace them, --resume to score only the parts they "
                                               f"lack, or another --output")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before  # nothing touched
    assert predict.main([*common, str(split / "good"), "--overwrite"]) == 0
    rows = read_rows(out)
    assert [r["name"] for r in rows] == [f"good/{p.stem}" for p in sorted((split / "good" / "rgb").iterdir())]
    # only the new parts' pictures and maps: none of the dent parts' stays behind
    assert sorted(p.relative_to(out / "heatmaps") for p in (out / "heatmaps").rglob("*.png")) == \
        sorted(Path(r["heatmap"]).relative_to(out / "heatmaps") for r in rows)
    assert sorted(p.parent.name for p in (out / "maps").rglob("*.npy")) == ["good"] * len(rows)
    assert "dent/000" not in (out / "report.html").read_text()  # the report is the new batch's alone


def test_a_main_results_folder_is_never_predicted_into(tmp_path, capsys):
    # main.py's --output_dir: results.json, classes/, models/. The refusal comes before the model is read, so the
    # model and the parts need not be real ones (no model is fitted for this test)
    results = tmp_path / "results"
    (results / "classes" / "gadget").mkdir(parents=True)
    (results / "results.json").write_text("{}\n")
    (results / "models").mkdir()
    (results / "models" / "gadget.pt").write_bytes(b"a model file")
    parts = tmp_path / "parts"
    parts.mkdir()
    before = {p: p.read_bytes() for p in sorted(results.rglob("*")) if p.is_file()}
    argv = ["--model", str(results / "models" / "gadget.pt"), "--output", str(results), "--quiet", "--overwrite",
            str(parts)]
    assert predict.main(argv) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: --output {results} is a main.py results folder "
                                                      f"(it holds results.json, classes)")
    assert {p: p.read_bytes() for p in sorted(results.rglob("*")) if p.is_file()} == before


def test_a_file_that_is_not_a_model_is_one_clear_line(tmp_path, capsys):
    text = tmp_path / "gadget.pt"
    text.write_text("not a model\n")
    out = tmp_path / "out"
    assert predict.main(["--model", str(text), str(tmp_path), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {text} is not an M3DM model file: it is not a torch archive "
                                               f"(main.py --save_model writes <output_dir>/models/<class>.pt)")
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module)  # a torch file, but with pickled objects: no weights_only advice
    assert predict.main(["--model", str(module), str(tmp_path), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {module} is not an M3DM model file: it holds Python objects "
                                               f"other than tensors and plain values (a checkpoint of another "
                                               f"program?)")
    assert not out.exists()


def linked_parts(split: Path, folder: Path, count: int) -> Path:
    """``folder/{rgb,xyz}`` with ``count`` parts: links to the split's samples in turn, under new names."""
    samples = sorted(split.glob("*/rgb/*.png"))
    for kind in ("rgb", "xyz"):
        (folder / kind).mkdir(parents=True)
    for i in range(count):
        rgb = samples[i % len(samples)]
        (folder / "rgb" / f"{i:04d}.png").symlink_to(rgb)
        (folder / "xyz" / f"{i:04d}.tiff").symlink_to(rgb.parent.parent / "xyz" / f"{rgb.stem}.tiff")
    return folder


def peak_traced_mb(argv: list[str]) -> float:
    """Peak of the memory Python and NumPy allocate (tracemalloc) while ``m3dm.predict`` runs in this process.

    Unlike the process's peak RSS, this is the same from run to run: it counts every array the command keeps
    (thumbnails, maps, rows) and nothing of the allocator's caching or of other tests' leftovers."""
    tracemalloc.start()
    try:
        assert predict.main(argv) == 0
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_parts(dataset, fitted, tmp_path, monkeypatch):
    # Each part's report thumbnails (RGB, depth, map, mask: ~110 KB) used to stay in memory until the report was
    # written: 800 more parts held 90 MB more. The backbones' scoring is replaced by a stand-in that returns a
    # random map, since what it allocates per batch does not depend on the parts before; the rest is the command
    # as it runs: reading the parts, the rows, the spooled thumbnails, the .npz and the report page. 50 and 250
    # parts: the kept thumbnails would add 20 MB or more; today's command adds 3.7-3.8 MB, and tracemalloc's peak
    # varies by under 0.1 MB from run to run (three runs of each count), so the bound separates the two widely.
    rng = np.random.default_rng(0)
    monkeypatch.setattr(predict.Predictor, "score", lambda self, loaded: [
        (float(rng.random()), rng.random((224, 224), dtype=np.float32)) for _ in loaded])
    common = ["--model", str(fitted["model"]), "--batch_size", "8", "--no_pictures", "-q"]
    split = dataset / "gadget" / "test"
    assert predict.main([*common, str(linked_parts(split, tmp_path / "in4", 4)), "--output", str(tmp_path / "4")]) == 0
    peaks = {}  # after a first run, so that no import of a module the command uses is counted
    for count in (50, 250):
        parts, out = linked_parts(split, tmp_path / f"in{count}", count), tmp_path / f"{count}"
        peaks[count] = peak_traced_mb([*common, str(parts), "--output", str(out)])
        assert len(read_rows(out)) == count
    assert peaks[250] - peaks[50] < 8, peaks  # MB
    report = (tmp_path / "250" / "report.html").read_text()
    assert report.count('<figure class="part') == 250
