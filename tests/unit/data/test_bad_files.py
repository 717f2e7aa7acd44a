"""Bad input files a user may have: a truncated PNG and a float64 cloud (read as the float32 cloud of the same
values); the preprocessing reports each bad sample in one line, also from its worker processes."""

import os
import shutil
import signal

import numpy as np
import pytest
import tifffile

from m3dm.data.dataset import AnomalyDataset
from m3dm.data.io import read_organized_pc, read_rgb
from m3dm.errors import DataError
from m3dm.preprocess.common import JobResult, one_line_error, run_jobs
from m3dm.preprocess.mvtec3d import preprocess_dataset


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_png_is_named(raw_mvtec, tmp_path):
    png = tmp_path / "part.png"
    shutil.copyfile(raw_mvtec / "gadget/train/good/rgb/000.png", png)
    truncate(png)
    with pytest.raises(DataError) as error:
        read_rgb(png)
    assert str(error.value) == f"{png}: not a readable image (OSError: image file is truncated)"


def test_a_float64_cloud_reads_as_the_float32_cloud_of_the_same_values(tmp_path):
    values = np.random.default_rng(0).uniform(-1, 1, (16, 16, 3))
    values[3, 4] = [0.5, 1e-50, 0.2]  # no float32 holds 1e-50: in a float32 file this point is not valid
    values[5, 6] = 0.0
    tifffile.imwrite(tmp_path / "f64.tiff", values, photometric="rgb")
    tifffile.imwrite(tmp_path / "f32.tiff", values.astype(np.float32), photometric="rgb")
    f64, f32 = read_organized_pc(tmp_path / "f64.tiff"), read_organized_pc(tmp_path / "f32.tiff")
    assert f64.dtype == f32.dtype == np.float32
    assert np.array_equal(f64, f32)
    valid = (f64 != 0).all(axis=2)
    assert not valid[3, 4] and not valid[5, 6] and valid.sum() == 16 * 16 - 2


def test_a_cloud_beyond_the_float32_range_is_refused(tmp_path):
    values = np.ones((4, 4, 3))
    values[1, 1, 0] = 1e300
    path = tmp_path / "huge.tiff"
    tifffile.imwrite(path, values, photometric="rgb")
    with pytest.raises(DataError) as error:
        read_organized_pc(path)
    assert str(error.value) == f"{path}: 1 pixels hold coordinates beyond the float32 range (about 3.4e38)"


def test_preprocessing_a_float64_tree_writes_the_float32_tree(raw_mvtec, tmp_path):
    """The same values as float64 and float32 files: the same valid points, the same preprocessed files
    (float32), the same tensors."""
    source64 = tmp_path / "raw64"
    shutil.copytree(raw_mvtec, source64)
    for path in source64.rglob("xyz/*.tiff"):
        tifffile.imwrite(path, tifffile.imread(path).astype(np.float64), photometric="rgb")
    out32 = preprocess_dataset(raw_mvtec, tmp_path / "out32", workers=1).output
    out64 = preprocess_dataset(source64, tmp_path / "out64", workers=1).output
    clouds = sorted(p.relative_to(out32) for p in out32.rglob("xyz/*.tiff"))
    assert clouds == sorted(p.relative_to(out64) for p in out64.rglob("xyz/*.tiff")) and clouds
    for relative in clouds:
        a, b = tifffile.imread(out32 / relative), tifffile.imread(out64 / relative)
        assert a.dtype == b.dtype == np.float32
        assert np.array_equal(a, b), relative
    for relative in sorted(p.relative_to(out32) for p in out32.rglob("rgb/*.png")):
        assert (out32 / relative).read_bytes() == (out64 / relative).read_bytes()
    item32, item64 = AnomalyDataset(out32, "gadget", "test")[0], AnomalyDataset(out64, "gadget", "test")[0]
    assert all(item32[k].equal(item64[k]) for k in ("rgb", "pc", "gt"))


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_preprocessing_reports_bad_samples_in_one_line_each(raw_mvtec, tmp_path, workers):
    source = tmp_path / "src"
    shutil.copytree(raw_mvtec, source)
    png, tiff = source / "gadget/train/good/rgb/001.png", source / "gadget/test/good/xyz/000.tiff"
    truncate(png)
    tiff.write_bytes(b"garbage")
    summary = preprocess_dataset(source, tmp_path / "out", workers=workers)
    assert sorted(summary.errors) == [
        f"gadget/test/good/000: {tiff}: not a readable TIFF file (TiffFileError: not a TIFF file: header=b'garb')",
        f"gadget/train/good/001: {png}: not a readable image (OSError: image file is truncated)",
    ]
    assert summary.processed == 9 - 2


def test_a_foreign_error_is_one_line():
    try:
        raise RuntimeError("first line\nsecond line")
    except RuntimeError as exc:
        assert one_line_error(exc) == "RuntimeError: first line"
    assert one_line_error(MemoryError()) == "MemoryError"
    assert one_line_error(DataError("a.tiff: bad\n  detail")) == "a.tiff: bad detail"


def _dies_on_b(job: str) -> JobResult:
    if job == "b":
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    return JobResult(job, valid_points=1)


@pytest.mark.slow
def test_a_preprocessing_worker_that_dies_fails_its_samples_instead_of_hanging():
    results = {r.name: r for r in run_jobs(["a", "b", "c", "d"], _dies_on_b, workers=2, desc="test")}
    assert set(results) == {"a", "b", "c", "d"}
    assert results["b"].error == ("a worker process died (killed, or out of memory?) before this sample was written; "
                                  "run again to resume")
    assert all(r.error is None or r.error == results["b"].error for r in results.values())


def test_an_output_root_that_cannot_be_written_is_one_line(raw_mvtec, tmp_path, capsys):
    from m3dm.app.preprocess import mvtec_main

    (tmp_path / "file").write_text("x")
    assert mvtec_main([str(raw_mvtec), "--output_root", str(tmp_path / "file" / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: [Errno 20] Not a directory: '{tmp_path / 'file' / 'out'}")
