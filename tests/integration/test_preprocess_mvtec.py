import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import PROJECT_ROOT
from PIL import Image

from m3dm.app.preprocess import mvtec_main
from m3dm.data.synthetic import MISSING, NOISE, OBJECT, PLANE, make_mvtec_scene, sample_rng, write_mvtec3d
from m3dm.errors import DataError
from m3dm.preprocess.mvtec3d import pad_to_square, preprocess_arrays, preprocess_dataset


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def unpad(array, height, width):
    side = array.shape[0]
    top, left = (side - height) // 2, (side - width) // 2
    return array[top:top + height, left:left + width]


@pytest.mark.parametrize("seed, height, width, defect", [
    (0, 128, 128, "good"), (1, 120, 150, "dent"), (2, 160, 160, "combined"), (3, 100, 100, "bump")])
def test_background_and_noise_removed_object_kept(seed, height, width, defect):
    scene = make_mvtec_scene(sample_rng(seed, "scene"), height, width, "gadget", defect)
    cloud, rgb, gt, _ = preprocess_arrays(scene.cloud, scene.rgb, scene.gt, seed=0)
    side = max(-(-height // 100), -(-width // 100)) * 100
    assert cloud.shape == (side, side, 3) and rgb.shape == (side, side, 3) and gt.shape == (side, side)
    kept = (unpad(cloud, height, width) != 0).all(-1)
    labels = scene.labels
    assert kept[labels == PLANE].mean() <= 0.01
    assert not kept[labels == NOISE].any() and (labels == NOISE).any()
    assert kept[labels == OBJECT].mean() >= 0.99
    assert not kept[labels == MISSING].any()
    np.testing.assert_array_equal(unpad(gt, height, width), scene.gt)  # GT padded, not cleaned
    removed = ~kept & (labels != MISSING)
    assert (unpad(rgb, height, width)[removed] == 0).all()  # removed points blacked out in RGB too
    np.testing.assert_array_equal(unpad(rgb, height, width)[kept], scene.rgb[kept])


def test_padding_rule():
    padded = pad_to_square(np.ones((120, 150), np.uint8))
    assert padded.shape == (200, 200)
    rows, cols = np.nonzero(padded)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (40, 159, 25, 174)
    assert pad_to_square(np.ones((800, 800, 3))).shape == (800, 800, 3)  # already a multiple: unchanged


def test_tree_copy_source_untouched_and_resume(raw_mvtec, tmp_path):
    before = tree_digest(raw_mvtec)
    out = tmp_path / "out"
    # one process: the worker pool gives the same files (tests/integration/test_failures.py, slow), and starting
    # its processes (each imports NumPy, SciPy and Open3D) would be most of this test's time
    summary = preprocess_dataset(raw_mvtec, out, workers=1)
    assert tree_digest(raw_mvtec) == before
    assert summary.processed == 9 and not summary.errors and not summary.empty
    assert set(tree_digest(out)) == set(before)  # a complete copy: every file has its counterpart
    again = preprocess_dataset(raw_mvtec, out, workers=1)
    assert again.processed == 0 and again.skipped == 9
    # deterministic: a second, independent run gives byte-identical files
    assert tree_digest(preprocess_dataset(raw_mvtec, tmp_path / "out2", workers=1).output) == tree_digest(out)


def test_default_output_is_sibling(raw_mvtec, tmp_path):
    source = tmp_path / "mvtec3d"
    shutil.copytree(raw_mvtec, source)
    summary = preprocess_dataset(source, workers=1)
    assert summary.output == tmp_path / "mvtec3d_preprocessed" and summary.output.is_dir()


@pytest.mark.slow  # two processes of utils/preprocessing.py, one of them killed midway
def test_killed_run_resumes_to_identical_output(tmp_path):
    source = write_mvtec3d(tmp_path / "src", classes=("gadget",), size=200, n_train=12, n_val=0,
                           n_test_good=0, n_test_defect=0, progress=False)
    script = [sys.executable, str(PROJECT_ROOT / "utils/preprocessing.py"), str(source), "--workers", "1",
              "--output_root"]
    killed_out = tmp_path / "killed"
    process = subprocess.Popen(script + [str(killed_out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(killed_out.rglob("*.tiff"))) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.kill()
    process.wait()
    partial = len(list(killed_out.rglob("*.tiff")))
    assert 0 < partial < 12, "the run should have been killed midway"
    subprocess.run(script + [str(killed_out)], check=True, capture_output=True)
    full = preprocess_dataset(source, tmp_path / "full", workers=1)
    assert tree_digest(killed_out) == tree_digest(full.output)


def test_bad_sample_reported_others_written(raw_mvtec, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(raw_mvtec, source)
    (source / "gadget/train/good/xyz/001.tiff").write_bytes(b"garbage")
    summary = preprocess_dataset(source, tmp_path / "out", workers=1)
    assert len(summary.errors) == 1 and "gadget/train/good/001" in summary.errors[0]
    assert "not a readable TIFF" in summary.errors[0]
    assert summary.processed == 8
    # the command (utils/preprocessing.py runs this main; the script itself runs as a process in the slow tests)
    capsys.readouterr()
    assert mvtec_main([str(source), "--output_root", str(tmp_path / "out"), "--workers", "1"]) == 1
    assert "001" in capsys.readouterr().out


def test_refuses_bad_roots_and_unpaired_files_before_writing(raw_mvtec, tmp_path):
    with pytest.raises(ValueError, match="inside the source"):
        preprocess_dataset(raw_mvtec, raw_mvtec / "gadget" / "out")
    with pytest.raises(ValueError, match="--inplace"):
        preprocess_dataset(raw_mvtec, raw_mvtec)
    source = tmp_path / "src"
    shutil.copytree(raw_mvtec, source)
    (source / "gadget/test/dent/rgb/000.png").unlink()
    with pytest.raises(DataError, match="dent"):
        preprocess_dataset(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (source / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        preprocess_dataset(source, tmp_path / "out")


def test_empty_cloud_reported(raw_mvtec, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(raw_mvtec, source)
    path = source / "gadget/train/good/xyz/002.tiff"
    cloud = tifffile.imread(path)
    rows = np.mgrid[0:96, 0:96][0]
    cloud[..., 2] = 0.65 + 0.001 * rows / 96  # only background plane left
    tifffile.imwrite(path, cloud, photometric="rgb")
    summary = preprocess_dataset(source, tmp_path / "out", workers=1)
    assert summary.empty == ["gadget/train/good/002"] and "EMPTY" in summary.report()


def test_inplace_and_its_resume(raw_mvtec, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(raw_mvtec, source)
    reference = preprocess_dataset(raw_mvtec, tmp_path / "ref", workers=1).output
    first = preprocess_dataset(source, inplace=True, workers=1)
    assert first.processed == 9
    second = preprocess_dataset(source, inplace=True, workers=1)
    assert second.skipped == 9 and second.processed == 0
    digest = tree_digest(source)
    digest.pop(".m3dm_preprocess_done")
    assert digest == tree_digest(reference)


def test_real_samples(real_mvtec_subset, tmp_path):
    source = tmp_path / "real"
    for split in ("train/good", "test/cut"):
        shutil.copytree(real_mvtec_subset / "cable_gland" / split, source / "cable_gland" / split,
                        ignore=shutil.ignore_patterns("001.*", "002.*"))
    summary = preprocess_dataset(source, tmp_path / "out", workers=1)
    assert summary.processed == 2 and not summary.errors and not summary.empty
    raw = tifffile.imread(source / "cable_gland/test/cut/xyz/000.tiff")
    out = tifffile.imread(tmp_path / "out/cable_gland/test/cut/xyz/000.tiff")
    assert out.shape == raw.shape and out.dtype == np.float32
    kept = (out != 0).all(-1)
    assert 0.05 < kept.mean() < (raw != 0).all(-1).mean()  # plane removed, the gland kept
    np.testing.assert_array_equal(out[kept], raw[kept])  # kept points are not moved
    gt_in = np.array(Image.open(source / "cable_gland/test/cut/gt/000.png"))
    gt_out = np.array(Image.open(tmp_path / "out/cable_gland/test/cut/gt/000.png"))
    np.testing.assert_array_equal(gt_in, gt_out)
    assert kept[gt_out > 0].mean() > 0.5  # the defect lies on the kept object
