"""The folder of files next to a report page (``report.html`` -> ``report_files/``): the 3D viewer library, and
per part its thumbnail, its detail pictures and its decimated cloud, written as the page is written (one part in
memory at a time). The page stays small and opens fast however many parts a run has; the browser loads a part's
pictures when they scroll into view and its cloud when its detail view opens.

Everything is a plain file loaded by ``<img>`` or ``<script>`` tags, which browsers allow from a page opened from the
disk (``file://``), unlike ``fetch``. The viewer is plotly.js as the ``plotly`` package ships it (never fetched).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from m3dm.data.io import disk_writes
from m3dm.evaluation.pictures import jet, outline
from m3dm.report import figures
from m3dm.report.data import sample_grid

VIEWER = "plotly.min.js"
HEAT_STOPS = 11  # colour stops of the heatmap's colour bar (the same in 2D and in the 3D view)


def assets_name(page: Path) -> str:
    return f"{page.stem}_files"


def viewer_source() -> Path:
    """plotly.min.js of the installed ``plotly`` package."""
    return Path(str(resources.files("plotly") / "package_data" / VIEWER))


def heat_colour_stops() -> list[list]:
    """The heatmap's colour scale (``m3dm.evaluation.pictures.jet``) as ``[[position, "rgb(...)"], ...]``."""
    positions = np.linspace(0.0, 1.0, HEAT_STOPS)
    return [[float(p), "rgb({},{},{})".format(*colour)] for p, colour in zip(positions, jet(positions))]


class AssetFolder:
    """``<page stem>_files/`` next to ``page``, written into a temporary folder and put in place by ``commit``
    (the previous one replaced), so a failed build leaves the previous report whole."""

    def __init__(self, page: Path):
        self.page = Path(page)
        self.name = assets_name(self.page)
        self.final = self.page.parent / self.name
        self.folder = self.page.parent / f".{self.name}.partial-{os.getpid()}"
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)

    def href(self, relative: str) -> str:
        return f"{self.name}/{relative}"

    def write(self, relative: str, data: bytes | str) -> str:
        """One file; returns its address relative to the page."""
        path = self.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with disk_writes(path):
            path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return self.href(relative)

    def viewer(self) -> str:
        """The viewer library, copied once per page; its address."""
        with disk_writes(self.folder):
            shutil.copyfile(viewer_source(), self.folder / VIEWER)
        return self.href(VIEWER)

    def commit(self) -> None:
        old = self.page.parent / f".{self.name}.old-{os.getpid()}"
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.folder, self.final)
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def jpeg(pixels: np.ndarray) -> bytes:
    """A detail picture: JPEG at quality 92 (a tenth of the time and of the bytes of a PNG, for 1,000s of parts)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@functools.cache
def heat_colours() -> np.ndarray:
    """The heatmap's colour of each of the 256 levels of ``m3dm.report.data.heat_levels``."""
    return jet(np.arange(256, dtype=np.float32) / 255)


def detail_panels(rgb: np.ndarray, heat: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """The detail view's pictures of one part: its RGB, the ground truth (red over the RGB; the RGB alone when it
    has none) and the heatmap over the RGB, the ground truth outlined in white."""
    overlay = (0.5 * rgb + 0.5 * heat_colours()[heat]).astype(np.uint8)
    truth = rgb.copy()
    if mask is not None and mask.any():
        truth[mask] = (0.4 * rgb[mask] + 0.6 * np.asarray(figures.GT_COLOUR)).astype(np.uint8)
        edge = outline(mask)
        truth[edge] = figures.GT_COLOUR
        overlay[edge] = 255
    return {"rgb": rgb, "gt": truth, "heat": overlay}


def cloud_script(key: str, cloud: np.ndarray, at: np.ndarray, scores: np.ndarray, rgb: np.ndarray,
                 mask: np.ndarray | None) -> str:
    """``<key>.js``: the part's decimated cloud for the 3D view, ``m3dmCloud(key, {...})``, each field the base64 of
    a little-endian array with one value per point: ``x``, ``y``, ``z`` (float16, from the cloud's centre, so
    that half precision keeps a hundredth of a millimetre on a part of centimetres; the image rows downwards as in
    the picture, the near side up), ``s`` (float16 score), ``rgb`` (3 uint8) and ``gt`` (uint8 0/1), the RGB and the
    ground truth sampled from the detail pictures at the cloud's grid ``at`` (``m3dm.report.data.cloud_sample``).
    (Binary: encoding 4,096 points as decimal text took longer than all the rest of a part's files; half precision
    halves the files.)"""
    valid = np.isfinite(cloud).all(axis=2)
    points = cloud[valid].astype(np.float64)
    points = (points - (points.min(axis=0) + points.max(axis=0)) / 2 if len(points) else points).astype("<f2")
    truth = np.zeros(len(points), np.uint8) if mask is None else sample_grid(mask, at)[valid].astype(np.uint8)
    fields = {"x": points[:, 0], "y": -points[:, 1], "z": -points[:, 2], "s": scores[valid].astype("<f2"),
              "rgb": sample_grid(rgb, at)[valid].astype(np.uint8), "gt": truth}
    body = {k: base64.b64encode(np.ascontiguousarray(v).tobytes()).decode("ascii") for k, v in fields.items()}
    return f"m3dmCloud({json.dumps(key)},{json.dumps(body, separators=(',', ':'))});\n"
