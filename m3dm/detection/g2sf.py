"""G2SF (Tao, Cao, Du, ICCV 2025): M3DM's RGB and point banks, fused per patch by a learned anisotropic distance.

Fitting one class (docs/g2sf.md): the two memory banks (RGB normalised by its own statistics, point bank as is,
10 % coresets), then ``--num_anomalies`` pseudo-anomalies synthesised from the training samples
(``m3dm.data.pseudo_anomaly``), their features from the run's extractor, the fusion dataset of their foreground
patches, and the Local Scale Prediction Network trained on it (``m3dm.detection.lspn``). A test patch's score is the
aggregated fused distance to its ``anchor + 1`` nearest coreset rows; the image score is the largest patch score.
Where this differs from the reference, and what ``--fix_quirks`` changes, is listed in docs/quirks.md ("G2SF").
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from m3dm.config import DetectorSettings
from m3dm.data.dataset import sample_tensors
from m3dm.data.pseudo_anomaly import PseudoAnomaly, PseudoAnomalySynthesiser, anomaly_sources, dilate
from m3dm.detection.interface import DetectorResources, SavesWholeState, TrainingData
from m3dm.detection.lspn import (
    NEIGHBOURS,
    FusionRows,
    LocalScaleNet,
    LSPNTraining,
    TrainingSettings,
    aggregate,
    fused_distance,
)
from m3dm.errors import DataError
from m3dm.features.extractor import XYZ_PATCH_GRID, SampleFeatures, required
from m3dm.memory.bank import BankRecipe, MemoryBank
from m3dm.memory.defaults import default_coreset
from m3dm.memory.maps import segmentation_map

MAP_SIZE = 224

log = logging.getLogger(__name__)


def training_settings(config: DetectorSettings) -> TrainingSettings:
    """The LSPN's training settings from the run's flags."""
    weights = {"svdd": 1.0, "margin": config.margin, "const": config.const, "perm": config.perm,
               "scaling": config.scaling, "l1": config.l1, "l2": config.l2}
    return TrainingSettings(epochs=config.max_epoch, batch_size=config.fusion_batch_size, lr=config.lr,
                            alpha=config.alpha, perc=config.perc, anchor=config.anchor, magnitude=config.magnitude,
                            weights=weights, hidden=tuple(int(w) for w in config.n_hidden.split(",")),
                            emb_dim=config.emb_dim, dropout=config.drop_out,
                            broadcast_const=not config.fix_quirks, skip_first_validation=not config.fix_quirks)


def upsample_rgb(rgb: Tensor, grid: int = XYZ_PATCH_GRID) -> Tensor:
    """``(h·w, C)`` RGB patches to ``(grid², C)`` by nearest interpolation (``feature_interpolation``)."""
    side = math.isqrt(rgb.shape[0])
    grid_map = rgb.T.reshape(1, rgb.shape[1], side, side)
    return F.interpolate(grid_map, size=(grid, grid), mode="nearest")[0].flatten(1).T


def patch_labels(gt: Tensor, grid: int = XYZ_PATCH_GRID) -> Tensor:
    """``(1, 224, 224)`` mask → ``(grid²,)`` labels, −1 anomalous, +1 normal: the mask dilated by 3 x 3, then
    nearest-resized to the patch grid (``get_anomaly_idx``)."""
    mask = torch.from_numpy(dilate(gt[0].numpy() > 0).astype(np.float32))[None, None]
    small = F.interpolate(mask, size=(grid, grid), mode="nearest").flatten()
    return torch.where(small > 0, -1, 1).long()


def nearest_rows(patches: Tensor, coreset: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(min distances (P,), indices of the k nearest coreset rows (P, k))`` by ``torch.cdist``, column 0 the
    argmin (``sample_score``)."""
    distances = torch.cdist(patches, coreset)
    min_dist, min_idx = distances.min(dim=1)
    indices = torch.topk(distances, k=min(k, coreset.shape[0]), dim=1, largest=False).indices
    indices[:, 0] = min_idx
    return min_dist, indices


class G2SFDetector(SavesWholeState):
    """One class's banks and LSPN: ``add`` each training sample's patches, ``finalize`` builds the coresets,
    synthesises the pseudo-anomalies and trains the LSPN, ``predict`` scores a test sample (a
    ``m3dm.detection.interface.ClassDetector`` without pass 2)."""

    method_title = "G2SF"

    uses_dlf = False
    fit_stage = "coreset, pseudo-anomalies and LSPN"
    needs_rgb = True
    needs_xyz = True

    def __init__(self, config: DetectorSettings, device: torch.device | str = "cpu", progress: bool = True,
                 spool_dir=None, training_data: TrainingData | None = None):
        self.config = config
        self.device = torch.device(device)
        self.progress = progress
        self.training_data = training_data
        coreset = default_coreset(self.device, config.coreset_fp16, config.coreset_shards)
        self.banks = {m: MemoryBank(self.device, spool_dir=spool_dir, coreset=coreset) for m in ("rgb", "xyz")}
        self.net: LocalScaleNet | None = None
        self.raw_global: Tensor | None = None
        self.score_mean: Tensor | None = None
        self.losses: list[float] = []
        self.best_epoch = -1
        self.n_train = 0

    @classmethod
    def build(cls, config: DetectorSettings, resources: DetectorResources) -> G2SFDetector:
        return cls(config, device=resources.device, progress=resources.progress, spool_dir=resources.spool_dir,
                   training_data=resources.training_data)

    @staticmethod
    def training_cap(config: DetectorSettings, max_sample: int) -> int:
        """Every training sample, as the reference (``--max_sample`` is M3DM's bank cap)."""
        return sys.maxsize

    # ---------------------------------------------------------------------------------------------- banks

    def modality_patches(self, features: SampleFeatures) -> dict[str, Tensor]:
        return {"rgb": required(features.rgb, "RGB patches"), "xyz": required(features.xyz, "point patches")}

    def add(self, features: SampleFeatures) -> None:
        for modality, patches in self.modality_patches(features).items():
            self.banks[modality].add(patches)
        self.n_train += 1

    def _build_banks(self) -> None:
        """RGB bank normalised by its own mean and std, point bank as is; 10 % coresets, RGB first (they share
        NumPy's generator in that order, ``Features.get_coreset``)."""
        cfg = self.config
        for modality in ("rgb", "xyz"):
            bank = self.banks[modality]
            mean, std = bank.stats() if modality == "rgb" else (None, None)
            recipe = BankRecipe(mean=mean, std=std, n_coreset=int(cfg.f_coreset * bank.rows),
                                projection_eps=cfg.coreset_eps, random_state=cfg.random_state)
            bank.finalize(recipe, progress=self.progress)

    def _features(self, patches: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(features (3136, C_rgb + C_xyz) on the device, background (3136,))`` of one sample."""
        rgb = upsample_rgb(self.banks["rgb"].normalise(patches["rgb"]))
        xyz = patches["xyz"].to(self.device, torch.float32)
        return torch.cat([rgb, xyz], dim=1), xyz.sum(dim=1) == 0

    # ------------------------------------------------------------------------------------ pseudo-anomalies

    def finalize(self) -> None:
        if self.n_train == 0:
            raise ValueError("G2SF has no training sample to build its memory banks from")
        data = self.training_data
        if data is None:
            raise ValueError("G2SF needs the training samples and the feature extractor to synthesise its "
                             "pseudo-anomalies (DetectorResources.training_data)")
        self._build_banks()
        rows = self.fusion_dataset(data)
        log.info("G2SF: %d fusion patches (%d anomalous)", rows.labels.shape[0], int((rows.labels == -1).sum()))
        generator = torch.Generator().manual_seed(data.seed)
        trained = LSPNTraining(rows, self.banks["rgb"].bank, self.banks["xyz"].bank, training_settings(self.config),
                               generator, self.device, self.progress).run()
        self.net, self.raw_global, self.score_mean = trained.net, trained.raw_global, trained.score_mean
        self.losses, self.best_epoch = trained.losses, trained.best_epoch

    def _synthesiser(self, data: TrainingData) -> PseudoAnomalySynthesiser:
        if data.anomaly_source is not None:
            try:
                sources = [Path(p) for p in json.loads(Path(data.anomaly_source).read_text())]
            except (OSError, ValueError, TypeError) as exc:
                raise DataError(f"{data.anomaly_source}: not a JSON list of point-cloud files ({exc})") from exc
        else:
            sources = anomaly_sources(data.root, data.classes, data.dataset_type)
        return PseudoAnomalySynthesiser(data.samples, sources, data.dataset_type, root=data.root,
                                        full_root=data.full_root, fix_quirks=self.config.fix_quirks)

    def _pseudo_samples(self, data: TrainingData):
        """The pseudo samples in order (``--num_normal`` augmented normal ones, then the anomalies)."""
        synthesiser = self._synthesiser(data)
        rng = np.random.default_rng(data.seed)
        total = self.config.num_normal + self.config.num_anomalies
        for index in tqdm(range(total), desc="G2SF: pseudo-anomalies", unit="sample", disable=not self.progress,
                          file=sys.stderr, leave=False):
            if index < self.config.num_normal:
                yield synthesiser.normal(rng, index)
            else:
                yield synthesiser.anomaly(rng)

    def fusion_dataset(self, data: TrainingData) -> FusionRows:
        """Features, nearest coreset rows, distances and labels of every foreground patch of every pseudo sample
        (``FusionDataCollector.collect``)."""
        parts: list[FusionRows] = []
        batch: list[tuple[Tensor, Tensor, Tensor, str]] = []
        for pseudo in self._pseudo_samples(data):
            batch.append(self._tensors(pseudo))
            if len(batch) == data.batch_size:
                parts += self._collect(batch, data)
                batch = []
        if batch:
            parts += self._collect(batch, data)
        return FusionRows(*(torch.cat([getattr(p, name) for p in parts]) for name in
                            ("features", "neighbours", "distances", "labels")))

    @staticmethod
    def _tensors(pseudo: PseudoAnomaly) -> tuple[Tensor, Tensor, Tensor, str]:
        mask = Image.fromarray(pseudo.mask.astype(np.uint8) * 255)
        where = f"pseudo-anomaly made from {pseudo.name}"
        rgb, pc, gt = sample_tensors(pseudo.cloud, Image.fromarray(pseudo.image), mask, MAP_SIZE, where,
                                     note=" (after the pseudo-anomaly's augmentation)")
        assert gt is not None  # a mask was given
        return rgb, pc, gt, where

    def _collect(self, batch, data: TrainingData) -> list[FusionRows]:
        rgb = torch.stack([b[0] for b in batch])
        pc = torch.stack([b[1] for b in batch])
        features = data.extract(rgb, pc, names=[b[3] for b in batch])
        return [self._rows(f, b[2]) for f, b in zip(features, batch)]

    @torch.no_grad()
    def _rows(self, features: SampleFeatures, gt: Tensor) -> FusionRows:
        rows, background = self._features(self.modality_patches(features))
        rgb_dim = self.banks["rgb"].bank.shape[1]
        distances, neighbours = [], []
        for part, modality in ((rows[:, :rgb_dim], "rgb"), (rows[:, rgb_dim:], "xyz")):
            min_dist, idx = nearest_rows(part, self.banks[modality].bank, NEIGHBOURS)
            distances.append(min_dist)
            neighbours.append(idx)
        keep = (~background).cpu()
        return FusionRows(rows.cpu()[keep], torch.cat(neighbours, dim=1).cpu()[keep],
                          torch.stack(distances, dim=1).cpu()[keep], patch_labels(gt)[keep])

    def release_training_samples(self) -> None:
        for bank in self.banks.values():
            bank.release_samples()

    # ------------------------------------------------------------------------------------------------ test

    def _trained(self) -> tuple[LocalScaleNet, Tensor, Tensor]:
        if self.net is None or self.raw_global is None or self.score_mean is None:
            raise RuntimeError("G2SF is not trained: run finalize first")
        return self.net, self.raw_global, self.score_mean

    @torch.no_grad()
    def patch_scores(self, patches: dict[str, Tensor]) -> Tensor:
        """``(3136,)`` scores of one sample's patches: fused distances to the ``anchor + 1`` nearest coreset rows
        (the i-th RGB with the i-th point neighbour), aggregated by ``--scoring_mode``."""
        net, raw_global, score_mean = self._trained()
        features, background = self._features(patches)
        rgb_core, xyz_core = self.banks["rgb"].bank, self.banks["xyz"].bank
        rgb_dim = rgb_core.shape[1]
        k = min(self.config.anchor + 1, rgb_core.shape[0], xyz_core.shape[0])  # tiny banks have fewer rows
        rgb_idx = torch.topk(torch.cdist(features[:, :rgb_dim], rgb_core), k, dim=1, largest=False).indices
        xyz_idx = torch.topk(torch.cdist(features[:, rgb_dim:], xyz_core), k, dim=1, largest=False).indices
        scores = [fused_distance(net, features, torch.cat([rgb_core[rgb_idx[:, i]], xyz_core[xyz_idx[:, i]]], 1),
                                 score_mean, raw_global, rgb_dim, background).value[:, 0] for i in range(k)]
        return aggregate(torch.stack(scores, dim=1), self.config.scoring_mode)

    def predict(self, patches: dict[str, Tensor]) -> tuple[float, Tensor]:
        """Image score (the largest patch score) and ``(224, 224)`` float32 map of one sample."""
        scores = self.patch_scores(patches)
        score_map = segmentation_map(scores, XYZ_PATCH_GRID, MAP_SIZE, blur=self.config.blur)
        return float(scores.max()), score_map.reshape(MAP_SIZE, MAP_SIZE).float().cpu()

    # ---------------------------------------------------------------------------------- saving and loading

    def to_state(self) -> dict:
        net, raw_global, score_mean = self._trained()
        return {"family": "g2sf", "banks": {m: bank.export_state() for m, bank in self.banks.items()},
                "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "raw_global": raw_global.detach().cpu(), "score_mean": score_mean.detach().cpu(),
                "losses": list(self.losses), "best_epoch": self.best_epoch, "n_train": self.n_train}

    @classmethod
    def from_state(cls, config: DetectorSettings, state: dict, device: torch.device | str = "cpu",
                   progress: bool = True) -> G2SFDetector:
        """A trained detector from ``to_state``; it scores bit-identically to the one it was taken from."""
        if state.get("family") != "g2sf":
            raise ValueError("the saved detector is not a G2SF one")
        detector = cls(config, device=device, progress=progress)
        detector.banks = {m: MemoryBank.from_state(state["banks"][m], detector.device) for m in ("rgb", "xyz")}
        settings = training_settings(config)
        dim = detector.banks["rgb"].bank.shape[1] + detector.banks["xyz"].bank.shape[1]
        net = LocalScaleNet(dim, settings.hidden, settings.emb_dim, settings.dropout)
        net.load_state_dict(state["net"])
        detector.net = net.to(detector.device).eval()
        detector.raw_global = state["raw_global"].to(detector.device)
        detector.score_mean = state["score_mean"].to(detector.device)
        detector.losses = [float(v) for v in state["losses"]]
        detector.best_epoch = int(state["best_epoch"])
        detector.n_train = int(state["n_train"])
        return detector
