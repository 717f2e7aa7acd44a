"""The run of ``main.py`` (docs/original.md: Run): every class in turn (``run_classes``) and one class (``ClassRun``).

The classes are shared among processes under torchrun (m3dm.app.processes). One class goes from fitting (pass 1,
banks, pass 2) or loading a saved model to the test metrics, pictures and saved models.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from m3dm.app import processes
from m3dm.app.class_results import ClassOutput, finished_classes, save_class_output
from m3dm.app.outputs import check_before_fitting
from m3dm.config import CONFIG_FILE_NAME, BackboneSettings, RunSettings, Settings, settings_yaml
from m3dm.constants import CLASSES_BY_DATASET
from m3dm.data import available_classes
from m3dm.data.dataset import AnomalyDataset, make_loader
from m3dm.data.io import write_text
from m3dm.data.layout import masks_available
from m3dm.detection.factory import build_detector, detector_from_model, training_cap
from m3dm.detection.interface import ClassDetector, DetectorResources, FusionDetector, TrainingData, fusion_pass
from m3dm.detection.persistence import (
    MODELS_DIR,
    Setup,
    WeightRecord,
    load_class_model,
    make_setup,
    model_path,
    weight_record,
)
from m3dm.detection.thresholds import Thresholds, ThresholdSamples, choose_threshold_samples, threshold_dataset
from m3dm.evaluation.metrics import metrics_and_pro_curve
from m3dm.evaluation.results import ClassResult, per_sample_rows, save_prediction_pictures, save_score_maps
from m3dm.evaluation.tables import class_line, results_tables, write_per_sample, write_results
from m3dm.features.extractor import FeatureExtractor, build_extractor
from m3dm.report.build import try_build_report
from m3dm.report.data import REPORT_DATA_DIR, run_record, save_class_data
from m3dm.runtime import resolve_device, seed_everything, start_processes, stop_processes, use_device
from m3dm.uff.block import load_fusion_block
from m3dm.uff.dumps import pretraining_features, save_pretraining_features

log = logging.getLogger(__name__)


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def report(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        return f"time: {parts} (total {total:.1f}s)"


# ------------------------------------------------------------------------------------------ every class

def run_classes(settings: Settings, progress: bool = True) -> dict[str, dict]:
    """Fit (or load) and evaluate every class; print the tables, write them, the JSON record and the per-sample
    results (``per_sample.csv``/``.json``). Returns the metrics by class (on the main process; ``{}`` on the
    others). Each class's results are written as it ends (``classes/<class>.json``, m3dm.app.class_results);
    ``--resume`` skips the classes found there.

    Under ``torchrun --nproc_per_node=N`` each process takes every N-th class and process 0 gathers the results
    into the same tables (m3dm.app.processes).
    """
    workers = start_processes(cuda=False)  # gloo: only the small per-class results travel between processes
    device = resolve_device(settings.run.device, workers.local_rank)
    use_device(device)
    classes = dataset_classes(settings.run)
    output_dir = Path(settings.run.output_dir)
    done = finished_classes(output_dir, classes, settings) if settings.run.resume else {}
    # missing classes, unusable data, unwritable folders, missing models: found before any fitting
    check_before_fitting(settings, classes, finished=done)
    if workers.is_main:  # rerunning with --config <output_dir>/config.yaml repeats this run
        write_text(output_dir / CONFIG_FILE_NAME, settings_yaml(settings))
    skipped = processes.gather(sorted(done), workers)[0]  # process 0's list: read before any class is written
    if settings.run.resume and workers.is_main:
        log.info("--resume: %d finished class(es) in %s skipped: %s", len(skipped), output_dir / "classes",
                 ", ".join(skipped) or "none")
    seed_everything(settings.run.seed)  # random backbone weights are drawn from it
    extractor, fusion_block = build_models(settings, device)
    models = settings.models
    setup = None
    if models.save_model or models.load_model is not None:
        setup = run_setup(settings, extractor, fusion_block)
    models_dir = Path(models.load_model) if models.load_model else output_dir / MODELS_DIR
    mine = {}
    for class_name in processes.share([c for c in classes if c not in skipped], workers):
        timer = StageTimer()  # this class's stages, kept with its results
        class_run = ClassRun(settings, class_name, extractor, fusion_block, device=device, timer=timer,
                             progress=progress)
        mine[class_name] = class_run.run(models_dir, setup, output_dir)
        mine[class_name].timings = dict(timer.seconds)
        save_class_output(output_dir, class_name, mine[class_name], settings)  # kept if a later class fails
    gathered = processes.gather(mine, workers)
    stop_processes()
    if not workers.is_main:
        return {}
    ran = {c: output for results in gathered for c, output in results.items()}
    outputs = {c: done[c] if c in done else ran[c] for c in classes}
    per_class = {c: output.metrics for c, output in outputs.items()}
    total = StageTimer()  # every class's stages, the resumed ones' included (as they were measured then)
    for output in outputs.values():
        for stage, seconds in output.timings.items():
            total.seconds[stage] += seconds
    method = settings.detector.method_name
    for text in results_tables(method, per_class).values():
        print(f"\n{text}")
    record = dict(settings.flags(), device_used=str(device), processes=workers.world,
                  **run_record((setup or run_setup(settings, extractor, fusion_block)).plain_weights()))
    paths = write_results(output_dir, method, per_class, record, dict(total.seconds))
    paths.update(write_per_sample(output_dir, [row for output in outputs.values() for row in output.samples]))
    paths.update(try_build_report(output_dir))  # from the files just written: python -m m3dm.report does the same
    log.info("\n%s%s", total.report(), f" summed over {workers.world} processes" if workers.world > 1 else "")
    log.info("results written to %s (%s)", output_dir.resolve(), ", ".join(p.name for p in paths.values()))
    return per_class


def dataset_classes(run: RunSettings, every: bool = False) -> list[str]:
    """``--classes`` (unless ``every``), else the dataset's classes in the reference's order (then any others,
    sorted)."""
    if run.classes and not every:
        return list(run.classes)
    present = set(available_classes(run.dataset_path))
    reference = [c for c in CLASSES_BY_DATASET[run.dataset_type] if c in present]
    return reference or sorted(present)


def build_models(settings: Settings, device) -> tuple[FeatureExtractor, torch.nn.Module | None]:
    """The backbones the method needs (local checkpoint files, or random weights with --random_init) in a
    feature extractor, and the UFF block with --use_uff."""
    spec = settings.detector.spec
    extractor = build_extractor(settings.backbones, needs_rgb=spec.needs_rgb, needs_xyz=spec.needs_xyz,
                                device=device, seed=settings.run.seed, clamp_pfa=settings.detector.fix_quirks,
                                method=spec)
    fusion_block = None
    if settings.uff.use_uff:
        if extractor.rgb_backbone is None:
            raise ValueError("--use_uff needs a method with the RGB backbone")
        fusion_block = load_fusion_block(settings.uff.fusion_module_path, device,
                                         rgb_dim=extractor.rgb_backbone.feature_dim)
    return extractor, fusion_block


def weight_records(extractor: FeatureExtractor, backbones: BackboneSettings, seed: int, fusion_block=None,
                   fusion_path: str | Path | None = None) -> dict[str, WeightRecord]:
    """Where the weights of the extractor's backbones (and the UFF block) came from, by kind (rgb, xyz, fusion):
    what a saved model records and a loaded one must match (``persistence.weight_record``)."""
    records = {}
    if extractor.rgb_backbone is not None:
        name = getattr(extractor.rgb_backbone, "backbone_name", backbones.rgb_backbone_name)  # BTF: its own
        records["rgb"] = weight_record(extractor.rgb_backbone, name, seed, extractor.rgb_backbone.checkpoint_path)
    if extractor.point_backbone is not None:
        records["xyz"] = weight_record(extractor.point_backbone, backbones.xyz_backbone_name, seed,
                                       extractor.point_backbone.checkpoint_path)
    if fusion_block is not None:
        records["fusion"] = weight_record(fusion_block, "UFF", seed, fusion_path)
    return records


def run_setup(settings: Settings, extractor: FeatureExtractor, fusion_block=None) -> Setup:
    """The setup of this run: what a model fitted by it records, and what a loaded model must match."""
    weights = weight_records(extractor, settings.backbones, settings.run.seed, fusion_block,
                             settings.uff.fusion_module_path if fusion_block is not None else None)
    return make_setup(settings.detector.method_name, settings.detector.to_record(), settings.recorded(), weights)


# -------------------------------------------------------------------------------------------- one class

class ClassRun:
    """One class: fit its detector (or load a saved one), save it with pass/fail thresholds, evaluate the test
    split. Built from the run's settings, the feature extractor and the UFF block (None without --use_uff)."""

    def __init__(self, settings: Settings, class_name: str, extractor: FeatureExtractor, fusion_block=None, *,
                 device="cpu", timer: StageTimer | None = None, progress: bool = True):
        self.settings, self.class_name = settings, class_name
        self.extractor, self.fusion_block = extractor, fusion_block
        self.device = device
        self.timer = timer or StageTimer()
        self.progress = progress
        self.root = Path(settings.run.dataset_path)
        self.detector: ClassDetector | None = None  # made by fit or load
        self.thresholds: Thresholds | None = None  # set by save or load (a model file's pass/fail thresholds)

    def run(self, models_dir: Path, setup: Setup | None, output_dir: Path) -> ClassOutput:
        """The class as main.py runs it: seed, fit or load, save, evaluate, write outputs; returns the metrics
        and the per-sample rows (pass/fail with a saved or loaded model's thresholds)."""
        settings = self.settings
        self.start()
        path = model_path(models_dir, self.class_name)
        if settings.models.load_model is not None:
            with self.timer("load model"):
                self.load(path, setup)
        else:
            self.fit()
        if settings.models.save_model:
            if setup is None:
                raise ValueError("--save_model needs the run's setup")
            with self.timer("thresholds and saving"):
                saved = self.save(path, setup)
            log.info("  model saved: %s (thresholds from %s: image %.6g, pixel %.6g)", path, saved.source,
                     saved.image, saved.pixel)
        result = self.evaluate()
        print(class_line(self.class_name, settings.detector.method_name, result.metrics), flush=True)
        if settings.run.save_maps:
            log.info("  maps: %s", save_score_maps(result, output_dir / "maps" / f"{self.class_name}.npz"))
        if settings.run.save_preds:
            with self.timer("pictures"):
                folder = save_prediction_pictures(result, output_dir / "pred_maps" / self.class_name)
            log.info("  prediction pictures: %s", folder)
        thresholds = self.thresholds
        samples = per_sample_rows(result, thresholds.fails if thresholds is not None else None,
                                  thresholds.image if thresholds is not None else None)
        with self.timer("report data"):  # what report.html needs once the dataset and the models are gone
            save_class_data(result, samples, output_dir / REPORT_DATA_DIR / f"{self.class_name}.npz")
        return ClassOutput(result.metrics, samples)

    def start(self) -> None:
        """Seed Python, NumPy, torch and the extractor's DropPath draws, once per class, as the reference."""
        seed_everything(self.settings.run.seed)
        self.extractor.reseed(self.settings.run.seed)

    # ------------------------------------------------------------------------------------------- fitting

    @cached_property
    def good_parts(self) -> ThresholdSamples:
        """The good parts that set a saved model's pass/fail thresholds (``thresholds.choose_threshold_samples``)."""
        return choose_threshold_samples(self.root, self.class_name, self._train_cap())

    def _train_cap(self) -> int:
        return training_cap(self.settings.detector, self.settings.run.max_sample)

    def fit(self) -> None:
        """Pass 1 into the banks, their coreset, and with decision layer fusion pass 2 and the SVMs."""
        cap = self._train_cap()
        if self.settings.models.save_model and self.good_parts.train_limit is not None:
            cap = min(cap, self.good_parts.train_limit)  # the threshold parts stay out of the banks
        train = self._dataset("train")
        loader = self._loader("train", cap, dataset=train)
        self.detector = detector = build_detector(self.settings.detector, self._resources(
            spool_dir=self.settings.run.spool_folder, training_data=self._training_data(train.samples[:cap])))
        dump = self.settings.run.save_feature
        for batch in self._batches(loader, "pass 1 (memory)"):
            with self.timer("extract"):
                features = self._extract(batch)
            with self.timer("memory"):
                for sample in features:
                    if dump:
                        self._dump(sample, detector.n_train)
                    detector.add(sample)
        with self.timer(detector.fit_stage):
            detector.finalize()
        fusing = fusion_pass(detector)
        if fusing is not None:
            if self.settings.run.dlf_reextract:
                scores = self._pass2_reextracted(fusing, loader)
            else:
                scores = self._pass2_reused(fusing)
            with self.timer("dlf fit"):
                fusing.fit_fusion(scores)
        detector.release_training_samples()

    def _dump(self, sample, index: int) -> None:
        """``--save_feature``: the UFF pretraining input of one training sample."""
        rows = pretraining_features(sample.xyz, sample.rgb, sample.rgb_aligned(),
                                    aligned=self.settings.detector.fix_quirks)
        save_pretraining_features(self.settings.run.save_feature_path, self.class_name, index, rows)

    def _resources(self, spool_dir: str | None = None, training_data: TrainingData | None = None
                   ) -> DetectorResources:
        return DetectorResources(device=self.device, progress=self.progress, fusion_block=self.fusion_block,
                                 spool_dir=spool_dir, training_data=training_data)

    def _training_data(self, samples: list) -> TrainingData:
        """The training samples the detector is fitted on, as files, with the extractor (G2SF's pseudo-anomalies)."""
        run = self.settings.run
        return TrainingData(
            self.root, run.dataset_type, tuple(samples), tuple(dataset_classes(run, every=True)),
            self.extractor, seed=run.seed, batch_size=run.batch_size,
            full_root=None if run.g2sf_full_dataset_path is None else Path(run.g2sf_full_dataset_path),
            anomaly_source=None if run.g2sf_anomaly_source is None else Path(run.g2sf_anomaly_source))

    def _pass2_reused(self, detector: FusionDetector) -> list:
        """Pass 2 on the pass-1 features kept with the banks (no second extraction)."""
        scores = []
        for index in tqdm(detector.fusion_samples(), desc=f"{self.class_name}: pass 2 (decision fusion)",
                          disable=not self.progress, file=sys.stderr, leave=False):
            with self.timer("pass 2 scoring"):
                scores.append(detector.modality_scores(detector.training_patches(index)))
        return scores

    def _pass2_reextracted(self, detector: FusionDetector, loader) -> list:
        """Pass 2 as the reference runs it: every training sample extracted again."""
        scores = []
        chosen, index = set(detector.fusion_samples()), 0
        for batch in self._batches(loader, "pass 2 (decision fusion, re-extracting)"):
            with self.timer("extract"):  # every sample, so the extractor's random draws stay those of a full pass
                features = self._extract(batch)
            with self.timer("pass 2 scoring"):
                scores += [detector.modality_scores(detector.modality_patches(f))
                           for i, f in enumerate(features, start=index) if i in chosen]
            index += len(features)
        return scores

    # ----------------------------------------------------------------------------------- saved models

    def save(self, path: Path, setup: Setup) -> Thresholds:
        """After fitting: set the pass/fail thresholds on the good parts and save the detector to ``path``.

        The extractor's random state is restored after scoring the good parts, so the evaluation that follows
        gives the same scores as a run without ``--save_model``; the saved state is the one right after fitting.
        """
        fitted_state = self.extractor.rng_state()
        thresholds = self.set_thresholds()
        self.fitted_detector.save(path, class_name=self.class_name, setup=setup, rng_state=fitted_state,
                                  thresholds=thresholds, provenance=self.provenance())
        return thresholds

    def set_thresholds(self) -> Thresholds:
        """After fitting: the pass/fail thresholds from the good parts' scores and maps (``self.thresholds``);
        the extractor's random state is left as it was before scoring them."""
        models, good_parts = self.settings.models, self.good_parts
        fitted_state = self.extractor.rng_state()
        dataset = threshold_dataset(good_parts, self.root, self.class_name, self.settings.backbones.img_size)
        scores, maps = self.score_dataset(dataset, "good parts (thresholds)")
        self.extractor.set_rng_state(fitted_state)
        self.thresholds = Thresholds.from_good_parts(scores, maps, models.far, models.pixel_far,
                                                     good_parts.description)
        return self.thresholds

    def provenance(self) -> dict:
        """Where and how the detector was fitted, as a model file records it."""
        return {"dataset_path": str(self.root.resolve()), "device": str(self.device),
                "n_train": self.fitted_detector.n_train, "batch_size": self.settings.run.batch_size}

    def load(self, path: Path, setup: Setup | None) -> None:
        """``--load_model``: the saved detector, verified against this run's method, class and setup, and the
        extractor's random state as it was right after fitting."""
        model = load_class_model(path, self.settings.detector.method_name, class_name=self.class_name, setup=setup)
        self.detector = detector_from_model(model, self._resources())
        self.thresholds = model.thresholds
        if model.generator_state is not None:
            self.extractor.set_rng_state(model.generator_state)

    # ----------------------------------------------------------------------------------------- scoring

    @property
    def fitted_detector(self) -> ClassDetector:
        if self.detector is None:
            raise RuntimeError(f"{self.class_name}: no detector yet (fit or load it first)")
        return self.detector

    def _dataset(self, split: str) -> AnomalyDataset:
        return AnomalyDataset(self.root, self.class_name, split, self.settings.backbones.img_size)

    def _loader(self, split: str, cap: int | None = None, dataset: AnomalyDataset | None = None):
        dataset = dataset if dataset is not None else self._dataset(split)
        samples: Dataset = dataset
        if cap is not None and cap < len(dataset):
            samples = Subset(dataset, range(cap))
        return make_loader(samples, self.settings.run.batch_size, self.settings.run.num_workers,
                           pin_memory=torch.device(self.device).type == "cuda")

    def _batches(self, loader, desc: str):
        yield from tqdm(loader, desc=f"{self.class_name}: {desc}", unit="batch", disable=not self.progress,
                        file=sys.stderr, leave=False)

    def _extract(self, batch):
        return self.extractor(batch["rgb"] if self.fitted_detector.needs_rgb else None,
                              batch["pc"] if self.fitted_detector.needs_xyz else None, names=batch["name"])

    def _scored_batches(self, loader, desc: str, stage: str, extract_stage: str = "extract"):
        """Yield ``(batch, image scores, (224, 224) float32 maps)`` for every batch of ``loader``."""
        for batch in self._batches(loader, desc):
            with self.timer(extract_stage):
                features = self._extract(batch)
            with self.timer(stage):
                detector = self.fitted_detector
                predictions = [detector.predict(detector.modality_patches(f)) for f in features]
            yield batch, [score for score, _ in predictions], [m.numpy().astype(np.float32) for _, m in predictions]

    @torch.no_grad()
    def evaluate(self) -> ClassResult:
        """Scores, maps and metrics of the test split with the fitted (or loaded) detector."""
        labels: list[int] = []
        image_scores, maps, masks, names, paths, xyz_paths = [], [], [], [], [], []
        dataset = self._dataset("test")
        for batch, scores, score_maps in self._scored_batches(self._loader("test", dataset=dataset), "test",
                                                               "test scoring",
                                                               extract_stage="test extract"):
            image_scores += scores
            maps += score_maps
            masks.extend(batch["gt"][:, 0].numpy().astype(np.uint8))
            labels.extend(int(x) for x in batch["label"])
            names.extend(batch["name"])
            paths.extend(batch["rgb_path"])
            xyz_paths.extend(batch["xyz_path"])
        result = ClassResult({}, np.array(labels), np.array(image_scores), np.stack(maps), np.stack(masks),
                             names, paths, xyz_paths, pro_thresholds=self.settings.detector.spec.pro_thresholds)
        with self.timer("metrics"):
            result.metrics, result.pro_curve = metrics_and_pro_curve(
                result.labels, result.image_scores, result.masks, result.maps, masks_available(dataset.samples),
                name=self.class_name, num_thresholds=result.pro_thresholds)
        return result

    @torch.no_grad()
    def score_dataset(self, dataset, desc: str) -> tuple[np.ndarray, np.ndarray]:
        """Image scores ``(N,)`` and ``(N, 224, 224)`` float32 maps of every sample of ``dataset``, in order, with
        the fitted detector (the good parts that set a saved model's pass/fail thresholds)."""
        scores, maps = [], []
        loader = make_loader(dataset, self.settings.run.batch_size, self.settings.run.num_workers,
                           pin_memory=torch.device(self.device).type == "cuda")
        for _, batch_scores, batch_maps in self._scored_batches(loader, desc, "threshold scoring"):
            scores += batch_scores
            maps += batch_maps
        return np.asarray(scores, dtype=np.float64), np.stack(maps)
