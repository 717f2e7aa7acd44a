"""The detector of one class: memory banks, decision layer fusion, scoring, saving and loading (docs/original.md).

Every method is this one class: the differences the reference spreads over six classes are data
(``m3dm.config.METHODS``), its settings a ``m3dm.config.DetectorSettings``. A fitted detector saves itself to a
class-model file and loads from one (``save`` / ``from_model``; the file format is ``m3dm.detection.persistence``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from m3dm.config import BANK_ORDER, CONCAT, DetectorSettings
from m3dm.detection.dlf import DecisionLayerFusion
from m3dm.detection.interface import DEFAULT_RESOURCES, DetectorResources
from m3dm.detection.persistence import ClassModel, Setup, save_class_model
from m3dm.detection.thresholds import Thresholds
from m3dm.errors import ModelFileError
from m3dm.features.extractor import XYZ_PATCH_GRID, SampleFeatures, required
from m3dm.memory.bank import BankRecipe, MemoryBank
from m3dm.memory.defaults import default_coreset, default_search
from m3dm.memory.maps import segmentation_map

MAP_SIZE = 224  # score maps and masks are 224 x 224, as in the reference

log = logging.getLogger(__name__)


@dataclass
class ModalityScore:
    score: float  # re-weighted image score of one modality
    score_map: torch.Tensor  # (224, 224) blurred segmentation map


class Detector:
    """Memory banks of one class: pass 1 (``add``), ``finalize`` (normalise + coreset), pass 2 (``fit_fusion``,
    decision layer fusion) and ``predict`` (image score and 224 x 224 map of a test sample). A
    ``m3dm.detection.interface.FusionDetector``."""

    fit_stage = "coreset"  # what finalize does, as the run's timings name it

    def __init__(self, config: DetectorSettings, fusion_block=None, device="cpu", progress: bool = True,
                 spool_dir=None):
        self.config = config
        self.progress = progress
        self.spec = config.spec
        if self.spec.needs_uff and fusion_block is None:
            raise ValueError(f"{config.method_name} needs the UFF fusion block (--use_uff)")
        self.fusion_block = fusion_block
        self.device = torch.device(device)
        coreset = default_coreset(self.device, self.config.coreset_fp16, self.config.coreset_shards,
                                   self.config.coreset_shard_rows)
        # banks live on the run's device: every nearest-neighbour search runs where the features are
        self.banks = {m: MemoryBank(self.device, spool_dir=spool_dir, coreset=coreset,
                                    search=default_search(self.device, config.bank_search),
                                    max_rows_per_sample=config.bank_rows_per_sample)
                      for m in self.spec.modalities}
        self.dlf: DecisionLayerFusion | None = None
        self.rgb_grid: int | None = None
        self._late_xyz: dict[int, torch.Tensor] = {}  # xyz patches of samples beyond --asy_memory_bank
        self.n_train = 0

    @classmethod
    def build(cls, config: DetectorSettings, resources: DetectorResources) -> Detector:
        return cls(config, resources.fusion_block, device=resources.device, progress=resources.progress,
                   spool_dir=resources.spool_dir)

    @staticmethod
    def training_cap(config: DetectorSettings, max_sample: int) -> int:
        """Training samples per pass (``sample_cap``: ``max_sample + 1`` as the reference, quirk 35)."""
        return sample_cap(max_sample, config.fix_quirks)

    # ------------------------------------------------------------------------------------------- features

    @property
    def needs_rgb(self) -> bool:
        return self.spec.needs_rgb

    @property
    def needs_xyz(self) -> bool:
        return self.spec.needs_xyz

    def _fuse(self, xyz: torch.Tensor, rgb_aligned: torch.Tensor) -> torch.Tensor:
        block = self.fusion_block
        param = next(block.parameters())
        with torch.no_grad():
            fused = block.feature_fusion(xyz.to(param.device, param.dtype), rgb_aligned.to(param.device, param.dtype))
        return fused.float().cpu()

    def modality_patches(self, features: SampleFeatures) -> dict[str, torch.Tensor]:
        patches = {}
        if "xyz" in self.spec.modalities:
            patches["xyz"] = required(features.xyz, "point patches")
        if "rgb" in self.spec.modalities:
            patches["rgb"] = required(features.rgb, "RGB patches")
        if "fusion" in self.spec.modalities:
            patches["fusion"] = self._fuse(required(features.xyz, "point patches"), features.rgb_aligned())
        if CONCAT in self.spec.modalities:  # BTF: both on the same grid, RGB channels first
            patches[CONCAT] = torch.cat((required(features.rgb, "RGB patches"),
                                         required(features.xyz, "point patches")), dim=1)
        return patches

    # --------------------------------------------------------------------------------------------- pass 1

    def add(self, features: SampleFeatures) -> None:
        """Pass 1: append one training sample's patches to the banks."""
        if features.rgb_map is not None:
            self.rgb_grid = features.rgb_map.shape[-1]
        cap = self.config.asy_memory_bank
        capped = cap is not None and "xyz" in self.banks and self.banks["xyz"].n_samples >= cap
        if capped:  # the reference keeps xyz and fusion banks to the first `cap` samples
            self.banks["rgb"].add(required(features.rgb, "RGB patches"))
            self._late_xyz[self.n_train] = required(features.xyz, "point patches")
        else:
            for modality, patches in self.modality_patches(features).items():
                self.banks[modality].add(patches)
        self.n_train += 1

    def finalize(self) -> None:
        """Normalise and subsample every bank (docs/original.md: Methods)."""
        cfg, spec = self.config, self.spec
        stats: dict[str, tuple[Any, Any]] = dict.fromkeys(self.banks, (None, None))
        if spec.own_stats or (spec.shared_stats and cfg.fix_quirks):
            stats = {m: self.banks[m].stats() for m in self.banks}
        elif spec.shared_stats:  # quirk 26: mean of the xyz bank, std of the rgb bank, for every bank
            shared = (self.banks["xyz"].stats()[0], self.banks["rgb"].stats()[1])
            stats = dict.fromkeys(self.banks, shared)
        reduce = cfg.f_coreset < 1
        n_xyz: int | None = None
        for modality in BANK_ORDER:  # the reference's order: it shares numpy's global RNG
            if modality not in self.banks:
                continue
            bank = self.banks[modality]
            drop_zero = modality == "xyz" and cfg.method_name == "Point_MAE" and cfg.rm_zero_for_project
            fraction = None
            if not reduce:
                n = None
            elif drop_zero:  # 10 % of the rows left after dropping the empty patches
                n, fraction = None, cfg.f_coreset
            elif modality == "xyz" or not spec.shared_stats or cfg.fix_quirks:
                n = int(cfg.f_coreset * bank.rows)
            else:  # quirk 27: rgb and fusion keep 10 % of the reduced xyz bank
                assert n_xyz is not None  # shared statistics come with an xyz bank, reduced first (BANK_ORDER)
                n = int(cfg.f_coreset * n_xyz)
            if modality == "xyz":
                n_xyz = n if n is not None else bank.rows
            triple_zero_rows = (modality == "xyz" and cfg.method_name == "DINO+Point_MAE+Fusion"
                                and not cfg.fix_quirks)  # quirk 28
            mean, std = stats[modality]
            recipe = BankRecipe(mean=mean, std=std, n_coreset=n, f_coreset=fraction, drop_zero_rows_before=drop_zero,
                                drop_zero_rows_after=drop_zero or triple_zero_rows,
                                append_zero_row=drop_zero or triple_zero_rows, keep_samples=self.uses_dlf,
                                projection_eps=cfg.coreset_eps, random_state=cfg.random_state)
            bank.finalize(recipe, progress=self.progress)

    # ------------------------------------------------------------------------------------------- scoring

    def _grid(self, modality: str) -> int:
        if self.spec.patch_grid is not None:  # one grid for every bank (BTF)
            return self.spec.patch_grid
        return self._rgb_grid() if modality == "rgb" else XYZ_PATCH_GRID

    def _rgb_grid(self) -> int:
        if self.rgb_grid is None:
            raise RuntimeError("the RGB patch grid is known once a sample with RGB features was added")
        return self.rgb_grid

    def modality_scores(self, patches: dict[str, torch.Tensor]) -> dict[str, ModalityScore]:
        out = {}
        for modality, rows in patches.items():
            score, min_dist = self.banks[modality].score(rows, eps=self.spec.eps, divisor=self.spec.divisor)
            score_map = segmentation_map(min_dist, self._grid(modality), MAP_SIZE, blur=self.config.blur)
            out[modality] = ModalityScore(float(score), score_map.reshape(MAP_SIZE, MAP_SIZE).cpu())
        return out

    def _dlf_inputs(self, scores: dict[str, ModalityScore]) -> tuple[np.ndarray, np.ndarray]:
        weights = {m: self.config.lambdas.of(m) for m in self.spec.modalities}
        vector = np.array([[weights[m][0] * scores[m].score for m in self.spec.modalities]])
        pixels = torch.stack([weights[m][1] * scores[m].score_map.reshape(-1) for m in self.spec.modalities],
                             dim=1)
        return vector, pixels.numpy()

    # --------------------------------------------------------------------------------------------- pass 2

    @property
    def uses_dlf(self) -> bool:
        return self.config.uses_dlf

    def fusion_samples(self) -> list[int]:
        """The training samples pass 2 scores: every one, or ``--fusion_samples`` of them evenly spaced."""
        return evenly_spaced(self.n_train, self.config.fusion_samples)

    def training_patches(self, index: int) -> dict[str, torch.Tensor]:
        """Pass-1 patches of training sample ``index``, as they were before normalisation (reused in pass 2
        instead of extracting the sample again)."""
        patches = {}
        for modality in self.spec.modalities:
            bank = self.banks[modality]
            if modality != "rgb" and index in self._late_xyz:
                continue
            patches[modality] = bank.sample(index)
        if index in self._late_xyz:
            xyz = self._late_xyz[index]
            if "xyz" in self.spec.modalities:
                patches["xyz"] = xyz
            if "fusion" in self.spec.modalities:
                rgb = patches["rgb"]
                grid = self._rgb_grid()
                rgb_map = rgb.T.reshape(-1, grid, grid)
                patches["fusion"] = self._fuse(xyz, SampleFeatures(rgb_map=rgb_map).rgb_aligned())
        return patches

    def fit_fusion(self, training_scores: list[dict[str, ModalityScore]]) -> None:
        """Pass 2: fit the two one-class SVMs on the training samples' modality scores."""
        vectors, pixels = zip(*(self._dlf_inputs(s) for s in training_scores))
        self.dlf = DecisionLayerFusion(nu=self.config.ocsvm_nu, max_iter=self.config.ocsvm_maxiter)
        self.dlf.fit(np.concatenate(vectors), np.concatenate(pixels))

    def release_training_samples(self) -> None:
        for bank in self.banks.values():
            bank.release_samples()
        self._late_xyz.clear()

    # ------------------------------------------------------------------------------------------------ test

    def predict(self, patches: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
        """Final image score and ``(224, 224)`` map of one sample."""
        scores = self.modality_scores(patches)
        combine = self.spec.combine
        if combine == "single":
            (only,) = scores.values()
            return only.score, only.score_map
        if combine == "add":
            # sum() starts from 0: a float and a tensor here, as the modality scores are
            return (float(sum(s.score for s in scores.values())),
                    cast(torch.Tensor, sum(s.score_map for s in scores.values())))
        if self.dlf is None:
            raise RuntimeError("decision layer fusion is not fitted: run pass 2 (fit_fusion) first")
        vector, pixels = self._dlf_inputs(scores)
        image = float(self.dlf.score_image(vector)[0])
        score_map = torch.from_numpy(np.asarray(self.dlf.score_pixels(pixels), dtype=np.float32))
        return image, score_map.reshape(MAP_SIZE, MAP_SIZE)

    # ---------------------------------------------------------------------------------- saving and loading

    def to_state(self) -> dict:
        """Everything scoring needs once fitted (banks, normalisation, DLF arrays, RGB grid), as tensors and
        primitives."""
        unfinished = [m for m, bank in self.banks.items() if not bank.finalized]
        if unfinished:
            raise RuntimeError(f"the {', '.join(unfinished)} bank(s) are not finalised: fit the detector first")
        if self.uses_dlf and self.dlf is None:
            raise RuntimeError("decision layer fusion is not fitted: run pass 2 (fit_fusion) first")
        return {"modalities": list(self.spec.modalities),
                "banks": {m: bank.export_state() for m, bank in self.banks.items()},
                "dlf": None if self.dlf is None else self.dlf.export_state(),
                "rgb_grid": self.rgb_grid, "n_train": self.n_train}

    @classmethod
    def from_state(cls, config: DetectorSettings, state: dict, fusion_block=None, device="cpu",
                   progress: bool = True) -> Detector:
        """A fitted detector from ``to_state``; it scores bit-identically to the one it was taken from."""
        detector = cls(config, fusion_block=fusion_block, device=device, progress=progress)
        if list(state["modalities"]) != list(detector.spec.modalities):
            raise ValueError(f"saved banks {list(state['modalities'])} do not fit {config.method_name} "
                             f"({list(detector.spec.modalities)})")
        if detector.uses_dlf and state["dlf"] is None:
            raise ValueError(f"{config.method_name} with --memory_bank multiple needs the saved decision layer "
                             f"fusion, which is missing")
        detector.banks = {m: MemoryBank.from_state(state["banks"][m], detector.device,
                                                   search=default_search(detector.device, config.bank_search))
                          for m in detector.spec.modalities}
        detector.dlf = None if state["dlf"] is None else DecisionLayerFusion.from_state(state["dlf"])
        detector.rgb_grid = state["rgb_grid"]
        detector.n_train = state["n_train"]
        return detector

    def save(self, path: str | Path, *, class_name: str, setup: Setup, rng_state: torch.Tensor | None = None,
             thresholds: Thresholds | None = None, provenance: dict | None = None) -> Path:
        """Write this fitted detector to a class-model file with the run's setup (``persistence.make_setup``),
        the feature extractor's random state after fitting and the pass/fail thresholds."""
        path = save_class_model(path, class_name=class_name, setup=setup, detector_state=self.to_state(),
                                generator_state=rng_state, thresholds=thresholds, provenance=provenance)
        log.debug("%s: %s detector saved", path, class_name)
        return path

    @classmethod
    def from_model(cls, model: ClassModel, resources: DetectorResources = DEFAULT_RESOURCES) -> Detector:
        """The fitted detector of a loaded and verified class-model file (``persistence.load_class_model``)."""
        try:
            return cls.from_state(model.detector_settings, model.detector_state, fusion_block=resources.fusion_block,
                                  device=resources.device, progress=resources.progress)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{model.path}: the saved detector is incomplete or inconsistent "
                                 f"({type(exc).__name__}: {exc})") from exc


def evenly_spaced(total: int, cap: int | None) -> list[int]:
    """``0 .. total − 1``, or ``cap`` of them evenly spaced (the first and the last included) when fewer."""
    if cap is None or cap >= total:
        return list(range(total))
    if cap == 1:
        return [0]
    return [round(i * (total - 1) / (cap - 1)) for i in range(cap)]


def sample_cap(max_sample: int, fix_quirks: bool) -> int:
    """Training samples per pass: the reference processes ``max_sample + 1`` (quirk 35)."""
    return max_sample if fix_quirks else max_sample + 1
