"""G2SF through ``python -m m3dm.export`` and ``m3dm_runner`` against ``m3dm.predict``'s PyTorch scores, as
tests/integration/test_export.py does for the other methods (small configuration, synthetic data; the model fitted
by ``m3dm.fit`` and saved as ``main.py --save_model`` saves it).

The point backbone's weights here are random but with a non-zero bias in its final LayerNorm, as trained
weights have. With ``--random_init`` that bias is 0, so every patch's point features sum to 0 up to round-off, and
G2SF's background test ("point features sum to exactly 0", docs/g2sf.md) becomes a coin toss decided by the
summation order, which PyTorch and onnxruntime do not share (docs/deployment.md).

Tolerances as for the other point methods on this data (tests/integration/test_export.py): the synthetic 96-pixel
clouds upsampled to 224 put points at exactly equal distances from two group centres, which PyTorch's ``topk`` and
onnxruntime's break differently; image scores agree to 1e-3 and maps within 8 blur steps here. On the real samples
the same comparison gives 1e-4 and one blur step (benchmarks/README.md, "Exported models").
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import preprocessed_mvtec

import m3dm
from m3dm.app.parts import discover_parts, load_part
from m3dm.app.predict import Predictor
from m3dm.detection.persistence import load_class_model
from m3dm.export.cli import main as export_main
from m3dm.features.point_transformer import PointTransformer
from m3dm_runner import ExportedModel

pytestmark = pytest.mark.slow
SMALL = {"rgb_backbone_name": "vit_tiny_patch16_224", "num_group": 64, "group_size": 32, "random_init": True,
         "device": "cpu", "batch_size": 2}
G2SF = {"num_anomalies": 3, "max_epoch": 2, "n_hidden": "16", "emb_dim": 8}


def point_weights(path: Path) -> Path:
    """Point-MAE weights in the official layout, freshly initialised, with a trained-like final LayerNorm bias."""
    torch.manual_seed(5)
    state = PointTransformer("Point_MAE", num_group=64, group_size=32).state_dict()
    state["norm.bias"] = torch.randn_like(state["norm.bias"]) * 0.1
    torch.save({"base_model": {f"MAE_encoder.{k}": v for k, v in state.items()}}, path)
    return path


def test_exported_g2sf_scores_match_pytorch(tmp_path):
    dataset = preprocessed_mvtec(tmp_path / "data", n_train=3, n_val=1, n_test_good=1, n_test_defect=1)
    weights = point_weights(tmp_path / "pointmae.pth")
    model = m3dm.fit(dataset / "gadget", method="G2SF", xyz_checkpoint=str(weights), **SMALL, **G2SF)
    model_path, onnx_path = model.save(tmp_path / "models" / "gadget.pt"), tmp_path / "gadget.onnx"
    assert export_main(["--model", str(model_path), "--out", str(onnx_path), "-q"]) == 0
    import onnx

    operators = [node for node in onnx.load(str(onnx_path)).graph.node if node.op_type != "Constant"]
    assert len(operators) < 2500  # no unrolled loop: the LSPN is traced once per neighbour (6 times)

    loaded = [load_part(part, 224) for part in discover_parts([str(dataset / "gadget" / "test")], [], [])]
    expected = Predictor(load_class_model(model_path), device="cpu").score(loaded)
    exported = ExportedModel(onnx_path)
    assert "drop_path_draws" in exported.inputs  # the reference's training-mode point backbone (quirk 13)
    for part, (score, score_map) in zip(loaded, expected):
        got_score, got_map = exported.score_arrays(part.rgb.numpy()[None], part.pc.numpy()[None])
        assert got_score.shape == (1,) and got_map.shape == (1, 224, 224)
        assert abs(float(got_score[0]) - score) <= 1e-3 * abs(score)
        assert np.abs(got_map[0] - score_map).max() <= 8 * np.abs(score_map).max() / 255
