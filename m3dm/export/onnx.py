"""Export a fitted class model (``main.py --save_model``) to one ONNX file that ``m3dm_runner`` scores parts with.

The artefact holds the backbones, the banks with their normalisation, the decision layer and the maps' blur; its
metadata (``m3dm`` key, JSON) holds what the runner needs besides (grouping sizes, the DropPath generator state,
the pass/fail threshold). See docs/deployment.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from m3dm.config import METHODS
from m3dm.export.btf_graph import FPFH_INPUT, BTFGraph
from m3dm.export.cfm_graph import CFMGraph
from m3dm.export.g2sf_graph import G2SFGraph
from m3dm.export.graph import BankGraph

log = logging.getLogger(__name__)
OPSET = 17  # ScatterElements with reduction="add" needs 16
FORMAT_VERSION = 1
INPUT_NAMES = ("rgb", "points", "pixels", "centres", "drop_path_draws", FPFH_INPUT)
OUTPUT_NAMES = ("image_score", "map")
PRECISIONS = ("fp32", "int8")
# the traced scope of the RGB backbone (BankGraph.rgb_backbone): int8 quantises its linear layers only. The point
# backbone's (traced under "/points/": PointFeatures calls its group_tokens) stay float32: quantised, they moved
# the real samples' image scores by 18 % (median) and the maps across most of their range (docs/deployment.md)
QUANTISED_SCOPES = ("/rgb_backbone/",)


def build_graph(predictor) -> nn.Module:
    """The traceable module of a loaded ``m3dm.app.predict.Predictor``'s detector and extractor."""
    family = predictor.detector.__class__.__name__
    method = predictor.model.method_name
    if family == "Detector" and METHODS[method].features == "btf":
        return BTFGraph(predictor.detector, predictor.extractor)
    if family == "Detector":
        return BankGraph(predictor.detector, predictor.extractor)
    if family == "CFMDetector":
        return CFMGraph(predictor.detector, predictor.extractor)
    if family == "G2SFDetector":
        return G2SFGraph(predictor.detector, predictor.extractor)
    raise NotImplementedError(f"{method}: export of its detector ({family}) is not supported yet")


def plane_cloud(img_size: int) -> np.ndarray:
    """A tilted plane seen by every pixel, ``(3, img_size, img_size)``."""
    rows, cols = np.meshgrid(np.arange(img_size), np.arange(img_size), indexing="ij")
    return np.stack([cols / img_size + 0.1, rows / img_size + 0.1, 1 + 0.1 * cols / img_size]).astype(np.float32)


def example_inputs(graph: nn.Module, img_size: int, num_group: int, batch: int = 1) -> dict[str, torch.Tensor]:
    """Inputs to trace with: :func:`plane_cloud` and its FPS centres (computed as the runner does), or the graph's
    own (``example_inputs``, BTF's)."""
    own_inputs = getattr(graph, "example_inputs", None)
    if own_inputs is not None:
        return own_inputs(batch)
    from m3dm_runner.pointops import farthest_point_sample, pad_clouds, valid_points

    cloud = plane_cloud(img_size)
    points, pixels = pad_clouds(*map(list, zip(*[valid_points(cloud)] * batch)))
    inputs = {"rgb": torch.zeros(batch, 3, 224, 224), "points": torch.from_numpy(points),
              "pixels": torch.from_numpy(pixels),
              "centres": torch.from_numpy(farthest_point_sample(points, num_group))}
    if getattr(graph, "uses_drop_path", False):
        inputs["drop_path_draws"] = torch.rand(batch, 12, 2)
    return inputs


def metadata(predictor, graph: nn.Module) -> dict:
    model, settings = predictor.model, predictor.model.settings
    record = {"format_version": FORMAT_VERSION, "method": model.method_name, "class": model.class_name,
              "img_size": int(settings["img_size"]), "num_group": int(settings["num_group"]),
              "group_size": int(settings["group_size"]), "source": str(model.path)}
    if getattr(graph, "uses_drop_path", False):
        from m3dm_runner.pointops import DropPathDraws

        key, pos = DropPathDraws.from_torch_state(predictor.extractor.rng_state().numpy()).state()
        record["drop_path_state"] = {"key": key, "pos": pos}
    extra = getattr(graph, "extra_metadata", None)
    if extra is not None:
        record.update(extra())
    thresholds = model.thresholds
    if thresholds is not None:
        record["image_threshold"] = thresholds.image
        record["pixel_threshold"] = thresholds.pixel
    return record


def rgb_linear_nodes(proto) -> list[str]:
    """The RGB backbone's ``MatMul`` nodes with a constant weight (its linear layers): what ``--precision int8``
    quantises. Attention's products of two activations, the point backbone, Point Feature Alignment, the bank
    search, the blur and the decision layer stay float32: an 8-bit distance to the nearest bank row would be most
    of an anomaly's score. (The tracer writes the backbones' linear layers on
    ``(B, tokens, C)`` as ``MatMul``; onnxruntime's quantiser renames a ``Gemm`` before quantising it, so one
    could not be selected by name.)"""
    weights = {initializer.name for initializer in proto.graph.initializer}
    return [node.name for node in proto.graph.node if node.op_type == "MatMul"
            and node.name.startswith(QUANTISED_SCOPES) and node.input[1] in weights]


def quantise_rgb_backbone(path: Path) -> int:
    """Rewrite the artefact at ``path`` with onnxruntime's dynamic int8 quantisation of
    :func:`rgb_linear_nodes` (int8 weights per output channel, uint8 activations quantised per tensor at run
    time); returns how many nodes were quantised. Metric cost and speed-up: docs/deployment.md."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = rgb_linear_nodes(onnx.load(str(path), load_external_data=False))
    if not nodes:
        raise ValueError(f"{path}: --precision int8 quantises the RGB backbone, and this method has none (the point "
                         f"backbone stays float32: docs/deployment.md)")
    quantize_dynamic(path, path, nodes_to_quantize=nodes, per_channel=True, weight_type=QuantType.QInt8)
    return len(nodes)


def export_onnx(predictor, out: str | Path, precision: str = "fp32") -> Path:
    """Trace the predictor's model and write ``out`` (one ONNX file with its weights and metadata); ``precision``
    ``int8``: then :func:`quantise_rgb_backbone`."""
    import onnx

    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    out = Path(out)
    graph = build_graph(predictor)
    for parameter in graph.parameters():
        parameter.requires_grad_(False)
    inputs = example_inputs(graph, predictor.img_size, int(predictor.model.settings["num_group"]))
    names = [name for name in INPUT_NAMES if name in inputs]
    dynamic = {"rgb": {0: "batch"}, "points": {0: "batch", 1: "n_points"}, "pixels": {0: "batch", 1: "n_points"},
               "centres": {0: "batch"}, "drop_path_draws": {0: "batch"}, "image_score": {0: "batch"},
               "map": {0: "batch"}, FPFH_INPUT: {0: "batch"}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.enable_grad():  # the point backbone's in-place BatchNorm path is for autograd-free eager runs
        torch.onnx.export(graph, tuple(inputs[n] for n in names), str(out), input_names=names,
                          output_names=list(OUTPUT_NAMES), dynamic_axes={k: v for k, v in dynamic.items()
                                                                         if k in names or k in OUTPUT_NAMES},
                          opset_version=OPSET, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=True)
    if precision == "int8":
        log.info("%s: %d RGB backbone linear layers quantised to int8", out, quantise_rgb_backbone(out))
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "m3dm", json.dumps({**metadata(predictor, graph), "precision": precision})
    onnx.save(proto, str(out))
    log.info("%s: %d nodes, %.1f MB", out, len(proto.graph.node), out.stat().st_size / 2**20)
    return out
