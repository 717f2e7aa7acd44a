"""CFM (Costanzino et al., CVPR 2024): two MLPs map RGB features to point features and back; anomalies are where
the mapped features disagree with the observed ones.

Per class, on every valid pixel of the 224 x 224 grid (``m3dm.features.dense``), one MLP maps the DINO feature to
the Point-MAE feature and the other the reverse, trained on the nominal training samples with a cosine loss. A
test pixel's score is the product of the two distances between mapped and observed (unit) features, smoothed by
repeated box filters; the map is normalised by its own mean and the image score is its maximum. Where this
differs from the reference, and what ``--fix_quirks`` changes, is listed in docs/quirks.md ("CFM").
"""

from __future__ import annotations

import logging
import math
import sys
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from m3dm.config import DetectorSettings
from m3dm.detection.interface import DetectorResources, SavesWholeState
from m3dm.features.dense import PointGroups, dense_points, dense_rgb, valid_pixels
from m3dm.features.extractor import SampleFeatures

COSINE_EPS = 1e-6  # eps of the training loss's cosine similarity (the reference's)
BOX_FILTERS = ((5, 5), (7, 3))  # (width, passes): repeated box filters approximating a Gaussian blur
CACHE_BYTES = 2 * 2**30  # training features kept on the device up to this size (else recomputed per batch)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- the mappings

class FeatureMappingMLP(nn.Module):
    """``in -> h -> h -> out`` with ``h = (in + out) // 2`` and GELU after the first two layers.

    The layer names (``input``, ``projection``, ``output``) are those of the reference's checkpoints, so its
    released state dicts load unchanged.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        hidden = (in_features + out_features) // 2
        self.input = nn.Linear(in_features, hidden)
        self.projection = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, out_features)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.act(self.projection(self.act(self.input(x)))))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default ``nn.Linear`` initialisation, drawn from ``generator`` (reproducible per class)."""
        for layer in (self.input, self.projection, self.output):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            bound = 1.0 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def mapping_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """1 - mean cosine similarity over the rows (the reference's training loss)."""
    return 1 - F.cosine_similarity(predicted, target, dim=-1, eps=COSINE_EPS).mean()


# ---------------------------------------------------------------------------------------------- scoring

def unit_distance(predicted: Tensor, observed: Tensor) -> Tensor:
    """Row-wise Euclidean distance between the L2-normalised rows (``sqrt(2 - 2 cos)``), as the reference."""
    return (F.normalize(predicted, dim=1) - F.normalize(observed, dim=1)).pow(2).sum(1).sqrt()


def box_smooth(score_map: Tensor) -> Tensor:
    """The reference's smoothing: five 5x5 then three 7x7 box filters, zero padding, same size."""
    x = score_map[None, None]
    for width, passes in BOX_FILTERS:
        kernel = torch.ones(1, 1, width, width, dtype=x.dtype, device=x.device) / width**2
        for _ in range(passes):
            x = F.conv2d(x, kernel, padding=width // 2)
    return x[0, 0]


def normalise(smoothed: Tensor, fix_quirks: bool) -> tuple[float, Tensor]:
    """Image score and map from the smoothed product map.

    The reference divides the map by the mean of its non-zero pixels for AU-PRO and takes the image score as the
    maximum of the map divided by the square root of that mean (and P-AUROC on yet another scaling, quirk C3).
    With ``fix_quirks`` one map, divided by the square root of the mean, serves every metric and the image score
    is its maximum.
    """
    nonzero = smoothed[smoothed != 0]
    if nonzero.numel() == 0:  # no valid pixel survives: a flat map rather than the reference's NaN
        return 0.0, torch.zeros_like(smoothed)
    mean = nonzero.mean()
    scaled = smoothed / torch.sqrt(mean)
    image = float(scaled.max())
    return image, (scaled if fix_quirks else smoothed / mean)


# ---------------------------------------------------------------------------------------------- detector

class CFMDetector(SavesWholeState):
    """One class's crossmodal feature mappings: ``add`` each training sample, ``finalize`` trains both MLPs,
    ``predict`` scores a test sample (a ``m3dm.detection.interface.ClassDetector``, without pass 2)."""

    method_title = "CFM"

    uses_dlf = False
    fit_stage = "mapping training"  # what finalize does, as the run's timings name it
    needs_rgb = True
    needs_xyz = True

    def __init__(self, config: DetectorSettings, device: torch.device | str = "cpu", progress: bool = True):
        self.config = config
        self.device = torch.device(device)
        self.progress = progress
        self._samples: list[tuple[Tensor, PointGroups]] = []
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}
        self.rgb_to_xyz: FeatureMappingMLP | None = None
        self.xyz_to_rgb: FeatureMappingMLP | None = None
        self.losses: list[float] = []  # mean training loss (both mappings) per epoch
        self.n_train = 0

    @classmethod
    def build(cls, config: DetectorSettings, resources: DetectorResources) -> CFMDetector:
        return cls(config, device=resources.device, progress=resources.progress)

    @staticmethod
    def training_cap(config: DetectorSettings, max_sample: int) -> int:
        """Training samples to use: ``--cfm_train_samples`` (few-shot), else all (``--max_sample`` is M3DM's)."""
        return config.cfm_train_samples if config.cfm_train_samples is not None else sys.maxsize

    # ------------------------------------------------------------------------------------------- features

    def modality_patches(self, features: SampleFeatures) -> dict:
        """What ``predict`` needs of a sample: its ViT map and its point-group output."""
        if features.rgb_map is None or features.xyz_groups is None:
            raise ValueError("CFM needs both the RGB map and the point groups of a sample")
        return {"rgb_map": features.rgb_map, "xyz_groups": features.xyz_groups}

    def _dense(self, rgb_map: Tensor, groups: PointGroups) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pixel RGB and point features of one sample on the device, and the valid-pixel mask."""
        xyz = dense_points(groups.to(self.device))
        rgb = dense_rgb(rgb_map.to(self.device), groups.img_size)
        return rgb, xyz, valid_pixels(xyz, by_sum=not self.config.fix_quirks)

    # -------------------------------------------------------------------------------------------- training

    def add(self, features: SampleFeatures) -> None:
        patches = self.modality_patches(features)
        self._samples.append((patches["rgb_map"], patches["xyz_groups"]))
        self.n_train += 1

    def _training_rows(self, index: int, cache: bool) -> tuple[Tensor, Tensor]:
        """The valid pixels' RGB and point features of training sample ``index`` (kept if ``cache``)."""
        if index in self._cache:
            return self._cache[index]
        rgb, xyz, valid = self._dense(*self._samples[index])
        rows = (rgb[valid], xyz[valid])
        if cache:
            self._cache[index] = rows
        return rows

    def _build_mappings(self, rgb_dim: int, xyz_dim: int) -> tuple[FeatureMappingMLP, FeatureMappingMLP]:
        self.rgb_to_xyz = FeatureMappingMLP(rgb_dim, xyz_dim)
        self.xyz_to_rgb = FeatureMappingMLP(xyz_dim, rgb_dim)
        return self.rgb_to_xyz, self.xyz_to_rgb

    def _mappings(self, missing: str) -> tuple[FeatureMappingMLP, FeatureMappingMLP]:
        """Both trained mappings (a RuntimeError saying ``missing`` before ``finalize``)."""
        if self.rgb_to_xyz is None or self.xyz_to_rgb is None:
            raise RuntimeError(missing)
        return self.rgb_to_xyz, self.xyz_to_rgb

    def _fits_cache(self) -> bool:
        rgb_map, groups = self._samples[0]
        per_sample = groups.img_size**2 * (rgb_map.shape[0] + groups.features.shape[1]) * 4
        return per_sample * len(self._samples) <= CACHE_BYTES

    def finalize(self) -> None:
        """Train both mappings: ``--cfm_epochs`` epochs over the training samples in a seeded random order,
        ``--cfm_batch_size`` samples per Adam step, the loss pooled over every valid pixel of the batch."""
        if not self._samples:
            raise ValueError("CFM has no training sample to learn the mappings from")
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.cfm_seed)
        rgb_map, groups = self._samples[0]
        rgb_to_xyz, xyz_to_rgb = self._build_mappings(rgb_map.shape[0], groups.features.shape[1])
        rgb_to_xyz.reset_parameters(generator)
        xyz_to_rgb.reset_parameters(generator)
        rgb_to_xyz.to(self.device).train()
        xyz_to_rgb.to(self.device).train()
        optimiser = torch.optim.Adam(chain(rgb_to_xyz.parameters(), xyz_to_rgb.parameters()), lr=cfg.cfm_lr)
        cache = self._fits_cache()
        epochs = tqdm(range(cfg.cfm_epochs), desc="CFM training", unit="epoch", disable=not self.progress,
                      file=sys.stderr, leave=False)
        self.losses = []
        for _ in epochs:
            order = torch.randperm(len(self._samples), generator=generator)
            total, steps = 0.0, 0
            for batch in order.split(cfg.cfm_batch_size):
                rows = [self._training_rows(int(i), cache) for i in batch]
                rgb = torch.cat([r for r, _ in rows])
                xyz = torch.cat([x for _, x in rows])
                # one backward through the sum: the same gradients as the reference's two (disjoint parameters)
                loss = mapping_loss(rgb_to_xyz(rgb), xyz) + mapping_loss(xyz_to_rgb(xyz), rgb)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"CFM training diverged (loss {value}): lower --cfm_lr")
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += value
                steps += 1
            self.losses.append(total / steps)
            epochs.set_postfix(loss=f"{self.losses[-1]:.4f}")
        rgb_to_xyz.eval()
        xyz_to_rgb.eval()
        self._cache.clear()
        log.debug("CFM: %d samples, %d epochs, final loss %.5f", self.n_train, cfg.cfm_epochs, self.losses[-1])

    def release_training_samples(self) -> None:
        self._samples.clear()
        self._cache.clear()

    # ------------------------------------------------------------------------------------------------ test

    @torch.no_grad()
    def product_map(self, rgb_map: Tensor, groups: PointGroups) -> Tensor:
        """The unsmoothed ``(img_size, img_size)`` product of both distances, 0 on invalid pixels."""
        rgb_to_xyz, xyz_to_rgb = self._mappings("CFM is not trained: run finalize first")
        rgb, xyz, valid = self._dense(rgb_map, groups)
        rgb, xyz = rgb[valid], xyz[valid]  # the MLPs run on the valid pixels only: the others are zeroed anyway
        product = unit_distance(xyz_to_rgb(xyz), rgb) * unit_distance(rgb_to_xyz(rgb), xyz)
        full = product.new_zeros(valid.shape[0])
        full[valid] = product
        return full.view(groups.img_size, groups.img_size)

    def predict(self, patches: dict) -> tuple[float, Tensor]:
        """Image score and ``(224, 224)`` float32 map of one sample."""
        smoothed = box_smooth(self.product_map(patches["rgb_map"], patches["xyz_groups"]))
        image, score_map = normalise(smoothed, self.config.fix_quirks)
        return image, score_map.float().cpu()

    # ---------------------------------------------------------------------------------- saving and loading

    def to_state(self) -> dict:
        """The trained weights of both mappings and their feature sizes (tensors and primitives)."""
        rgb_to_xyz, xyz_to_rgb = self._mappings("CFM is not trained: fit the detector first")
        return {"family": "cfm", "rgb_dim": rgb_to_xyz.input.in_features,
                "xyz_dim": xyz_to_rgb.input.in_features,
                "rgb_to_xyz": {k: v.detach().cpu() for k, v in rgb_to_xyz.state_dict().items()},
                "xyz_to_rgb": {k: v.detach().cpu() for k, v in xyz_to_rgb.state_dict().items()},
                "losses": list(self.losses), "n_train": self.n_train}

    @classmethod
    def from_state(cls, config: DetectorSettings, state: dict, device: torch.device | str = "cpu",
                   progress: bool = True) -> CFMDetector:
        """A trained detector from ``to_state``; it scores bit-identically to the one it was taken from."""
        if state.get("family") != "cfm":
            raise ValueError("the saved detector is not a CFM one")
        detector = cls(config, device=device, progress=progress)
        rgb_to_xyz, xyz_to_rgb = detector._build_mappings(int(state["rgb_dim"]), int(state["xyz_dim"]))
        rgb_to_xyz.load_state_dict(state["rgb_to_xyz"])
        xyz_to_rgb.load_state_dict(state["xyz_to_rgb"])
        rgb_to_xyz.to(detector.device).eval()
        xyz_to_rgb.to(detector.device).eval()
        detector.losses = [float(v) for v in state["losses"]]
        detector.n_train = int(state["n_train"])
        return detector
