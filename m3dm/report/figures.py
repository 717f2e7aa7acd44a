"""The report's pictures: ROC, PRO and score histograms as SVG (matplotlib; sharp at any zoom, text of at least
10 px) and gallery thumbnails as PNG.

The figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot state, no display.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from m3dm.evaluation.metrics import DEFAULT_INTEGRATION_LIMIT, au_pro_from_curve
from m3dm.evaluation.pictures import heat_overlay, outline

FIGURE_SIZE = (4.0, 3.0)  # inches: 384 x 288 CSS pixels (SVG points are 4/3 px)
FIGURE_DPI = 72
TEXT = 8  # points: 10.7 CSS pixels, the smallest text of a plot
GT_COLOUR = (255, 40, 40)
NO_POINT_COLOUR = (225, 225, 225)
GAP = 2  # white pixels between the panels of a gallery thumbnail


def _figure():
    # matplotlib is imported only when a plot is drawn: predict and the run import this package for its data
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    figure.subplots_adjust(left=0.16, right=0.97, bottom=0.16, top=0.9)  # fixed: a layout engine costs more
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.tick_params(labelsize=TEXT)
    axes.xaxis.label.set_size(TEXT + 1)
    axes.yaxis.label.set_size(TEXT + 1)
    return figure, axes


def _svg(figure) -> bytes:
    """The figure as SVG with its text as text (not paths): small files, and text the browser renders sharply."""
    from matplotlib import rc_context

    buffer = io.BytesIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "m3dm"}):  # fixed ids: the same plot, the same bytes
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def roc_figure(curves: list[tuple[str, np.ndarray, np.ndarray]]) -> bytes:
    """Image-level ROC curves, one per ``(label, 0/1 labels, scores)``, with the AUROC in the legend."""
    figure, axes = _figure()
    axes.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle="--")
    for label, labels, scores in curves:
        fpr, tpr, _ = roc_curve(labels, scores)
        axes.plot(fpr, tpr, linewidth=1.4, label=f"{label} (AUROC {roc_auc_score(labels, scores):.3f})")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate")
    axes.set_title("ROC (image level)", fontsize=TEXT + 2)
    axes.legend(fontsize=TEXT, loc="lower right")
    return _svg(figure)


def pro_figure(curves: list[tuple[str, np.ndarray, np.ndarray]], limit: float = DEFAULT_INTEGRATION_LIMIT) -> bytes:
    """PRO curves up to ``limit`` FPR (pixel level), one per ``(label, FPRs, PROs)``, with the AU-PRO."""
    figure, axes = _figure()
    for label, fprs, pros in curves:
        inside = fprs <= limit
        axes.plot(fprs[inside], pros[inside], linewidth=1.4,
                  label=f"{label} (AU-PRO {au_pro_from_curve(fprs, pros, limit):.3f})")
    axes.set(xlim=(0, limit), ylim=(0, 1.02), xlabel="false positive rate (pixels)", ylabel="per-region overlap")
    axes.set_title(f"PRO (pixel level, FPR ≤ {limit:g})", fontsize=TEXT + 2)
    axes.legend(fontsize=TEXT, loc="lower right")
    return _svg(figure)


def histogram_figure(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> bytes:
    """Image scores of good and defective parts (all parts when unlabelled), the threshold as a vertical line."""
    figure, axes = _figure()
    bins = np.histogram_bin_edges(scores, bins=min(30, max(5, len(scores) // 3)))
    if (labels >= 0).all():
        axes.hist(scores[labels == 0], bins=bins, alpha=0.6, color="tab:green", label=f"good ({(labels == 0).sum()})")
        axes.hist(scores[labels == 1], bins=bins, alpha=0.6, color="tab:red",
                  label=f"defective ({(labels == 1).sum()})")
    else:
        axes.hist(scores, bins=bins, alpha=0.7, color="tab:blue", label=f"parts ({len(scores)})")
    if threshold is not None:
        axes.axvline(threshold, color="black", linewidth=1.2, linestyle="--", label=f"threshold {threshold:.4g}")
    axes.set(xlabel="image score", ylabel="parts")
    axes.set_title("Image scores", fontsize=TEXT + 2)
    axes.legend(fontsize=TEXT)
    return _svg(figure)


# -------------------------------------------------------------------------------------------- thumbnails

@functools.cache
def _viridis() -> np.ndarray:
    from matplotlib import colormaps  # imported when a picture is drawn, as in _figure

    return (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def _depth_colours(depth: np.ndarray) -> np.ndarray:
    """z of the cloud -> viridis RGB, scaled over the part's own points; grey where there is no point."""
    table = _viridis()
    depth = depth.astype(np.float32)
    valid = np.isfinite(depth)
    image = np.empty(depth.shape + (3,), dtype=np.uint8)
    image[:] = NO_POINT_COLOUR
    if valid.any():
        low, high = np.min(depth[valid]), np.max(depth[valid])
        index = np.rint(255 * (depth[valid] - low) / max(high - low, 1e-12)).astype(int)
        image[valid] = table[255 - index]  # near (small z) bright, far dark
    return image


def part_thumbnail(rgb: np.ndarray, score_map: np.ndarray, mask: np.ndarray | None, depth: np.ndarray,
                   map_range: tuple[float, float]) -> bytes:
    """One PNG strip: RGB with the ground truth outlined | heatmap over the RGB | depth-coloured point cloud."""
    edge = outline(mask) if mask is not None else None
    with_gt = rgb.copy()
    heat = heat_overlay(rgb, score_map, *map_range)
    if edge is not None:
        with_gt[edge] = GT_COLOUR
        heat[edge] = 255
    panels = [with_gt, heat, _depth_colours(depth)]
    size = rgb.shape[0]
    strip = np.full((size, 3 * size + 2 * GAP, 3), 255, dtype=np.uint8)
    for i, panel in enumerate(panels):
        strip[:, i * (size + GAP): i * (size + GAP) + size] = panel
    # 256 colours and light compression: a third of the bytes of a true-colour PNG, half the time to encode
    buffer = io.BytesIO()
    Image.fromarray(strip).quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, format="PNG",
                                                                                 compress_level=1)
    return buffer.getvalue()
