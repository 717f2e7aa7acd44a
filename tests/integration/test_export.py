"""``python -m m3dm.export`` then ``m3dm_runner`` against ``m3dm.predict``'s PyTorch scores, on models fitted by
``m3dm.fit`` in the small test configuration (synthetic data, random backbone weights) and saved as
``main.py --save_model`` saves them (the same file, tests/integration/test_api.py; ``m3dm.fit`` skips the test
split's evaluation that main.py runs, which nothing here reads).

Agreement (docs/deployment.md): image scores to 1e-4 relative, maps within one blur step. A blur step is what one
8-bit level of the reference's Pillow blur is worth, ``max/255`` of the map; a float round-off that moves a pixel
across a level before the blur moves the blurred map by that level, and Pillow's six rounded box passes may add one
more, so maps must agree within ``2 · max/255``. On the point methods the synthetic 96-pixel clouds, upsampled to
224 (every point repeated, on a lattice), meet two things no graph reproduces (docs/deployment.md, "Ties"): exact
ties at a point's third interpolation centre, which PyTorch's ``topk`` breaks in its selection algorithm's order
(the exported patch features differ by up to 3e-4 relative at a few patches), and, what moves the scores, many
patches almost equal to a bank row, whose nearest distance ``sqrt(|x|² − 2 x·y + |y|²)`` is decided by the
products' round-off (|x|² is about 1152): one-ulp moves of PyTorch's own patches move its image scores by up to
2.8e-4 and its maps by 2.4 steps. Those methods are checked at 1e-3 and 14 steps here; on the real samples they
meet 1e-4 and 2 steps (benchmarks/README.md).

CFM's valid pixels are those whose point features sum to non-zero (quirk C6); the artefact tests "any feature
non-zero", the same pixels wherever that sum is not a round-off accident. With random weights it is one: the point
backbone's LayerNorm (weight 1, bias 0) makes every pixel's features sum to round-off, exactly 0 at a few percent
of the pixels, and no other summation order reproduces which. CFM is therefore checked with Point-MAE weights
whose final LayerNorm is not the identity, as trained weights' is not (docs/deployment.md).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import preprocessed_mvtec, random_uff_checkpoint

import m3dm
from m3dm.app.parts import discover_parts, load_part
from m3dm.app.predict import Predictor
from m3dm.detection.persistence import load_class_model
from m3dm.export.cli import main as export_main
from m3dm.features.point_transformer import PointTransformer
from m3dm_runner import ExportedModel
from m3dm_runner.__main__ import main as runner_main

pytestmark = pytest.mark.slow
SMALL = {"rgb_backbone_name": "vit_tiny_patch16_224", "num_group": 64, "group_size": 32, "random_init": True,
         "device": "cpu", "batch_size": 2}
UFF = {"use_uff": True, "fusion_module_path": "{uff}"}
CASES = {  # method: (settings, image-score relative tolerance, map tolerance in blur steps), see the module docstring
    "DINO": ({"memory_bank": "single"}, 1e-4, 2),
    "Point_MAE": ({"memory_bank": "single", "backbone_eval": True}, 1e-3, 14),  # measured 7.3e-4, 10.8 steps
    "DINO+Point_MAE": ({"memory_bank": "multiple"}, 1e-3, 8),  # the reference's training-mode point backbone
    "Fusion": ({"memory_bank": "single", **UFF}, 1e-3, 8),
    "DINO+Point_MAE+Fusion": ({"memory_bank": "multiple", **UFF}, 1e-3, 8),
    "CFM": ({"cfm_epochs": 1, "xyz_checkpoint": "{xyz}"}, 1e-4, 2),  # the targets: see the docstring
}
# --precision int8 (RGB backbone quantised) against float32, DINO+Point_MAE: measured 4.7e-5 relative and 1.95 blur
# steps at worst on this data, 2.6e-4 and 1.6 on the real samples (benchmarks/README.md); the bounds leave ~4x
INT8_SCORE, INT8_MAP_STEPS = 1e-3, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return preprocessed_mvtec(tmp_path_factory.mktemp("export"), n_train=3, n_val=1, n_test_good=1, n_test_defect=1)


def point_mae_with_layer_norm(path):
    """Point-MAE weights in the official layout, freshly initialised but for the final LayerNorm's weight and bias
    (drawn around 1 and 0), so that a pixel's features sum to far from 0, as with trained weights."""
    torch.manual_seed(11)
    state = PointTransformer("Point_MAE", num_group=64, group_size=32).state_dict()
    generator = torch.Generator().manual_seed(5)
    state["norm.weight"] = 1 + 0.2 * torch.randn(state["norm.weight"].shape, generator=generator)
    state["norm.bias"] = 0.2 * torch.randn(state["norm.bias"].shape, generator=generator)
    torch.save({"base_model": {f"MAE_encoder.{k}": v for k, v in state.items()}}, path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export_weights")
    return {"uff": random_uff_checkpoint(folder), "xyz": point_mae_with_layer_norm(folder / "pointmae.pth")}


@pytest.fixture(scope="module")
def exported(dataset, weights, tmp_path_factory):
    """``exported(method)``: the paths of ``method``'s model (its CASES settings) and of its float32 ONNX artefact,
    made once: the runner and int8 tests reuse the DINO and DINO+Point_MAE ones."""
    made = {}

    def make(method: str) -> tuple[Path, Path]:
        if method not in made:
            folder = tmp_path_factory.mktemp("exported")
            settings = {name: value.format(**weights) if isinstance(value, str) else value
                        for name, value in CASES[method][0].items()}
            model_path = m3dm.fit(dataset / "gadget", method=method, **SMALL, **settings).save(
                folder / "models" / "gadget.pt")
            onnx_path = folder / "gadget.onnx"
            assert export_main(["--model", str(model_path), "--out", str(onnx_path), "-q"]) == 0
            made[method] = model_path, onnx_path
        return made[method]

    return make


@pytest.mark.parametrize("method", list(CASES))
def test_exported_scores_match_pytorch(dataset, exported, method):
    _, tolerance, blur_steps = CASES[method]
    model_path, onnx_path = exported(method)
    import onnx

    operators = [node for node in onnx.load(str(onnx_path)).graph.node if node.op_type != "Constant"]
    assert len(operators) < 2500  # no unrolled loop: the two transformers' 12 blocks each are most of them

    parts = discover_parts([str(dataset / "gadget" / "test")], [], [])
    loaded = [load_part(part, 224) for part in parts]
    expected = Predictor(load_class_model(model_path), device="cpu").score(loaded)
    artefact = ExportedModel(onnx_path)
    one_by_one = []
    for part, (score, score_map) in zip(loaded, expected):
        got_score, got_map = artefact.score_arrays(part.rgb.numpy()[None], part.pc.numpy()[None])
        assert got_score.shape == (1,) and got_map.shape == (1, 224, 224)
        assert abs(float(got_score[0]) - score) <= tolerance * abs(score)
        assert np.abs(got_map[0] - score_map).max() <= blur_steps * np.abs(score_map).max() / 255
        one_by_one.append((got_score, got_map))
    if artefact.parts_per_run:  # CFM: a batch goes through the graph in runs of that many parts, in order
        rerun = ExportedModel(onnx_path)  # the DropPath draws from the start again
        scores, maps = rerun.score_arrays(np.stack([p.rgb.numpy() for p in loaded]),
                                          np.stack([p.pc.numpy() for p in loaded]))
        np.testing.assert_array_equal(scores, np.concatenate([s for s, _ in one_by_one]))
        np.testing.assert_array_equal(maps, np.concatenate([m for _, m in one_by_one]))


def test_runner_command_line_scores_a_folder(dataset, exported, tmp_path):
    _, onnx_path = exported("DINO")
    out = tmp_path / "scores.csv"
    assert runner_main(["--model", str(onnx_path), str(dataset / "gadget" / "test"), "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    names = [row.split(",")[0] for row in rows[1:]]
    assert rows[0] == "name,image_score,result,error"
    assert names == [part.name for part in discover_parts([str(dataset / "gadget" / "test")], [], [])]
    assert all(row.split(",")[2] in ("pass", "fail") for row in rows[1:])


def test_int8_artefact_stays_close_to_float32(dataset, exported, tmp_path):
    """``--precision int8`` on DINO+Point_MAE (its RGB backbone quantised, the point backbone not): the runner scores
    it, and its image scores and maps stay within INT8_SCORE and INT8_MAP_STEPS of the float32 artefact's (the
    default precision, made for the comparison with PyTorch above)."""
    model_path, float32_path = exported("DINO+Point_MAE")
    loaded = [load_part(part, 224) for part in discover_parts([str(dataset / "gadget" / "test")], [], [])]
    paths = {"fp32": float32_path, "int8": tmp_path / "gadget.int8.onnx"}
    assert export_main(["--model", str(model_path), "--out", str(paths["int8"]), "--precision", "int8", "-q"]) == 0
    scored = {}
    for precision, onnx_path in paths.items():
        artefact = ExportedModel(onnx_path)
        assert artefact.meta["precision"] == precision
        scored[precision] = [artefact.score_arrays(p.rgb.numpy()[None], p.pc.numpy()[None]) for p in loaded]
    import onnx

    quantised = [node.name for node in onnx.load(str(tmp_path / "gadget.int8.onnx")).graph.node
                 if node.op_type == "MatMulInteger"]
    assert quantised and all(name.startswith("/rgb_backbone/") for name in quantised)
    for (score, score_map), (got_score, got_map) in zip(scored["fp32"], scored["int8"]):
        assert abs(got_score[0] - score[0]) <= INT8_SCORE * abs(score[0])
        assert np.abs(got_map - score_map).max() <= INT8_MAP_STEPS * np.abs(score_map).max() / 255
