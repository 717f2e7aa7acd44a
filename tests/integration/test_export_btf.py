"""BTF's methods through ``python -m m3dm.export`` and ``m3dm_runner`` against ``m3dm.predict``'s PyTorch scores,
on models fitted by ``m3dm.fit`` on synthetic data (random wide-ResNet weights) and saved as ``main.py
--save_model`` saves them (``m3dm.fit`` skips the test split's evaluation that main.py runs, which nothing here reads).

The runner computes the FPFH patches in NumPy (``m3dm_runner.fpfh``), the graph the wide-ResNet, the banks and the
maps. Agreement as for the other methods (docs/deployment.md): image scores to 1e-4 relative, maps within one blur
step (``2 · max/255`` at every pixel).
"""

from pathlib import Path

import numpy as np
import pytest
from conftest import preprocessed_mvtec

import m3dm
from m3dm.app.parts import discover_parts, load_part
from m3dm.app.predict import Predictor
from m3dm.detection.persistence import load_class_model
from m3dm.export.cli import main as export_main
from m3dm_runner import ExportedModel
from m3dm_runner.__main__ import main as runner_main

pytestmark = pytest.mark.slow
SETTINGS = {"memory_bank": "single", "random_init": True, "device": "cpu", "batch_size": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return preprocessed_mvtec(tmp_path_factory.mktemp("export_btf"), n_train=3, n_val=1, n_test_good=1,
                              n_test_defect=1)


@pytest.fixture(scope="module")
def exported(dataset, tmp_path_factory):
    """``exported(method, fix_quirks)``: the paths of the model and its ONNX artefact, made once (the runner test
    reuses BTF_FPFH's)."""
    made = {}

    def make(method: str, fix_quirks: bool = False) -> tuple[Path, Path]:
        if (method, fix_quirks) not in made:
            folder = tmp_path_factory.mktemp("exported")
            model = m3dm.fit(dataset / "gadget", method=method, fix_quirks=fix_quirks, **SETTINGS)
            model_path, onnx_path = model.save(folder / "models" / "gadget.pt"), folder / "gadget.onnx"
            assert export_main(["--model", str(model_path), "--out", str(onnx_path), "-q"]) == 0
            made[method, fix_quirks] = model_path, onnx_path
        return made[method, fix_quirks]

    return make


@pytest.mark.parametrize("method, fix_quirks", [("BTF_FPFH", False), ("BTF_RGB", False), ("BTF_RGB+FPFH", False),
                                                ("BTF_RGB+FPFH", True)],
                         ids=["BTF_FPFH", "BTF_RGB", "BTF_RGB+FPFH", "BTF_RGB+FPFH-fix_quirks"])
def test_exported_btf_scores_match_pytorch(dataset, exported, method, fix_quirks):
    model_path, onnx_path = exported(method, fix_quirks)
    parts = discover_parts([str(dataset / "gadget" / "test")], [], [])
    loaded = [load_part(part, 224) for part in parts]
    expected = Predictor(load_class_model(model_path), device="cpu").score(loaded)
    exported = ExportedModel(onnx_path)
    assert ("fpfh" in exported.inputs) == ("FPFH" in method) and ("rgb" in exported.inputs) == ("RGB" in method)
    rgb = np.stack([part.rgb.numpy() for part in loaded])
    clouds = np.stack([part.pc.numpy() for part in loaded])
    got_scores, got_maps = exported.score_arrays(rgb, clouds)  # one batch of every part
    assert got_scores.shape == (len(loaded),) and got_maps.shape == (len(loaded), 224, 224)
    for got_score, got_map, (score, score_map) in zip(got_scores, got_maps, expected):
        assert abs(float(got_score) - score) <= 1e-4 * abs(score)
        assert np.abs(got_map - score_map).max() <= 2 * np.abs(score_map).max() / 255


def test_runner_command_line_scores_btf_parts(dataset, exported, tmp_path):
    _, onnx_path = exported("BTF_FPFH")
    out = tmp_path / "scores.csv"
    assert runner_main(["--model", str(onnx_path), str(dataset / "gadget" / "test"), "--out", str(out),
                        "--batch_size", "2"]) == 0
    rows = out.read_text().splitlines()
    assert rows[0] == "name,image_score,result,error"
    assert [row.split(",")[0] for row in rows[1:]] == [p.name for p in discover_parts(
        [str(dataset / "gadget" / "test")], [], [])]
    assert all(row.split(",")[2] in ("pass", "fail") for row in rows[1:])
