"""``--precision int8``: only the RGB backbone's linear layers (constant weights) are quantised; the point
backbone, the bank search and every other matrix product stay float32 (the whole artefact against float32:
tests/integration)."""

import numpy as np
import onnxruntime as ort
import pytest

from m3dm.export.onnx import quantise_rgb_backbone, rgb_linear_nodes

WIDTH = 16


@pytest.fixture(scope="module")
def onnx():
    """The onnx package, imported when a test here first runs rather than at collection (with ml_dtypes it costs
    every test process about 1 s)."""
    import onnx

    return onnx


def tiny_artefact(path, onnx):
    """A linear layer of each backbone, a product of two activations in a backbone's scope (Point Feature Alignment's,
    attention's), and a bank search product outside them, named as the tracer names them in an artefact."""
    helper, numpy_helper, TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    rng = np.random.default_rng(0)
    weights = {name: numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), name)
               for name in ("qkv_weight", "fc_weight", "bank")}
    nodes = [helper.make_node("MatMul", ["x", "qkv_weight"], ["q"], name="/rgb_backbone/blocks.0/attn/qkv/MatMul"),
             helper.make_node("MatMul", ["q", "fc_weight"], ["h"], name="/points/blocks/blocks.0/mlp/fc1/MatMul"),
             helper.make_node("MatMul", ["h", "q"], ["a"], name="/points/MatMul"),
             helper.make_node("MatMul", ["a", "bank"], ["y"], name="/rgb/MatMul")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [WIDTH, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [WIDTH, WIDTH])],
                              list(weights.values()))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_only_the_rgb_backbones_linear_layers_are_quantised(tmp_path, onnx):
    path = tiny_artefact(tmp_path / "tiny.onnx", onnx)
    assert rgb_linear_nodes(onnx.load(str(path))) == ["/rgb_backbone/blocks.0/attn/qkv/MatMul"]
    x = np.random.default_rng(1).standard_normal((WIDTH, WIDTH)).astype(np.float32)
    expected = run(path, x)
    assert quantise_rgb_backbone(path) == 1
    nodes = onnx.load(str(path)).graph.node
    float_products = {node.name for node in nodes if node.op_type == "MatMul"}
    assert float_products == {"/points/blocks/blocks.0/mlp/fc1/MatMul", "/points/MatMul", "/rgb/MatMul"}
    assert {node.op_type for node in nodes} >= {"DynamicQuantizeLinear", "MatMulInteger"}
    got = run(path, x)
    assert not np.array_equal(got, expected)
    # still the same products: 5.5 % relative error here (one 8-bit layer of 16 random weights, amplified by three
    # float products); what an artefact's scores lose is measured in docs/deployment.md
    assert np.linalg.norm(got - expected) <= 0.1 * np.linalg.norm(expected)
