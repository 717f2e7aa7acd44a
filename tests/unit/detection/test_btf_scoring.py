"""BTF's PatchCore scoring through the shared Detector against the reference's recipe written out on fixed
features: unnormalised bank, 10 % coreset, w · s* with the 3-NN re-weighting, bilinear 28 -> 224, 8-bit blur."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import ImageFilter
from torchvision import transforms

from m3dm.config import CONCAT, METHODS, DetectorSettings
from m3dm.detection.detector import Detector
from m3dm.features.extractor import SampleFeatures

GRID = 28


def patches(seed: int, dim: int) -> torch.Tensor:
    """Histogram-like non-negative patches, a few exact zero rows (empty background patches) included."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.rand(GRID * GRID, dim, generator=generator) * 40
    rows[:30] = 0
    return rows


def reference_score(patch: torch.Tensor, lib: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The reference's compute_s_s_map, step by step."""
    dist = torch.cdist(patch, lib)
    min_val, min_idx = torch.min(dist, dim=1)
    s_idx = torch.argmax(min_val)
    s_star = torch.max(min_val)
    m_test = patch[s_idx].unsqueeze(0)
    m_star = lib[min_idx[s_idx]].unsqueeze(0)
    _, nn_idx = torch.topk(torch.cdist(m_star, lib), k=3, largest=False)
    m_star_knn = torch.linalg.norm(m_test - lib[nn_idx[0, 1:]], dim=1)
    d = torch.sqrt(torch.tensor(patch.shape[1]))
    w = 1 - (torch.exp(s_star / d) / torch.sum(torch.exp(m_star_knn / d)))
    s_map = F.interpolate(min_val.view(1, 1, GRID, GRID), size=(224, 224), mode="bilinear")
    peak = s_map.max()
    blurred = transforms.ToTensor()(transforms.ToPILImage()(s_map[0] / peak).filter(ImageFilter.GaussianBlur(4)))
    return float(w * s_star), (blurred * peak)[0]


def fitted(method: str, train: list[SampleFeatures]) -> Detector:
    config = DetectorSettings(method_name=method, memory_bank="single", random_state=0)
    detector = Detector(config, progress=False)
    for sample in train:
        detector.add(sample)
    detector.finalize()
    return detector


@pytest.mark.parametrize("method", ["BTF_FPFH", "BTF_RGB", "BTF_RGB+FPFH"])
def test_scores_and_maps_follow_the_reference(method):
    spec = METHODS[method]
    dims = {"xyz": 33, "rgb": 64}

    def sample(seed):
        rgb = patches(seed, dims["rgb"])
        return SampleFeatures(rgb=rgb, rgb_map=rgb.T.reshape(-1, GRID, GRID), xyz=patches(seed + 100, dims["xyz"]))

    train = [sample(s) for s in range(2)]
    detector = fitted(method, train)
    (modality,) = spec.modalities
    raw = torch.cat([detector.modality_patches(s)[modality] for s in train])
    bank = detector.banks[modality]
    assert bank.mean is None  # no normalisation
    assert len(bank.coreset_idx) == int(0.1 * raw.shape[0])
    assert torch.equal(bank.bank, raw[bank.coreset_idx])
    for seed in (10, 11):
        test = sample(seed)
        score, score_map = detector.predict(detector.modality_patches(test))
        expected_score, expected_map = reference_score(detector.modality_patches(test)[modality], bank.bank)
        assert score == pytest.approx(expected_score, rel=1e-5)
        peak = float(expected_map.max())
        close = np.isclose(score_map.numpy(), expected_map.numpy(), rtol=1e-6, atol=1e-6 * peak)
        assert close.mean() > 0.999  # the 8-bit blur may round a handful of pixels the other way
        np.testing.assert_allclose(score_map.numpy(), expected_map.numpy(), atol=1.01 * peak / 255)


def test_concatenated_bank_is_rgb_then_fpfh_on_one_grid():
    rgb, xyz = patches(1, 16), patches(2, 33)
    detector = Detector(DetectorSettings(method_name="BTF_RGB+FPFH", memory_bank="single"), progress=False)
    got = detector.modality_patches(SampleFeatures(rgb=rgb, rgb_map=rgb.T.reshape(-1, GRID, GRID), xyz=xyz))
    assert list(got) == [CONCAT]
    assert torch.equal(got[CONCAT], torch.cat([rgb, xyz], dim=1))
    assert detector.needs_rgb and detector.needs_xyz
    assert all(METHODS[m].patch_grid == GRID for m in ("BTF_RGB", "BTF_FPFH", "BTF_RGB+FPFH"))


@pytest.mark.parametrize(("changes", "refused"), [
    ({"detector": {"method_name": "BTF_RGB", "memory_bank": "multiple"}}, "--memory_bank single"),
    ({"uff": {"use_uff": True}}, "--use_uff"),
    ({"run": {"save_feature": True}}, "--save_feature"),
])
def test_btf_flag_combinations_the_reference_cannot_run_are_refused(changes, refused):
    from m3dm.config import Settings
    from m3dm.errors import ConfigError

    settings = Settings().replace(detector={"method_name": "BTF_RGB", "memory_bank": "single"})
    settings.validate()
    with pytest.raises(ConfigError, match=refused):
        settings.replace(**changes).validate()
