"""Depth-sensor input (m3dm.preprocess.depth): a depth image of a known geometry converts back to it within the
depth quantisation; the intrinsics formats (MVTec 3D-AD's camera_parameters.json among them) are read; missing
depths become zeros; wrong inputs are one line naming the file; a whole tree converts, resumes and checks clean."""

import json
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from m3dm.app.preprocess import depth_main
from m3dm.data.check import check_dataset
from m3dm.data.io import read_organized_pc
from m3dm.errors import DataError
from m3dm.preprocess.depth import (
    Intrinsics,
    convert_depth_dataset,
    convert_depth_image,
    depth_to_points,
    intrinsics_from_mapping,
    organized_cloud,
    read_depth,
    read_intrinsics,
)

CAMERA = Intrinsics(fx=310.0, fy=305.0, cx=63.7, cy=47.2, width=128, height=96)
SCALE = 1e-4  # metres per unit of the 16-bit PNG: 0.1 mm steps


def scene_depth(camera: Intrinsics = CAMERA) -> tuple[np.ndarray, np.ndarray]:
    """Exact depth (H, W) and camera-frame points (H, W, 3) of a sphere (radius 0.05 m) in front of a tilted
    plane, by intersecting each pixel's ray with both: float64 ground truth."""
    rows, cols = np.mgrid[0:camera.height, 0:camera.width].astype(np.float64)
    rays = np.stack([(cols - camera.cx) / camera.fx, (rows - camera.cy) / camera.fy, np.ones_like(cols)], axis=-1)
    normal, offset = np.array([0.1, -0.2, 1.0]), 0.6  # plane n · p = offset (about 0.6 m away)
    plane = offset / (rays @ normal)
    centre, radius = np.array([0.01, 0.0, 0.5]), 0.05
    b = rays @ centre
    a = (rays**2).sum(-1)
    disc = b**2 - a * (centre @ centre - radius**2)
    sphere = np.where(disc >= 0, (b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
    depth = np.minimum(plane, sphere)
    assert np.isfinite(sphere).mean() > 0.05  # the sphere covers part of the image
    return depth, rays * depth[..., None]


def test_plane_and_sphere_recovered_within_the_depth_quantisation(tmp_path):
    depth, points = scene_depth()
    stored = np.round(depth / SCALE).astype(np.uint16)
    stored[10:14, 20:30] = 0  # a hole: no measurement
    Image.fromarray(stored).save(tmp_path / "depth.png")
    cloud = convert_depth_image(tmp_path / "depth.png", CAMERA, depth_scale=SCALE)
    assert cloud.shape == (96, 128, 3) and cloud.dtype == np.float32
    hole = stored == 0
    assert (cloud[hole] == 0).all() and (cloud[~hole] != 0).all(-1).all()
    error = np.linalg.norm(cloud[~hole].astype(np.float64) - points[~hole], axis=-1)
    # the depth is off by at most half a step, so the point by half a step times the ray's length (< 1.2 here)
    assert error.max() < SCALE, error.max()
    assert error.max() > SCALE / 100  # the quantisation is really there: the bound is not trivially met


def test_float_tiff_depth_and_missing_values_become_zeros(tmp_path):
    depth, points = scene_depth()
    stored = depth.astype(np.float32)
    stored[0, :5] = np.nan
    stored[1, :5] = np.inf
    stored[2, :5] = -1.0
    stored[3, :5] = 0.0
    tifffile.imwrite(tmp_path / "depth.tiff", stored)
    cloud = convert_depth_image(tmp_path / "depth.tiff", CAMERA)  # float: metres, scale 1
    assert (cloud[:4, :5] == 0).all() and (cloud[:4, 5:] != 0).all(-1).all()
    error = np.abs(cloud[4:].astype(np.float64) - points[4:])
    assert error.max() < 1e-6  # float32 rounding of depths near 0.6 m


def test_integer_principal_point_keeps_points_on_the_axis_valid():
    camera = Intrinsics(300.0, 300.0, 4.0, 3.0)
    depth = np.full((7, 9), 0.5)
    cloud = organized_cloud(depth, camera)
    assert (cloud != 0).all(-1).all()  # the column u = cx and row v = cy are not read as missing
    assert np.abs(cloud[:, 4, 0]).max() < 1e-30 and np.allclose(cloud[..., 2], 0.5)


def test_matches_the_straightforward_formula():
    depth, _ = scene_depth()
    camera = Intrinsics(310.0, 305.0, 63.7, 47.2, division=-0.3)
    points = depth_to_points(depth, camera).reshape(96, 128, 3)
    for v, u in [(0, 0), (50, 64), (95, 127), (20, 100)]:
        x, y = (u - 63.7) / 310.0, (v - 47.2) / 305.0
        factor = 1 / (1 - 0.3 * (x * x + y * y))
        expected = depth[v, u] * np.array([x * factor, y * factor, 1.0])
        np.testing.assert_allclose(points[v, u], expected, rtol=1e-12, atol=1e-15)


MVTEC_CALIBRATION = {"camera_type": "area_scan_division", "focus": 0.0103431, "kappa": -2205.03,
                     "sx": 3.74983e-06, "sy": 3.75e-06, "cx": 54.0458, "cy": 196.07, "image_width": 400,
                     "image_height": 400}


def test_mvtec3d_calibration_format_is_read(tmp_path):
    path = tmp_path / "camera_parameters.json"
    path.write_text(json.dumps(MVTEC_CALIBRATION))
    camera = read_intrinsics(path)
    assert camera.fx == pytest.approx(0.0103431 / 3.74983e-06) and camera.fy == pytest.approx(0.0103431 / 3.75e-06)
    assert (camera.cx, camera.cy, camera.width, camera.height) == (54.0458, 196.07, 400, 400)
    assert camera.division == pytest.approx(-2205.03 * 0.0103431**2)


def test_mvtec3d_real_clouds_are_reproduced_from_their_depth(real_mvtec_subset, tmp_path):
    """MVTec 3D-AD's xyz clouds are camera-frame points: their z as a depth image, back through the class's own
    camera_parameters.json, gives back x and y within about a pixel's footprint (0.24 mm at 0.65 m) for 99 % of
    the points (measured on the nine samples: at most 0.16 mm in x, 0.35 mm in y; a few points lie off their
    pixel's ray by up to 1.1 mm: the sensor's, not the conversion's)."""
    cable_gland = real_mvtec_subset / "cable_gland"
    camera = read_intrinsics(cable_gland / "calibration/camera_parameters.json")
    for xyz in sorted(cable_gland.glob("*/*/xyz/*.tiff")):
        cloud = read_organized_pc(xyz)
        tifffile.imwrite(tmp_path / "depth.tiff", cloud[..., 2])
        converted = convert_depth_image(tmp_path / "depth.tiff", camera)
        valid = (cloud != 0).all(-1)
        assert ((converted != 0).all(-1) == (cloud[..., 2] != 0)).all()
        error = np.abs(converted[valid] - cloud[valid])
        assert (error[:, 2] == 0).all()
        assert np.percentile(error[:, :2], 99, axis=0).max() < 4e-4, xyz
        pinhole = convert_depth_image(tmp_path / "depth.tiff", Intrinsics(camera.fx, camera.fy, camera.cx, camera.cy))
        pinhole_error = np.abs(pinhole[valid] - cloud[valid])[:, :2]
        # the distortion term is part of the camera: without it the worst 1 % is further off
        assert np.percentile(pinhole_error, 99) > np.percentile(error[:, :2], 99)


@pytest.mark.parametrize("values, expected", [
    ({"fx": 500, "fy": 501, "cx": 320, "cy": 240}, (500, 501, 320, 240)),
    ({"K": [[500, 0, 320], [0, 501, 240], [0, 0, 1]], "width": 640, "height": 480}, (500, 501, 320, 240)),
    ({"camera_matrix": {"rows": 3, "cols": 3, "data": [500, 0, 320, 0, 501, 240, 0, 0, 1]}}, (500, 501, 320, 240)),
])
def test_other_intrinsics_formats(tmp_path, values, expected):
    import yaml

    path = tmp_path / "camera.yaml"
    path.write_text(yaml.safe_dump(values))
    camera = read_intrinsics(path)
    assert (camera.fx, camera.fy, camera.cx, camera.cy) == expected and camera.division == 0


def test_wrong_inputs_name_the_file(tmp_path):
    path = tmp_path / "camera.json"
    path.write_text(json.dumps({"fx": 500, "fy": 500, "cx": 320}))
    with pytest.raises(DataError, match=f"{path}: no camera intrinsics found: expected fx, fy, cx, cy"):
        read_intrinsics(path)
    path.write_text(json.dumps({**MVTEC_CALIBRATION, "sx": "wide"}))
    with pytest.raises(DataError, match=f"{path}: camera parameter 'sx' is not a number"):
        read_intrinsics(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match=f"{path}: not valid JSON"):
        read_intrinsics(path)
    with pytest.raises(DataError, match=f"{tmp_path / 'none.json'}: camera intrinsics file not found"):
        read_intrinsics(tmp_path / "none.json")
    with pytest.raises(DataError, match="area_scan_telecentric"):
        intrinsics_from_mapping({**MVTEC_CALIBRATION, "camera_type": "area_scan_telecentric"}, "x")

    depth = tmp_path / "depth.png"
    Image.fromarray(np.ones((96, 100), np.uint16)).save(depth)
    with pytest.raises(DataError, match=f"{depth}: integer depth image \\(uint16\\): give the depth scale"):
        read_depth(depth)
    with pytest.raises(DataError, match=f"{depth}: depth image is 100x96 \\(WxH\\) but the camera intrinsics are "
                                        f"for 128x96 images"):
        convert_depth_image(depth, CAMERA, depth_scale=SCALE)
    Image.new("RGB", (90, 96)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=f"{tmp_path / 'rgb.png'}: image is 90x96 \\(WxH\\) but its depth image "
                                        f"{depth} is 100x96"):
        convert_depth_image(depth, Intrinsics(300, 300, 50, 48), depth_scale=SCALE, rgb_path=tmp_path / "rgb.png")
    Image.new("RGB", (100, 96)).save(tmp_path / "colour_depth.png")
    with pytest.raises(DataError, match=r"colour_depth\.png: expected a single-channel depth image"):
        read_depth(tmp_path / "colour_depth.png", SCALE)


def write_depth_tree(root, with_calibration=True):
    """A small sensor tree: class ``part``, train 2 / test good 1 / test dent 1 (with mask), depth as 16-bit PNG."""
    depth, _ = scene_depth()
    stored = np.round(depth / SCALE).astype(np.uint16)
    rgb = np.zeros((96, 128, 3), np.uint8)
    for split, defect, stems in (("train", "good", ("000", "001")), ("test", "good", ("000",)),
                                 ("test", "dent", ("000",))):
        folder = root / "part" / split / defect
        for kind in ("rgb", "depth") + (("gt",) if defect != "good" else ()):
            (folder / kind).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            Image.fromarray(stored).save(folder / "depth" / f"{stem}.png")
            Image.fromarray(rgb).save(folder / "rgb" / f"{stem}.png")
            if defect != "good":
                mask = np.zeros((96, 128), np.uint8)
                mask[40:50, 60:70] = 255
                Image.fromarray(mask).save(folder / "gt" / f"{stem}.png")
    if with_calibration:
        (root / "part/calibration").mkdir()
        (root / "part/calibration/camera_parameters.json").write_text(json.dumps(
            {"fx": CAMERA.fx, "fy": CAMERA.fy, "cx": CAMERA.cx, "cy": CAMERA.cy, "width": 128, "height": 96}))
    return root


def test_a_tree_converts_resumes_and_checks_clean(tmp_path, capsys):
    source = write_depth_tree(tmp_path / "sensor")
    before = sorted((p, p.read_bytes()) for p in source.rglob("*") if p.is_file())
    output = tmp_path / "converted"
    assert depth_main([str(source), "--output_root", str(output), "--depth_scale", str(SCALE), "--workers", "1",
                       "-q"]) == 0
    assert "samples written: 4" in capsys.readouterr().out
    assert sorted((p, p.read_bytes()) for p in source.rglob("*") if p.is_file()) == before  # source untouched
    report = check_dataset(output)
    # a note (no validation split) and, the scene's background plane being still there, that it looks
    # unpreprocessed (docs/own_data.md: utils/preprocessing.py removes it)
    assert report.usable and [str(p) for p in report.problems if p.kind != "unpreprocessed"] == [
        f"{output}/part/validation: no validation split: --save_model takes its pass/fail threshold parts from "
        f"the last 10 % of train"]
    assert sorted(p.where for p in report.problems if p.kind == "unpreprocessed") == sorted(
        str(path) for path in output.rglob("xyz/*.tiff"))
    assert (output / "part/calibration/camera_parameters.json").is_file()  # other files copied
    assert (output / "part/test/dent/gt/000.png").read_bytes() == (source / "part/test/dent/gt/000.png").read_bytes()
    _, points = scene_depth()
    cloud = read_organized_pc(output / "part/train/good/xyz/001.tiff")
    assert np.linalg.norm(cloud - points, axis=-1).max() < SCALE
    assert not list(output.rglob("depth"))

    (output / "part/train/good/xyz/001.tiff").unlink()  # as if interrupted before the last cloud
    summary = convert_depth_dataset(source, output, depth_scale=SCALE)
    assert (summary.processed, summary.skipped) == (1, 3)
    assert np.array_equal(read_organized_pc(output / "part/train/good/xyz/001.tiff"), cloud)


def test_tree_errors_are_reported_at_once_and_intrinsics_are_required(tmp_path, capsys):
    source = write_depth_tree(tmp_path / "sensor", with_calibration=False)
    assert depth_main([str(source), "--depth_scale", "0.001", "-q"]) == 2
    assert (f"{source}/part: no camera intrinsics: give --fx --fy --cx --cy or --intrinsics FILE, or put the "
            f"camera's parameters in {source}/part/calibration/camera_parameters.json") in capsys.readouterr().err
    (source / "part/train/good/depth/001.png").unlink()
    shutil.copy(source / "part/test/dent/gt/000.png", source / "part/test/dent/gt/005.png")
    with pytest.raises(DataError) as info:
        convert_depth_dataset(source, tmp_path / "out", intrinsics=CAMERA, depth_scale=SCALE)
    assert f"{source}/part/train/good: depth/ lacks 1 file(s) present elsewhere: 001" in str(info.value)
    assert f"{source}/part/test/dent: gt/ has 1 extra file(s) with no rgb/ or depth/ file: 005" in str(info.value)
    with pytest.raises(SystemExit):
        depth_main([str(source), "--fx", "300"])
    assert "give all four of --fx --fy --cx --cy" in capsys.readouterr().err


def test_eyecandies_back_projection_is_the_general_one_bit_for_bit():
    """Eyecandies' conversion goes through depth_to_points; it equals the reference's own formula exactly."""
    from m3dm.preprocess.eyecandies import FOCAL_LENGTH, back_project

    depth, _ = scene_depth()
    depth[5, 5] = 0
    pose = np.array([[1, 0, 0, 0.1], [0, 0.8, -0.6, 0.2], [0, 0.6, 0.8, 1.5], [0, 0, 0, 1]])
    height, width = depth.shape
    intrinsics = np.array([[FOCAL_LENGTH, 0, width / 2, 0], [0, FOCAL_LENGTH, height / 2, 0], [0, 0, 1, 0],
                           [0, 0, 0, 1]])
    inverse = np.linalg.inv(intrinsics @ pose)
    rows, cols = np.mgrid[0:height, 0:width]
    d = depth.reshape(-1)
    safe = np.where(d != 0, d, 1.0)
    v = np.stack([cols.reshape(-1), rows.reshape(-1), np.ones_like(d), 1.0 / safe], axis=1)
    expected = (v @ inverse.T)[:, :3] * safe[:, None]
    expected[d == 0] = 0
    assert np.array_equal(back_project(depth, pose), expected)
