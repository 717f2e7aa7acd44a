"""Scoring parts with a model exported by ``python -m m3dm.export``, with NumPy and onnxruntime only (Pillow and
tifffile to read files): no torch, timm, open3d, scikit-learn or SciPy. See docs/deployment.md.

    from m3dm_runner import ExportedModel
    model = ExportedModel("bagel.onnx")
    scores, maps = model.score_arrays(rgb, clouds)  # (B, 3, 224, 224), (B, 3, S, S) preprocessed
"""

from m3dm_runner.model import ExportedModel, Scored

__all__ = ["ExportedModel", "Scored"]
