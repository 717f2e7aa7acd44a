"""G2SF's detector on fixed small features: patch labels from a mask, RGB upsampling, nearest coreset rows, the
banks' recipe, the patch scores against the fused distances written out, the map and image score, and a state
that scores bit-identically once loaded."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from m3dm.config import DetectorSettings, Settings, validate
from m3dm.detection.factory import detector_class
from m3dm.detection.g2sf import G2SFDetector, nearest_rows, patch_labels, upsample_rgb
from m3dm.detection.lspn import LocalScaleNet, fused_distance
from m3dm.errors import ConfigError, ModelFileError
from m3dm.features.extractor import SampleFeatures

GRID = 56


def features(seed: int, rgb_dim: int = 8, xyz_dim: int = 12) -> SampleFeatures:
    """8 x 8 RGB patches and 56 x 56 point patches, the left quarter of the point grid empty (background)."""
    g = torch.Generator().manual_seed(seed)
    rgb_map = torch.randn(rgb_dim, 8, 8, generator=g)
    xyz = torch.randn(GRID, GRID, xyz_dim, generator=g).abs() + 0.1
    xyz[:, :14] = 0
    return SampleFeatures(rgb=rgb_map.flatten(1).T.contiguous(), rgb_map=rgb_map, xyz=xyz.reshape(-1, xyz_dim))


def test_patch_labels_dilate_the_mask_then_take_every_fourth_pixel():
    gt = torch.zeros(1, 224, 224)
    gt[0, 9, 9] = 1  # dilated to rows and columns 8..10: pixel 8 is patch 2's sampled pixel
    labels = patch_labels(gt).reshape(GRID, GRID)
    assert labels[2, 2] == -1 and (labels == -1).sum() == 1
    gt[0, 50:60, 100:120] = 1
    labels = patch_labels(gt).reshape(GRID, GRID)
    dilated = np.zeros((224, 224), bool)
    dilated[8:11, 8:11] = dilated[49:61, 99:121] = True
    assert torch.equal(labels == -1, torch.from_numpy(dilated[::4, ::4]))


def test_rgb_patches_are_upsampled_by_nearest_interpolation():
    rgb = torch.arange(4 * 4 * 2, dtype=torch.float32).reshape(16, 2)
    up = upsample_rgb(rgb, grid=8).reshape(8, 8, 2)
    expected = rgb.reshape(4, 4, 2).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(up, expected)


def test_nearest_rows_column_zero_is_the_argmin():
    patches, coreset = torch.randn(30, 5), torch.randn(40, 5)
    min_dist, idx = nearest_rows(patches, coreset, 20)
    distances = torch.cdist(patches, coreset)
    assert torch.equal(idx[:, 0], distances.argmin(1)) and torch.equal(min_dist, distances.min(1).values)
    assert torch.equal(idx[:, 1:], distances.topk(20, largest=False).indices[:, 1:])


def settings(**changes) -> DetectorSettings:
    return DetectorSettings(method_name="G2SF", **{"n_hidden": "6", "emb_dim": 3, **changes})


@pytest.fixture(scope="module")
def detector() -> G2SFDetector:
    """Banks of 2 samples and a random LSPN in place of a trained one."""
    det = G2SFDetector(settings(f_coreset=0.05), progress=False)  # a small coreset: a quick fixture
    for seed in range(2):
        det.add(features(seed))
    det._build_banks()
    det.net = LocalScaleNet(8 + 12, (6,), 3, 0.5)
    det.net.reset_parameters(torch.Generator().manual_seed(0))
    det.net.eval()
    det.raw_global, det.score_mean = torch.tensor([[0.2], [-0.1]]), torch.tensor([1.5, 2.0])
    return det


def test_banks_follow_the_reference_recipe(detector):
    rgb, xyz = detector.banks["rgb"], detector.banks["xyz"]
    assert rgb.bank.shape == (int(0.05 * 2 * 64), 8) and xyz.bank.shape == (int(0.05 * 2 * GRID * GRID), 12)
    assert rgb.mean is not None and xyz.mean is None  # RGB normalised by its own statistics, points not


def test_patch_scores_are_the_aggregated_fused_distances(detector):
    sample = features(7)
    scores = detector.patch_scores(detector.modality_patches(sample))
    rgb = (upsample_rgb(sample.rgb) - detector.banks["rgb"].mean) / detector.banks["rgb"].std
    rows = torch.cat([rgb, sample.xyz], 1)
    background = sample.xyz.sum(1) == 0
    rgb_core, xyz_core = detector.banks["rgb"].bank, detector.banks["xyz"].bank
    rgb_idx = torch.cdist(rows[:, :8], rgb_core).topk(6, largest=False).indices
    xyz_idx = torch.cdist(rows[:, 8:], xyz_core).topk(6, largest=False).indices
    with torch.no_grad():
        each = torch.stack([fused_distance(detector.net, rows, torch.cat([rgb_core[rgb_idx[:, i]],
                                                                          xyz_core[xyz_idx[:, i]]], 1),
                                           detector.score_mean, detector.raw_global, 8, background).value[:, 0]
                            for i in range(6)], 1)
    assert torch.allclose(scores, each.min(1).values, atol=1e-6)


def test_state_round_trip_scores_bit_identically(detector):
    copy = G2SFDetector.from_state(detector.config, detector.to_state(), progress=False)
    sample = detector.modality_patches(features(9))
    first, again = detector.predict(sample), copy.predict(sample)
    assert first[0] == again[0] and torch.equal(first[1], again[1])
    scores = detector.patch_scores(sample)
    assert first[0] == float(scores.max()) and first[1].shape == (224, 224)  # the image score: the largest patch


def test_method_is_registered_and_its_flags_are_checked():
    assert detector_class("G2SF") is G2SFDetector
    assert G2SFDetector.training_cap(settings(), 400) > 10**9  # every training sample, as the reference
    with pytest.raises(ConfigError, match="--n_hidden"):
        validate(Settings(detector=settings(n_hidden="512,x")))
    with pytest.raises(ConfigError, match="--anchor"):
        validate(Settings(detector=settings(anchor=10)))
    with pytest.raises(ConfigError, match="--use_uff"):
        validate(Settings().replace(detector={"method_name": "G2SF"}, uff={"use_uff": True}))


def test_fix_quirks_switches_the_three_g2sf_defects():
    from m3dm.detection.g2sf import training_settings

    reference, fixed = training_settings(settings()), training_settings(settings(fix_quirks=True))
    assert reference.broadcast_const and reference.skip_first_validation
    assert not fixed.broadcast_const and not fixed.skip_first_validation
    assert reference.weights == {"svdd": 1.0, "margin": 10.0, "const": 40.0, "perm": 20.0, "scaling": 3.0,
                                 "l1": 5e-4, "l2": 0.0}
    assert (reference.epochs, reference.batch_size, reference.lr, reference.hidden) == (80, 8192, 1.5e-4, (6,))


@pytest.mark.parametrize("method", ["CFM", "G2SF"])
def test_a_model_file_with_another_methods_state_is_one_clear_error(method):
    # save/from_model are shared by the detectors that save their whole state (interface.SavesWholeState)
    other = {"CFM": "g2sf", "G2SF": "cfm"}[method]
    model = SimpleNamespace(path="models/gadget.pt", detector_settings=DetectorSettings(method_name=method),
                            detector_state={"family": other})
    expected = (rf"^models/gadget.pt: the saved {method} detector is incomplete or inconsistent \(ValueError: the "
                rf"saved detector is not a {method} one\)$")
    with pytest.raises(ModelFileError, match=expected):
        detector_class(method).from_model(model)


@pytest.mark.slow  # the ONNX export alone takes seconds
def test_exported_scorer_gives_the_detectors_scores_and_maps(detector, tmp_path):
    """m3dm.export's G2SF part on onnxruntime against predict: image scores to 1e-5 relative, maps within one blur
    step (two 8-bit levels, docs/deployment.md); with the backbones: tests/integration/test_export.py."""
    import onnxruntime

    from m3dm.export.g2sf_graph import G2SFScorer

    samples = [features(seed) for seed in (11, 12)]
    rgb_maps = torch.stack([s.rgb_map for s in samples])
    xyz = torch.stack([s.xyz for s in samples])
    path = tmp_path / "scorer.onnx"
    torch.onnx.export(G2SFScorer(detector).eval(), (rgb_maps, xyz), str(path), input_names=["rgb_map", "xyz"],
                      output_names=["image_score", "map"], opset_version=17, dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, maps = session.run(None, {"rgb_map": rgb_maps.numpy(), "xyz": xyz.numpy()})
    for sample, score, score_map in zip(samples, scores, maps):
        expected_score, expected_map = detector.predict(detector.modality_patches(sample))
        assert abs(float(score) - expected_score) <= 1e-5 * expected_score
        assert np.abs(score_map - expected_map.numpy()).max() <= 2 * float(expected_map.max()) / 255


def test_export_graph_scores_as_predict_in_pytorch(detector):
    # the exported G2SF scorer, run eagerly, is predict's arithmetic (on onnxruntime only round-off differs: above)
    from m3dm.export.g2sf_graph import G2SFScorer

    sample = features(13)
    with torch.no_grad():
        scores, maps = G2SFScorer(detector).eval()(sample.rgb_map[None], sample.xyz[None])
    expected_score, expected_map = detector.predict(detector.modality_patches(sample))
    assert float(scores[0]) == expected_score and torch.equal(maps[0], expected_map)
