"""Decision Layer Fusion: configuration, shapes, determinism, unshifted scores, refusal before fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import SGDOneClassSVM

from m3dm.detection.dlf import DecisionLayerFusion


def training_scores(seed: int, n_samples: int = 12, pixels: int = 400, k: int = 3):
    """Non-negative modality scores, as the pass-2 image vectors and pixel maps are."""
    rng = np.random.default_rng(seed)
    images = np.abs(rng.normal(1.0, 0.3, (n_samples, k)))
    pixel_matrix = np.abs(rng.normal(0.5, 0.2, (n_samples * pixels, k))).astype(np.float32)
    return images, pixel_matrix


def test_fit_and_score_shapes():
    images, pixels = training_scores(0)
    fusion = DecisionLayerFusion().fit(images, pixels)
    assert fusion.fitted
    assert fusion.score_image(images[:1]).shape == (1,)
    assert fusion.score_image(images).shape == (12,)
    assert fusion.score_pixels(pixels[:224 * 2]).shape == (448,)
    assert fusion.score_pixels(torch.from_numpy(pixels[:10])).dtype == np.float64


def test_scores_are_the_unshifted_linear_score():
    images, pixels = training_scores(1)
    fusion = DecisionLayerFusion().fit(torch.from_numpy(images).float(), torch.from_numpy(pixels))
    image_weights, pixel_weights = fusion.weights
    probe = np.abs(np.random.default_rng(2).normal(1, 1, (20, 3)))
    np.testing.assert_allclose(fusion.score_image(probe), probe @ image_weights, rtol=1e-10)
    np.testing.assert_allclose(fusion.score_pixels(probe.astype(np.float32)),
                               probe.astype(np.float32).astype(np.float64) @ pixel_weights, rtol=1e-6)
    assert fusion.detect_fuser.offset_[0] != 0  # the offset exists but is not subtracted


def test_configuration_is_the_reference_one():
    images, pixels = training_scores(3, k=2)
    fusion = DecisionLayerFusion(nu=0.3, max_iter=50).fit(images, pixels)
    for model in (fusion.detect_fuser, fusion.seg_fuser):
        assert (model.nu, model.max_iter, model.random_state) == (0.3, 50, 42)
        assert (model.fit_intercept, model.tol, model.shuffle, model.learning_rate, model.average,
                model.warm_start) == (True, 1e-3, True, "optimal", False, False)
    # fitted in float64, as scikit-learn < 1.3 did with the reference's float32 tensors
    plain = SGDOneClassSVM(nu=0.3, max_iter=50, random_state=42).fit(pixels.astype(np.float64))
    np.testing.assert_array_equal(fusion.seg_fuser.coef_, plain.coef_)
    assert fusion.seg_fuser.coef_.dtype == np.float64


def test_deterministic():
    images, pixels = training_scores(4)
    first = DecisionLayerFusion().fit(images, pixels)
    second = DecisionLayerFusion().fit(images, pixels)
    np.testing.assert_array_equal(first.score_image(images), second.score_image(images))
    np.testing.assert_array_equal(first.score_pixels(pixels), second.score_pixels(pixels))


def test_positive_weights_on_non_negative_scores():
    images, pixels = training_scores(5)
    image_weights, pixel_weights = DecisionLayerFusion().fit(images, pixels).weights
    assert (image_weights > 0).all() and (pixel_weights > 0).all()


def test_refuses_to_score_before_fit_and_checks_shapes():
    fusion = DecisionLayerFusion()
    with pytest.raises(RuntimeError):
        fusion.score_image(np.ones((1, 3)))
    with pytest.raises(RuntimeError):
        fusion.score_pixels(np.ones((5, 3)))
    images, pixels = training_scores(6)
    with pytest.raises(ValueError):
        fusion.fit(images, pixels[:, :2])
    fusion.fit(images, pixels)
    with pytest.raises(ValueError):
        fusion.score_image(np.ones((1, 2)))
    with pytest.raises(ValueError):
        fusion.score_pixels(np.ones(3))
