"""Fit and evaluate one class after another (spec §1): pass 1, banks, pass 2, test, metrics, pictures."""

from __future__ import annotations

import random
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from m3dm.data.dataset import AnomalyDataset, make_loader
from m3dm.features.extractor import FeatureExtractor
from m3dm.detection.detector import Detector, DetectorConfig, ModalityScore, sample_cap
from m3dm.evaluation.metrics import compute_metrics


def seed_everything(seed: int) -> None:
    """As the reference does once per class (spec §12): Python, NumPy's global generator and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


@dataclass
class ClassResult:
    metrics: dict
    labels: np.ndarray
    image_scores: np.ndarray
    maps: np.ndarray  # (N, 224, 224) float32
    masks: np.ndarray  # (N, 224, 224) uint8
    names: list[str]
    rgb_paths: list[str]


class ClassRunner:
    """Everything for one class: the loaders, the detector, and the loops over samples."""

    def __init__(self, config: DetectorConfig, extractor: FeatureExtractor, dataset_root, class_name: str, *,
                 img_size: int = 224, batch_size: int = 1, num_workers: int = 0, max_sample: int = 400,
                 fusion_block=None, device="cpu", timer: StageTimer | None = None, progress: bool = True,
                 reextract_pass2: bool = False, save_feature_path: str | Path | None = None,
                 train_limit: int | None = None, spool_dir=None):
        self.config, self.extractor = config, extractor
        self.class_name = class_name
        self.root = Path(dataset_root)
        self.img_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.max_sample = max_sample
        self.detector = Detector(config, fusion_block=fusion_block, device=device, progress=progress,
                                 spool_dir=spool_dir)
        self.timer = timer or StageTimer()
        self.progress = progress
        self.reextract_pass2 = reextract_pass2
        self.save_feature_path = save_feature_path
        self.train_limit = train_limit  # at most this many training samples for the banks (threshold hold-out)

    def _loader(self, split: str, cap: int | None = None):
        dataset = AnomalyDataset(self.root, self.class_name, split, self.img_size)
        if cap is not None and cap < len(dataset):
            dataset = Subset(dataset, range(cap))
        return make_loader(dataset, self.batch_size, self.num_workers)

    def _batches(self, loader, desc: str):
        yield from tqdm(loader, desc=f"{self.class_name}: {desc}", unit="batch", disable=not self.progress,
                        file=sys.stderr, leave=False)

    def _extract(self, batch):
        return self.extractor(batch["rgb"] if self.detector.needs_rgb else None,
                              batch["pc"] if self.detector.needs_xyz else None, names=batch["name"])

    def fit(self) -> None:
        detector = self.detector
        cap = sample_cap(self.max_sample, self.config.fix_quirks)
        loader = self._loader("train", cap if self.train_limit is None else min(cap, self.train_limit))
        for batch in self._batches(loader, "pass 1 (memory)"):
            with self.timer("extract"):
                features = self._extract(batch)
            with self.timer("memory"):
                for sample in features:
                    if self.save_feature_path is not None:
                        self._dump(sample, detector.n_train)
                    detector.add(sample)
        with self.timer("coreset"):
            detector.finalize()
        if detector.uses_dlf:
            scores = self._pass2_reextracted(loader) if self.reextract_pass2 else self._pass2_reused()
            with self.timer("dlf fit"):
                detector.fit_fusion(scores)
        detector.release_training_samples()

    def _dump(self, sample, index: int) -> None:
        """``--save_feature``: the UFF pretraining input of one training sample (spec §7.3)."""
        from m3dm.uff.block import pretraining_features, save_pretraining_features

        rows = pretraining_features(sample.xyz, sample.rgb, sample.rgb_aligned(), aligned=self.config.fix_quirks)
        save_pretraining_features(self.save_feature_path, self.class_name, index, rows)

    def _pass2_reused(self) -> list[dict[str, ModalityScore]]:
        """Pass 2 on the pass-1 features kept with the banks (no second extraction)."""
        detector, scores = self.detector, []
        for index in tqdm(range(detector.n_train), desc=f"{self.class_name}: pass 2 (decision fusion)",
                          disable=not self.progress, file=sys.stderr, leave=False):
            with self.timer("pass 2 scoring"):
                scores.append(detector.modality_scores(detector.training_patches(index)))
        return scores

    def _pass2_reextracted(self, loader) -> list[dict[str, ModalityScore]]:
        """Pass 2 as the reference runs it: every training sample extracted again."""
        scores = []
        for batch in self._batches(loader, "pass 2 (decision fusion, re-extracting)"):
            with self.timer("extract"):
                features = self._extract(batch)
            with self.timer("pass 2 scoring"):
                scores += [self.detector.modality_scores(self.detector.modality_patches(f)) for f in features]
        return scores

    def _scored_batches(self, loader, desc: str, stage: str):
        """Yield ``(batch, image scores, (224, 224) float32 maps)`` for every batch of ``loader``."""
        for batch in self._batches(loader, desc):
            with self.timer("extract"):
                features = self._extract(batch)
            with self.timer(stage):
                predictions = [self.detector.predict(self.detector.modality_patches(f)) for f in features]
            yield batch, [score for score, _ in predictions], [m.numpy().astype(np.float32) for _, m in predictions]

    @torch.no_grad()
    def evaluate(self) -> ClassResult:
        labels, image_scores, maps, masks, names, paths = [], [], [], [], [], []
        for batch, scores, score_maps in self._scored_batches(self._loader("test"), "test", "test scoring"):
            image_scores += scores
            maps += score_maps
            masks.extend(batch["gt"][:, 0].numpy().astype(np.uint8))
            labels.extend(int(x) for x in batch["label"])
            names.extend(batch["name"])
            paths.extend(batch["rgb_path"])
        result = ClassResult({}, np.array(labels), np.array(image_scores), np.stack(maps), np.stack(masks),
                             names, paths)
        with self.timer("metrics"):
            result.metrics = compute_metrics(result.labels, result.image_scores, result.masks, result.maps)
        return result

    @torch.no_grad()
    def score_dataset(self, dataset, desc: str) -> tuple[np.ndarray, np.ndarray]:
        """Image scores ``(N,)`` and ``(N, 224, 224)`` float32 maps of every sample of ``dataset``, in order, with
        the fitted detector (the good parts that set a saved model's pass/fail thresholds)."""
        scores, maps = [], []
        loader = make_loader(dataset, self.batch_size, self.num_workers)
        for _, batch_scores, batch_maps in self._scored_batches(loader, desc, "threshold scoring"):
            scores += batch_scores
            maps += batch_maps
        return np.asarray(scores, dtype=np.float64), np.stack(maps)
