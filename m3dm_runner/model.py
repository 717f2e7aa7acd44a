"""An exported m3dm model on onnxruntime: arrays or files in, image scores and 224 x 224 maps out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from m3dm_runner.fpfh import fpfh_batch
from m3dm_runner.inputs import PartError, PartFiles, read_part
from m3dm_runner.pointops import DropPathDraws, farthest_point_sample, pad_clouds, valid_points

METADATA_KEY = "m3dm"
FORMAT_VERSION = 1


@dataclass
class Scored:
    name: str
    score: float
    score_map: np.ndarray  # (224, 224) float32
    fails: bool | None  # score above the model's image threshold (None: the model has none)


class ExportedModel:
    """``m3dm.export``'s artefact with what its graph leaves out (valid points, farthest point sampling and, for a
    training-mode point backbone, the DropPath draws continued from the fitted model's generator state, so parts
    scored in the same order and batches get ``m3dm.predict``'s scores; BTF's FPFH patches).

    ``parts_per_run``: the most parts one run of the graph gets; a larger batch is scored in runs of that many, in
    order (same scores, and the memory of one run). None: the artefact's own cap (metadata ``parts_per_run``, which
    CFM's export sets: one run takes about 2.7 GB a part), else the whole batch in one run."""

    def __init__(self, path: str | Path, threads: int | None = None, parts_per_run: int | None = None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.threads = threads  # also the FPFH's
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ValueError(f"{path}: not an m3dm export (no {METADATA_KEY!r} metadata)")
        self.meta = json.loads(meta[METADATA_KEY])
        if self.meta["format_version"] > FORMAT_VERSION:
            raise ValueError(f"{path}: export format {self.meta['format_version']} is newer than this runner's")
        self.inputs = {i.name for i in self.session.get_inputs()}
        state = self.meta.get("drop_path_state")
        self.draws = None if state is None else DropPathDraws(state["key"], state["pos"])
        self.parts_per_run = parts_per_run or self.meta.get("parts_per_run")

    @property
    def img_size(self) -> int:
        return int(self.meta["img_size"])

    def point_inputs(self, clouds: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's point inputs of ``(B, 3, S, S)`` organized clouds."""
        points, pixels = zip(*(valid_points(cloud) for cloud in clouds))
        for i, cloud_points in enumerate(points):
            if len(cloud_points) < self.meta["group_size"]:
                raise PartError(f"sample {i} of the batch: the point cloud has {len(cloud_points)} valid points, "
                                f"fewer than the {self.meta['group_size']} of one group")
        padded, index = pad_clouds(list(points), list(pixels))
        return {"points": padded, "pixels": index, "centres": farthest_point_sample(padded, self.meta["num_group"])}

    def score_arrays(self, rgb: np.ndarray, clouds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``rgb (B, 3, 224, 224)``, ``clouds (B, 3, S, S)`` preprocessed -> ``(scores (B,), maps (B, 224, 224))``,
        in runs of at most ``parts_per_run`` parts."""
        step = self.parts_per_run or max(len(clouds), 1)
        if len(clouds) <= step:
            return self.run_graph(rgb, clouds)
        runs = [self.run_graph(rgb[i:i + step], clouds[i:i + step]) for i in range(0, len(clouds), step)]
        return np.concatenate([scores for scores, _ in runs]), np.concatenate([maps for _, maps in runs])

    def run_graph(self, rgb: np.ndarray, clouds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One run of the graph on the whole batch."""
        feeds: dict[str, np.ndarray] = {}
        if "rgb" in self.inputs:
            feeds["rgb"] = np.ascontiguousarray(rgb, dtype=np.float32)
        if "points" in self.inputs:
            feeds.update(self.point_inputs(np.asarray(clouds, dtype=np.float32)))
        if "cloud" in self.inputs:
            feeds["cloud"] = np.ascontiguousarray(clouds, dtype=np.float32)
        if "fpfh" in self.inputs:
            feeds["fpfh"] = fpfh_batch(np.asarray(clouds, dtype=np.float32), self.meta["fpfh"],
                                       self.threads)
        if "drop_path_draws" in self.inputs:
            assert self.draws is not None
            feeds["drop_path_draws"] = self.draws.draw(len(clouds))
        scores, maps = self.session.run(["image_score", "map"], feeds)
        return scores, maps

    def score_files(self, parts: list[PartFiles], batch_size: int = 1) -> list[Scored | PartError]:
        """Every part, in order, in batches; a part that cannot be read is its error, and the others go on."""
        out: list[Scored | PartError] = []
        threshold = self.meta.get("image_threshold")
        for start in range(0, len(parts), batch_size):
            batch, arrays = [], []
            for part in parts[start:start + batch_size]:
                try:
                    arrays.append(read_part(part, self.img_size))
                    batch.append(part)
                except PartError as exc:
                    out.append(exc)
            if not batch:
                continue
            scores, maps = self.score_arrays(np.stack([a[0] for a in arrays]), np.stack([a[1] for a in arrays]))
            out.extend(Scored(p.name, float(s), m, None if threshold is None else bool(s > threshold))
                       for p, s, m in zip(batch, scores, maps))
        return out
