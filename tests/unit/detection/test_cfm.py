"""CFM on fixed synthetic features: the mappings' architecture, maps and image scores against a direct formula,
seeded and decreasing training, cached and recomputed training features, bit-identical saving and loading."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter

from m3dm.config import FEATURE_DUMP_METHODS, DetectorSettings, Settings, recorded_defaults
from m3dm.detection import cfm
from m3dm.detection.cfm import CFMDetector, FeatureMappingMLP
from m3dm.detection.factory import detector_class, detector_from_model, training_cap
from m3dm.detection.interface import DetectorResources
from m3dm.detection.persistence import load_class_model, make_setup
from m3dm.errors import ConfigError
from m3dm.features.alignment import pfa_patches
from m3dm.features.dense import PointGroups
from m3dm.features.extractor import SampleFeatures

SIZE = 24  # grid side of the fixed features (224 in a run)


def features(seed: int, rgb_dim: int = 8, xyz_dim: int = 12, groups: int = 10) -> SampleFeatures:
    """A sample whose valid pixels are a random 60 % of the grid, with random points and centres, and features
    near a pattern all samples share (so that the mappings have something to learn)."""
    shared = torch.Generator().manual_seed(1234)
    rgb_pattern, xyz_pattern = torch.randn(rgb_dim, 3, 3, generator=shared), torch.randn(xyz_dim, generator=shared)
    g = torch.Generator().manual_seed(seed)
    flat_index = torch.arange(SIZE * SIZE)[torch.rand(SIZE * SIZE, generator=g) > 0.4]
    points = torch.rand(len(flat_index), 3, generator=g) + 0.1
    centres = points[torch.randperm(len(points), generator=g)[:groups]]
    group_features = xyz_pattern + 0.3 * torch.randn(groups, xyz_dim, generator=g)
    return SampleFeatures(rgb_map=rgb_pattern + 0.3 * torch.randn(rgb_dim, 3, 3, generator=g),
                          xyz_groups=PointGroups(points, flat_index, centres, group_features, SIZE))


def settings(**changes) -> DetectorSettings:
    return DetectorSettings(method_name="CFM", **{"cfm_epochs": 4, "cfm_batch_size": 2, **changes})


def trained(config: DetectorSettings, n_train: int = 5) -> CFMDetector:
    detector = CFMDetector(config, progress=False)
    for seed in range(n_train):
        detector.add(features(seed))
    detector.finalize()
    detector.release_training_samples()
    return detector


@pytest.fixture(scope="module")
def detector() -> CFMDetector:
    return trained(settings())


def weights(detector: CFMDetector) -> list[torch.Tensor]:
    return [*detector.rgb_to_xyz.state_dict().values(), *detector.xyz_to_rgb.state_dict().values()]


# ------------------------------------------------------------------------------------------ architecture

def test_mapping_layers_are_the_references():
    mlp = FeatureMappingMLP(768, 1152)  # DINO ViT-B/8 -> Point-MAE
    shapes = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    assert shapes == {"input.weight": (960, 768), "input.bias": (960,), "projection.weight": (960, 960),
                      "projection.bias": (960,), "output.weight": (1152, 960), "output.bias": (1152,)}
    assert sum(p.numel() for p in mlp.parameters()) == 768 * 960 + 960 + 960 * 960 + 960 + 960 * 1152 + 1152
    x = torch.randn(5, 768)
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))
    expected = mlp.output(gelu(mlp.projection(gelu(mlp.input(x)))))
    torch.testing.assert_close(mlp(x), expected)


def test_method_entry_and_factory():
    assert detector_class("CFM") is CFMDetector
    assert training_cap(settings(), max_sample=400) > 10**9  # every training sample: --max_sample is M3DM's
    assert training_cap(settings(cfm_train_samples=5), max_sample=400) == 5
    assert training_cap(DetectorSettings(method_name="Point_MAE"), max_sample=400) == 401  # quirk 35, unchanged


@pytest.mark.parametrize(("changes", "message"), [
    ({"detector": {"cfm_train_samples": 0}}, "--cfm_train_samples 0 is out of range: use an integer of at least 1"),
    ({"detector": {"cfm_epochs": 0}}, "--cfm_epochs 0 is out of range: use an integer of at least 1"),
    ({"detector": {"cfm_lr": float("inf")}}, "--cfm_lr inf is out of range: use a finite value > 0"),
    ({"detector": {"cfm_seed": 2**64}}, "--cfm_seed 18446744073709551616 is out of range: use an integer from 0 to"),
    ({"uff": {"use_uff": True}}, "does not use the UFF block"),
    ({"run": {"save_feature": True}}, "--save_feature dumps UFF pretraining features"),
])
def test_settings_that_cfm_cannot_run_are_refused(changes, message):
    base = Settings().replace(detector={"method_name": "CFM"})
    base.validate()  # the defaults (and --memory_bank's) are fine
    with pytest.raises(ConfigError, match=message):
        base.replace(**changes).validate()
    assert "CFM" not in FEATURE_DUMP_METHODS


# ----------------------------------------------------------------------------------------- the formula

def direct_map(detector: CFMDetector, sample: SampleFeatures, fix_quirks: bool) -> tuple[float, np.ndarray]:
    """Image score and map computed straightforwardly: per-pixel features by the fast PFA matrix at full size
    and a bilinear upsampling, both mappings on every pixel, distances of unit vectors, masking, the box filters
    as SciPy's zero-padded uniform filters, the normalisation, in float64 where possible."""
    groups = sample.xyz_groups
    xyz = pfa_patches(groups.points, groups.flat_index, groups.centres, groups.features, SIZE, out_size=SIZE)
    rgb = torch.nn.functional.interpolate(sample.rgb_map[None], size=(SIZE, SIZE), mode="bilinear",
                                          align_corners=False)[0].reshape(sample.rgb_map.shape[0], -1).T
    with torch.no_grad():
        xyz_hat, rgb_hat = detector.rgb_to_xyz(rgb).double(), detector.xyz_to_rgb(xyz).double()
    xyz, rgb = xyz.double(), rgb.double()
    invalid = ((xyz == 0).all(dim=1) if fix_quirks else xyz.sum(dim=1) == 0).numpy()

    def distance(a, b):
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        return torch.sqrt(torch.clamp(2 - 2 * cos, min=0)).numpy()

    product = distance(xyz_hat, xyz) * distance(rgb_hat, rgb)
    product[invalid] = 0
    smoothed = product.reshape(SIZE, SIZE)
    for width, passes in ((5, 5), (7, 3)):
        for _ in range(passes):
            smoothed = uniform_filter(smoothed, size=width, mode="constant", cval=0.0)
    mean = smoothed[smoothed != 0].mean()
    image = (smoothed / np.sqrt(mean)).max()
    return image, smoothed / (np.sqrt(mean) if fix_quirks else mean)


@pytest.mark.parametrize("fix_quirks", [False, True])
def test_maps_and_scores_follow_the_direct_formula(detector, fix_quirks):
    detector.config = dataclasses.replace(detector.config, fix_quirks=fix_quirks)
    for seed in (20, 21):
        sample = features(seed)
        image, score_map = detector.predict(detector.modality_patches(sample))
        expected_image, expected_map = direct_map(detector, sample, fix_quirks)
        assert score_map.dtype == torch.float32 and score_map.shape == (SIZE, SIZE)
        np.testing.assert_allclose(score_map.numpy(), expected_map, rtol=2e-4, atol=1e-6)
        assert image == pytest.approx(expected_image, rel=2e-4)
        if fix_quirks:
            assert image == pytest.approx(float(score_map.max()), rel=1e-6)
    detector.config = dataclasses.replace(detector.config, fix_quirks=False)


def test_invalid_pixels_do_not_reach_the_product(detector):
    sample = features(22)
    product = detector.product_map(sample.rgb_map, sample.xyz_groups)
    xyz = pfa_patches(*(getattr(sample.xyz_groups, k) for k in ("points", "flat_index", "centres", "features")),
                      SIZE, out_size=SIZE)
    assert (product.reshape(-1)[xyz.abs().sum(1) == 0] == 0).all()
    assert (product.reshape(-1)[xyz.abs().sum(1) > 1e-6] > 0).all()


# --------------------------------------------------------------------------------------------- training

def test_training_is_seeded_and_lowers_the_loss(detector):
    again = trained(settings())
    assert all(torch.equal(a, b) for a, b in zip(weights(detector), weights(again), strict=True))
    assert again.losses == detector.losses and len(detector.losses) == 4
    assert detector.losses[-1] < detector.losses[0]
    other = trained(settings(cfm_seed=116))
    assert not torch.equal(weights(detector)[0], weights(other)[0])


def test_cached_and_recomputed_training_features_train_the_same(detector, monkeypatch):
    monkeypatch.setattr(cfm, "CACHE_BYTES", 0)  # every batch projects its samples again
    recomputed = trained(settings())
    assert all(torch.equal(a, b) for a, b in zip(weights(detector), weights(recomputed), strict=True))


def test_a_batch_pools_the_loss_over_its_valid_pixels():
    """One step on a batch of two samples equals one step on their concatenated valid pixels."""
    config = settings(cfm_epochs=1, cfm_batch_size=2)
    both = trained(config, n_train=2)
    manual = CFMDetector(config, progress=False)
    for seed in range(2):
        manual.add(features(seed))
    generator = torch.Generator().manual_seed(config.cfm_seed)
    manual._build_mappings(8, 12)
    manual.rgb_to_xyz.reset_parameters(generator)
    manual.xyz_to_rgb.reset_parameters(generator)
    rows = [manual._training_rows(i, cache=False) for i in range(2)]
    rgb, xyz = torch.cat([r for r, _ in rows]), torch.cat([x for _, x in rows])
    optimiser = torch.optim.Adam([*manual.rgb_to_xyz.parameters(), *manual.xyz_to_rgb.parameters()], lr=1e-3)
    loss_a = 1 - torch.nn.functional.cosine_similarity(manual.rgb_to_xyz(rgb), xyz, dim=-1, eps=1e-6).mean()
    loss_b = 1 - torch.nn.functional.cosine_similarity(manual.xyz_to_rgb(xyz), rgb, dim=-1, eps=1e-6).mean()
    loss_a.backward()
    loss_b.backward()
    optimiser.step()
    for a, b in zip(weights(both), weights(manual), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ saving

def test_state_and_model_file_score_bit_identically(detector, tmp_path):
    config = detector.config
    setup = make_setup("CFM", config.to_record(), recorded_defaults(), {})
    path = detector.save(tmp_path / "gadget.pt", class_name="gadget", setup=setup)
    loaded = detector_from_model(load_class_model(path, "CFM", class_name="gadget", setup=setup),
                                 DetectorResources(progress=False))
    from_state = CFMDetector.from_state(config, detector.to_state(), progress=False)
    assert loaded.n_train == 5 and loaded.losses == detector.losses
    for seed in (30, 31):
        sample = features(seed)
        image, score_map = detector.predict(detector.modality_patches(sample))
        for other in (loaded, from_state):
            other_image, other_map = other.predict(other.modality_patches(sample))
            assert other_image == image and torch.equal(other_map, score_map)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_and_scoring_match_the_cpu():
    cpu = trained(settings())
    gpu = CFMDetector(settings(), device="cuda", progress=False)
    for seed in range(5):
        gpu.add(features(seed))
    gpu.finalize()
    for a, b in zip(weights(cpu), weights(gpu), strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-3, atol=1e-4)
    sample = features(40)
    cpu_image, cpu_map = cpu.predict(cpu.modality_patches(sample))
    gpu_image, gpu_map = gpu.predict(gpu.modality_patches(sample))
    assert gpu_map.device.type == "cpu"
    torch.testing.assert_close(gpu_map, cpu_map, rtol=1e-3, atol=1e-4)
    assert gpu_image == pytest.approx(cpu_image, rel=1e-3)
