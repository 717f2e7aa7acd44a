"""Inference on new parts with a saved class model (an addition; the reference has no inference path).

    m3dm-predict --model results/models/bagel.pt INPUTS... [--rgb a.png --xyz a.tiff] [--preprocess]
    python -m m3dm.predict ...  (the same)

Inputs: folders in the ``<defect>/{rgb,xyz}`` layout (a dataset split such as ``datasets/mvtec3d/bagel/test``) or
the ``{rgb,xyz}`` layout, paired by file stem (``rgb/*.png`` with ``xyz/*.tiff``; ``gt/*.png`` is shown when
present), and single pairs given with ``--rgb``/``--xyz``. ``--preprocess`` applies the MVTec 3D-AD
preprocessing (docs/original.md: Preprocessing; seed 0 as ``m3dm.preprocess``) to raw inputs; without it inputs
must be preprocessed.

The model's backbones are rebuilt from the recorded weight files (or random weights and seed) and every checksum
is verified (``m3dm.detection.persistence``). Parts are read one by one and scored in batches of ``--batch_size``.
Outputs under ``--output``: ``predictions.csv`` and ``predictions.jsonl`` (one row per part, written as parts
finish: name, pass/fail/error, image score, normalised score (in [0, 1], 0.5 at the image threshold), threshold,
anomalous pixels, heatmap path, input paths, error message) and ``heatmaps/<name>.png`` (RGB | heatmap overlay
with the thresholded region outlined in white [| ground truth]).

Bad inputs (unreadable or unpaired files, a cloud empty after preprocessing, ...) are reported per part and the
run goes on. Exit status: 0 when every part was scored, 1 when some could not be, 2 when nothing could run (bad
model file, missing weights, no input).

With the reference's training-mode point backbone (a model fitted without ``--backbone_eval``) DropPath is
active, so a part's score depends on the random draws before it; the generator starts from the state saved after
fitting, so the same inputs in the same order and batch size give the same scores as ``main.py``'s evaluation.
Fit with ``--backbone_eval`` for scores that depend on the part alone.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from m3dm.app.console import add_logging_flags, configure_logging, interrupted
from m3dm.app.lock import output_lock
from m3dm.app.outputs import check_writable_folder
from m3dm.app.parts import LoadedPart, Part, discover_parts, load_part
from m3dm.app.run import weight_records
from m3dm.config import METHODS, backbone_settings
from m3dm.data.io import append_text, atomic_path
from m3dm.detection.factory import detector_from_model
from m3dm.detection.interface import ClassDetector, DetectorResources
from m3dm.detection.persistence import load_class_model, make_setup
from m3dm.detection.thresholds import false_alarm_threshold
from m3dm.errors import CheckpointError, DataError, DiskFullError, ModelFileError, OutputInUseError
from m3dm.evaluation.pictures import compose, denormalize_rgb, heat_overlay, mask_panel, save_panel
from m3dm.features.extractor import FeatureExtractor, build_extractor
from m3dm.report.build import try_build_report
from m3dm.report.data import REPORT_DATA_DIR, PredictionData, provenance, software_versions
from m3dm.runtime import resolve_device, seed_everything, use_device
from m3dm.uff.block import load_fusion_block

EXIT_OK, EXIT_PART_ERRORS, EXIT_FATAL = 0, 1, 2
log = logging.getLogger(__name__)
CSV_FIELDS = ("name", "result", "image_score", "normalised_score", "image_threshold", "anomalous_pixels", "heatmap",
              "map", "rgb", "xyz", "error")


# ------------------------------------------------------------------------------------------------- model

class Predictor:
    """A saved model with its backbones rebuilt and verified: scores batches of loaded parts."""

    def __init__(self, model, device="cpu", rgb_checkpoint: str | None = None,
                 xyz_checkpoint: str | None = None, fusion_module_path: str | None = None):

        self.model = model
        settings, weights = model.settings, model.weights

        def recorded(kind: str, override: str | None) -> str | None:
            if override is not None:
                return override
            record = weights.get(kind)
            return record.path if record is not None and record.from_file else None

        backbones = backbone_settings(settings, rgb_checkpoint=recorded("rgb", rgb_checkpoint),
                                      xyz_checkpoint=recorded("xyz", xyz_checkpoint),
                                      random_init=any(not record.from_file for record in weights.values()))
        self.backbones = backbones
        seed_everything(settings["seed"])  # random-init backbones are rebuilt as main.py built them
        method = METHODS.get(model.method_name)
        if method is not None and method.features == "btf":  # FPFH has no weights: the method says what it needs
            needs_rgb, needs_xyz = method.needs_rgb, method.needs_xyz
        else:
            needs_rgb, needs_xyz = "rgb" in weights, "xyz" in weights
        self.extractor = build_extractor(backbones, needs_rgb=needs_rgb, needs_xyz=needs_xyz, device=device,
                                         seed=settings["seed"], clamp_pfa=settings["fix_quirks"], method=method)
        fusion_block, fusion_path = None, None
        if "fusion" in weights:
            fusion_path = recorded("fusion", fusion_module_path)
            if fusion_path is None or self.extractor.rgb_backbone is None:
                raise ValueError(f"{model.path}: the model's UFF block was not read from a file: give "
                                 f"--fusion_module_path")
            fusion_block = load_fusion_block(fusion_path, device, rgb_dim=self.extractor.rgb_backbone.feature_dim)
        self.fusion_block = fusion_block
        current = weight_records(self.extractor, backbones, settings["seed"], fusion_block, fusion_path)
        model.check_setup(make_setup(model.method_name, model.config, settings, current))
        self.detector = detector_from_model(model, DetectorResources(device, progress=False, fusion_block=fusion_block))
        if model.generator_state is not None:
            self.extractor.set_rng_state(model.generator_state)

    @property
    def img_size(self) -> int:
        return int(self.model.settings["img_size"])

    def score(self, parts: list[LoadedPart]) -> list[tuple[float, np.ndarray]]:
        """``(image score, (224, 224) float32 map)`` per part."""
        return score_loaded_parts(self.extractor, self.detector, parts)


def score_loaded_parts(extractor: FeatureExtractor, detector: ClassDetector,
                       parts: list[LoadedPart]) -> list[tuple[float, np.ndarray]]:
    """``(image score, (224, 224) float32 map)`` of each part, extracted in one batch and scored."""
    rgb = torch.stack([p.rgb for p in parts]) if detector.needs_rgb else None
    pc = torch.stack([p.pc for p in parts]) if detector.needs_xyz else None
    with torch.no_grad():
        features = extractor(rgb, pc, names=[p.part.name for p in parts])
        scored = [detector.predict(detector.modality_patches(f)) for f in features]
    return [(float(score), score_map.numpy().astype(np.float32)) for score, score_map in scored]


# ----------------------------------------------------------------------------------------------- outputs

def part_picture(rgb: np.ndarray, score_map: np.ndarray, region: np.ndarray, colour_range: tuple[float, float],
                 title: str, gt: np.ndarray | None = None):
    """RGB | heatmap over the RGB with the region outlined in white [| ground truth], and a title line."""
    panels = [rgb, heat_overlay(rgb, score_map, *colour_range, region)]
    if gt is not None:
        panels.append(mask_panel(gt, rgb.shape))
    return compose(panels, title)


class ResultWriter:
    """``predictions.csv`` / ``predictions.jsonl`` rows as parts finish, pictures and (optionally) maps.

    Each row is appended to both files whole or not at all (``m3dm.data.io.append_text``), so an interrupted or
    out-of-space run leaves files that end at the last finished part; ``resume`` appends to an earlier run's."""

    def __init__(self, output: Path, thresholds, pictures: bool = True, save_maps: bool = False,
                 resume: bool = False):
        self.output, self.thresholds = output, thresholds
        self.pictures, self.save_maps = pictures, save_maps
        output.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.jsonl_path = output / "predictions.csv", output / "predictions.jsonl"
        new = not (resume and self.csv_path.is_file())
        # both files stay open while parts are scored (unbuffered: a row is on disk once written); close() closes
        self._csv_file = open(self.csv_path, "wb" if new else "ab", buffering=0)  # noqa: SIM115
        self._jsonl = open(self.jsonl_path, "wb" if new else "ab", buffering=0)  # noqa: SIM115
        if new:
            append_text(self._csv_file, _csv_line(CSV_FIELDS), self.csv_path)
        self.counts = {"pass": 0, "fail": 0, "error": 0}
        self.report_data: PredictionData | None = None  # for report.html (set by run)

    def _row(self, row: dict) -> None:
        full = {field: row.get(field) for field in CSV_FIELDS}
        start = self._csv_file.seek(0, os.SEEK_END)
        append_text(self._csv_file, _csv_line(["" if v is None else v for v in full.values()]), self.csv_path)
        try:
            append_text(self._jsonl, json.dumps(full) + "\n", self.jsonl_path)
        except BaseException:
            os.ftruncate(self._csv_file.fileno(), start)  # the part is in neither file
            raise
        self.counts[str(full["result"])] += 1

    def error(self, part: Part, message: str) -> None:
        self._row({"name": part.name, "result": "error", "rgb": _text(part.rgb), "xyz": _text(part.xyz),
                   "error": message})

    def scored(self, loaded: LoadedPart, score: float, score_map: np.ndarray) -> str:
        thresholds, part = self.thresholds, loaded.part
        result = "fail" if thresholds.fails(score) else "pass"
        region = thresholds.region(score_map)
        heatmap = map_file = None
        rgb = denormalize_rgb(loaded.rgb.numpy())
        if self.pictures:
            title = f"{part.name}  score {score:.4g} (threshold {thresholds.image:.4g})  {result.upper()}"
            picture = part_picture(rgb, score_map, region, thresholds.colour_range(), title, loaded.gt)
            heatmap = save_panel(self.output / "heatmaps" / f"{part.name}.png", picture)
        if self.save_maps:
            map_file = self.output / "maps" / f"{part.name}.npy"
            map_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(map_file) as tmp, open(tmp, "wb") as handle:
                np.save(handle, score_map)
        with interrupts_deferred():  # a Ctrl-C between the two would keep a row the report lacks
            self._row({"name": part.name, "result": result, "image_score": repr(score),
                       "normalised_score": thresholds.normalised(score), "image_threshold": repr(thresholds.image),
                       "anomalous_pixels": int(region.sum()),
                       "heatmap": _text(heatmap), "map": _text(map_file), "rgb": _text(part.rgb),
                       "xyz": _text(part.xyz)})
            if self.report_data is not None:  # after the row: the report holds the parts the tables hold
                self.report_data.add(part.name, score, result == "fail", rgb, loaded.pc.numpy(), loaded.gt,
                                     score_map)
        return result

    def close(self) -> None:
        self._csv_file.close()
        self._jsonl.close()


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) held back until the block ends, so that what the block writes is written whole; elsewhere
    than in the main thread, or without signal masks, nothing changes."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _csv_line(values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()


def finished_rows(output: Path, thresholds) -> list[dict]:
    """``--resume``: the rows an earlier run wrote in ``output`` (``predictions.jsonl``); refused (ValueError) when
    they were scored with another image threshold, since the two runs' pass/fail would not compare."""
    path = output / "predictions.jsonl"
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        names = [row["name"] for row in rows]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--resume: {path} is not a predictions file of m3dm-predict ({type(exc).__name__}: "
                         f"{exc}): give another --output") from exc
    other = {row["image_threshold"] for row in rows if row.get("image_threshold") is not None} - \
        {repr(thresholds.image)}
    if other:
        raise ValueError(f"--resume: {path} was scored with image threshold {other.pop()}, this run's is "
                         f"{thresholds.image!r}: resume with the same model and threshold flags, or give another "
                         f"--output")
    table = output / "predictions.csv"
    if table.is_file():
        with open(table, newline="") as handle:
            header = next(csv.reader(handle), [])
        if header != list(CSV_FIELDS):  # new rows appended under another header would not line up
            raise ValueError(f"--resume: {table} has the columns of another version of m3dm-predict: give another "
                             f"--output")
    log.info("--resume: %d part(s) finished in %s skipped", len(names), path)
    return rows


def write_prediction_report(writer: ResultWriter, model, thresholds, seconds: float) -> None:
    """``report.html`` of the scored parts (gallery and score histogram with the threshold) and the saved data it
    is built from (``python -m m3dm.report`` rebuilds it)."""
    if writer.report_data is None:
        return
    record = {"kind": "predict", "method": model.method_name, "model": str(model.path), "class": model.class_name,
              "thresholds": f"image {thresholds.image:.6g}, pixel {thresholds.pixel:.6g} (from {thresholds.source})",
              "config": dict(model.settings), "weights": model.setup.plain_weights(), "versions": software_versions(),
              **provenance(),
              "timings_s": {"predict": seconds}}
    try:
        saved = writer.report_data.save(writer.output, record)
    finally:
        writer.report_data.close()  # the thumbnails' spool file
    if saved is not None:
        try_build_report(writer.output)


def _text(path) -> str | None:
    return None if path is None else str(path)


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------------ running

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3dm-predict",
                                description="Score new parts with a saved M3DM class model (docs/inference.md).")
    p.add_argument("inputs", nargs="*", metavar="FOLDER",
                   help="folders in the <defect>/{rgb,xyz} or {rgb,xyz} layout (e.g. a dataset split)")
    p.add_argument("--model", required=True, help="model file written by main.py --save_model (<class>.pt)")
    p.add_argument("--rgb", nargs="+", default=[], help="RGB image(s) of single parts (with --xyz, in order)")
    p.add_argument("--xyz", nargs="+", default=[], help="organized point cloud TIFF(s) of single parts")
    p.add_argument("--preprocess", action="store_true",
                   help="inputs are raw scans: apply the MVTec 3D-AD preprocessing first")
    p.add_argument("--output", default="predictions", help="folder for predictions.csv/.jsonl and heatmaps/")
    p.add_argument("--batch_size", type=int, default=8, help="parts per backbone batch")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--far", type=float, default=None,
                   help="reset the image threshold from the model's stored good-part scores at this false-alarm rate")
    p.add_argument("--image_threshold", type=float, default=None, help="override the model's image threshold")
    p.add_argument("--pixel_threshold", type=float, default=None, help="override the model's pixel threshold")
    p.add_argument("--rgb_checkpoint", default=None, help="RGB backbone weights, if moved since fitting")
    p.add_argument("--xyz_checkpoint", default=None, help="point backbone weights, if moved since fitting")
    p.add_argument("--fusion_module_path", default=None, help="UFF block checkpoint, if moved since fitting")
    p.add_argument("--save_maps", action="store_true", help="also write maps/<name>.npy (224 x 224 float32)")
    p.add_argument("--no_pictures", action="store_true", help="do not write the heatmap PNGs")
    p.add_argument("--resume", action="store_true",
                   help="--output holds the predictions of an interrupted run: score only the parts it lacks and "
                        "add them (same model and thresholds)")
    p.add_argument("--overwrite", action="store_true",
                   help="--output already holds predictions: delete them (tables, heatmaps/, maps/) and write the "
                        "new ones (without it such a folder is refused)")
    return add_logging_flags(p, quiet_help="no progress bar, no messages but warnings, errors and the summary")


def _thresholds(model, args):
    thresholds = model.thresholds
    if thresholds is None:
        raise ValueError(f"{model.path} holds no thresholds: give --image_threshold and --pixel_threshold")
    if args.far is not None:
        thresholds = thresholds.with_overrides(image=false_alarm_threshold(thresholds.good_image_scores, args.far))
    return thresholds.with_overrides(args.image_threshold, args.pixel_threshold)


def _score_with_fallback(predictor: Predictor, loaded: list[LoadedPart]) -> list[tuple[float, np.ndarray] | str]:
    """``(score, map)`` or an error message per part; a failing batch is scored part by part so that only the
    bad part is lost."""
    outcomes: list[tuple[float, np.ndarray] | str]
    try:
        outcomes = list(predictor.score(loaded))
        return outcomes
    except Exception as exc:
        if len(loaded) == 1:
            return [_describe(exc)]
        return [outcome for part in loaded for outcome in _score_with_fallback(predictor, [part])]


def _flush(predictor: Predictor, pending: list, writer: ResultWriter, report) -> None:
    """Score the loaded parts of ``pending`` and write every row of it in input order (``pending`` holds loaded
    parts and ``(part, message)`` pairs of parts that could not be read)."""
    loaded = [item for item in pending if isinstance(item, LoadedPart)]
    outcomes = dict(zip(map(id, loaded), _score_with_fallback(predictor, loaded) if loaded else []))
    for item in pending:
        if not isinstance(item, LoadedPart):
            writer.error(*item)
            continue
        outcome = outcomes[id(item)]
        if isinstance(outcome, str):
            report(item.part, outcome)
            writer.error(item.part, outcome)
        else:
            try:
                writer.scored(item, *outcome)
            except DiskFullError:
                raise  # no part can be written any more: the run stops, keeping the finished parts
            except OSError as exc:  # e.g. the picture cannot be written: that part is lost, not the run
                report(item.part, _describe(exc))
                writer.error(item.part, _describe(exc))


# what a run writes in --output
PREDICTION_OUTPUTS = ("predictions.csv", "predictions.jsonl", "heatmaps", "maps", "report.html", "report_files",
                      "report_data")
EVALUATION_OUTPUTS = ("results.json", "classes")  # a main.py results folder holds these: never predicted into


def earlier_predictions(output: Path, overwrite: bool, resume: bool = False) -> list[Path]:
    """What an earlier run wrote in ``output``, to be deleted with ``overwrite`` (kept and added to with
    ``resume``); without either they are refused, so that no table is replaced and no old heatmap kept among the
    new ones unasked. A main.py results folder is refused even with ``overwrite``: its maps and report are not
    predictions."""
    evaluation = [name for name in EVALUATION_OUTPUTS if (output / name).exists()]
    if evaluation:
        raise ValueError(f"--output {output} is a main.py results folder (it holds {', '.join(evaluation)}): give "
                         f"another --output for the predictions")
    earlier = [output / name for name in PREDICTION_OUTPUTS if (output / name).exists()]
    if resume:
        return []
    if earlier and not overwrite:
        raise ValueError(f"--output {output} already holds predictions ({', '.join(p.name for p in earlier)}): "
                         f"give --overwrite to replace them, --resume to score only the parts they lack, or "
                         f"another --output")
    return earlier


def run(args) -> int:


    start = time.perf_counter()
    output = Path(args.output)
    try:
        earlier = earlier_predictions(output, args.overwrite, args.resume)
        model = load_class_model(args.model)
        thresholds = _thresholds(model, args)
        finished = finished_rows(output, thresholds) if args.resume else []
        parts = discover_parts(args.inputs, args.rgb, args.xyz)
        if not parts:
            raise ValueError("no input parts: give folders and/or --rgb/--xyz pairs")
        log.info("model %s: %s, class %s; thresholds from %s: image %.6g, pixel %.6g", model.path,
                 model.method_name, model.class_name, thresholds.source, thresholds.image, thresholds.pixel)
        device = resolve_device(args.device)
        use_device(device)
        predictor = Predictor(model, device, args.rgb_checkpoint, args.xyz_checkpoint,
                              args.fusion_module_path)
        check_writable_folder(output, "--output")
    except (ModelFileError, CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FATAL

    for path in earlier:  # --overwrite: no table row or heatmap of the earlier run stays among the new ones
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    writer = ResultWriter(output, thresholds, pictures=not args.no_pictures, save_maps=args.save_maps,
                          resume=args.resume)
    writer.report_data = PredictionData(model.class_name, thresholds.image, thresholds.colour_range(),
                                        spool_folder=output / REPORT_DATA_DIR, normalise=thresholds.normalised)
    done = {row["name"] for row in finished}
    if finished:
        writer.report_data.resume(output, [row["name"] for row in finished if row["result"] != "error"])
        for row in finished:
            writer.counts[row["result"]] += 1
    todo = [part for part in parts if part.name not in done]
    try:
        score_parts(predictor, todo, writer, args)
    except KeyboardInterrupt:
        write_prediction_report(writer, model, thresholds, time.perf_counter() - start)
        return interrupted("m3dm-predict", f"{sum(writer.counts.values())} finished part(s) are kept in "
                                           f"{writer.csv_path}; run the same command with --resume to score the "
                                           f"others")
    counts, seconds = writer.counts, time.perf_counter() - start
    write_prediction_report(writer, model, thresholds, seconds)
    skipped = f" ({len(parts) - len(todo)} of them by an earlier run)" if args.resume else ""
    print(f"{len(parts)} parts{skipped}: {counts['pass']} pass, {counts['fail']} fail, {counts['error']} errors "
          f"in {seconds:.1f} s; results in {writer.csv_path}", file=sys.stderr)
    return EXIT_PART_ERRORS if counts["error"] else EXIT_OK


def score_parts(predictor: Predictor, parts: list[Part], writer: ResultWriter, args) -> None:
    """Read, score and write every part in turn, ``--batch_size`` at a time: a part's row is written as its batch
    ends, and nothing of the finished parts but their names and scores stays in memory (their report thumbnails go to
    a spool file: ``m3dm.report.data.PredictionData``)."""

    bar = tqdm(total=len(parts), desc="parts", unit="part", file=sys.stderr, disable=args.quiet)

    def report(part: Part, message: str) -> None:
        tqdm.write(f"error: {part.name}: {message}", file=sys.stderr)

    pending: list = []  # loaded parts and (part, message) pairs, in input order
    try:
        for part in parts:
            try:
                pending.append(load_part(part, predictor.img_size, args.preprocess))
            except Exception as exc:
                report(part, _describe(exc))
                pending.append((part, _describe(exc)))
            if sum(isinstance(item, LoadedPart) for item in pending) == args.batch_size:
                _flush(predictor, pending, writer, report)
                bar.update(len(pending))
                pending = []
        _flush(predictor, pending, writer, report)
        bar.update(len(pending))
    finally:
        bar.close()
        writer.close()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.resume and args.overwrite:
        parser.error("--resume keeps the earlier predictions, --overwrite deletes them: give one of them")
    try:
        with output_lock(args.output, "--output"):
            return run(args)
    except (DiskFullError, OutputInUseError) as exc:  # one line naming the file or folder
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
