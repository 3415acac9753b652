"""Posterior predictive: shapes, averaging, batch independence, the fast path and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Predictive

from guides import make_guide
from models import BayesianLinearHead, CNNBackbone, HybridClassifier
from pipelines.data import BatchIterator, ImageSet, stratified_split
from pipelines.prediction import head_logits, predict_bayesian, sample_posterior


def _trained_hybrid(num_classes=3, count=24):
    torch.manual_seed(0)
    hybrid = HybridClassifier(CNNBackbone(1, (4, 8), convs_per_block=1), BayesianLinearHead(8, num_classes))
    images = ImageSet(torch.randint(0, 255, (count, 1, 8, 8), dtype=torch.uint8), torch.arange(count) % num_classes)
    guide = make_guide(hybrid.head.model, init_scale=0.3)
    loader = BatchIterator(images, 8, [0.5], [0.25])
    x, y = next(iter(loader))
    guide(hybrid.features(x), y)
    # Run the backbone in train mode once so batch-norm running statistics differ from defaults.
    hybrid.train()
    hybrid.backbone(x)
    return hybrid, guide, images


def test_predictive_shape_and_rows_sum_to_one():
    hybrid, guide, images = _trained_hybrid()
    features = hybrid.features(torch.randn(5, 1, 8, 8))
    samples = sample_posterior(hybrid.head.model, guide, 7, features[:1])
    assert samples["head.weight"].shape == (7, 3, 8)
    logits = head_logits(hybrid.head.model, samples, features)
    assert logits.shape == (7, 5, 3)

    loader = BatchIterator(images, 10, [0.5], [0.25])
    predictions = predict_bayesian(hybrid, guide, loader, num_samples=7, keep_samples=True)
    assert predictions.probs.shape == (24, 3)
    assert predictions.probs.dtype == np.float64
    assert np.allclose(predictions.probs.sum(1), 1.0, atol=1e-12)
    assert predictions.sample_probs.shape == (7, 24, 3)


def test_predictive_averages_probabilities_not_logits():
    hybrid, guide, images = _trained_hybrid()
    loader = BatchIterator(images, 24, [0.5], [0.25])
    predictions = predict_bayesian(hybrid, guide, loader, num_samples=50, keep_samples=True)
    assert np.allclose(predictions.probs, predictions.sample_probs.mean(0), atol=1e-12)
    expected_entropy = -(predictions.sample_probs * np.log(predictions.sample_probs)).sum(-1).mean(0)
    assert np.allclose(predictions.expected_entropy, expected_entropy, atol=1e-10)
    assert (predictions.mutual_information >= 0).all()
    assert predictions.mutual_information.max() > 1e-4  # a wide guide disagrees with itself


def test_prediction_independent_of_batch():
    hybrid, guide, images = _trained_hybrid()
    together = predict_bayesian(hybrid, guide, BatchIterator(images, 24, [0.5], [0.25]), num_samples=10, seed=3)
    alone = predict_bayesian(hybrid, guide, BatchIterator(images.take([5]), 1, [0.5], [0.25]), num_samples=10, seed=3)
    assert np.allclose(alone.probs[0], together.probs[5], atol=1e-12)
    in_pieces = predict_bayesian(hybrid, guide, BatchIterator(images, 5, [0.5], [0.25]), num_samples=10, seed=3)
    assert np.allclose(in_pieces.probs, together.probs, atol=1e-12)


def test_prediction_leaves_batchnorm_statistics():
    hybrid, guide, images = _trained_hybrid()
    before = {k: v.clone() for k, v in hybrid.backbone.state_dict().items()}
    predict_bayesian(hybrid, guide, BatchIterator(images, 8, [0.5], [0.25]), num_samples=4)
    for name, value in hybrid.backbone.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_fast_path_matches_full_model_predictive():
    """The same posterior samples through the naive full-model Predictive give the same logits."""
    hybrid, guide, images = _trained_hybrid()
    hybrid.eval()
    x = torch.randn(6, 1, 8, 8)
    features = hybrid.features(x)
    samples = sample_posterior(hybrid.head.model, guide, 9, features[:1])

    fast = head_logits(hybrid.head.model, samples, features)
    naive = Predictive(hybrid.model, posterior_samples=samples, num_samples=9, parallel=False,
                       return_sites=["logits"])(x)["logits"]
    assert naive.shape == fast.shape == (9, 6, 3)
    assert torch.allclose(naive, fast, atol=1e-6)


def test_log_space_average_avoids_underflow():
    hybrid, guide, images = _trained_hybrid()
    store = pyro.get_param_store()
    # Push the weights far out so some class probabilities underflow in float32 softmax.
    store["AutoNormal.locs.head.weight"] = 400.0 * torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    predictions = predict_bayesian(hybrid, guide, BatchIterator(images, 24, [0.5], [0.25]), num_samples=3)
    assert (predictions.probs == 0).any()  # some probabilities do underflow to exactly 0
    assert np.isfinite(predictions.log_probs).all()  # their logarithms stay finite
    assert np.allclose(predictions.probs.sum(1), 1.0)


def test_stratified_split_disjoint_and_sized():
    labels = np.repeat(np.arange(4), 25)
    kept, held = stratified_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(kept, held)) == 0
    assert len(kept) + len(held) == 100
    assert np.bincount(labels[held]).tolist() == [5, 5, 5, 5]
    again_kept, again_held = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(held, again_held)


def test_num_samples_zero_rejected():
    hybrid, guide, _ = _trained_hybrid()
    with pytest.raises(ValueError, match="num_samples must be at least 1, got 0"):
        sample_posterior(hybrid.head.model, guide, 0, torch.randn(1, 8))


def test_mean_log_probability_formula():
    # log-mean-exp over samples of log-softmax, checked on two samples by hand.
    log_probs = torch.log(torch.tensor([[0.2, 0.8], [0.6, 0.4]], dtype=torch.float64))
    averaged = torch.logsumexp(log_probs, 0) - math.log(2)
    assert torch.allclose(averaged.exp(), torch.tensor([0.4, 0.6], dtype=torch.float64))


def test_temperature_divides_each_draw_before_averaging():
    from pipelines.prediction import sample_logits

    hybrid, guide, images = _trained_hybrid()
    loader = BatchIterator(images, 10, [0.5], [0.25])
    logits, labels = sample_logits(hybrid, guide, loader, num_samples=6, seed=4)
    assert logits.shape == (6, 24, 3)
    assert torch.equal(labels, images.labels)

    tempered = predict_bayesian(hybrid, guide, loader, num_samples=6, seed=4, temperature=2.5)
    expected = torch.softmax(logits.double() / 2.5, -1).mean(0).numpy()
    assert np.allclose(tempered.probs, expected, atol=1e-6)
    plain = predict_bayesian(hybrid, guide, loader, num_samples=6, seed=4)
    assert np.allclose(plain.probs, torch.softmax(logits.double(), -1).mean(0).numpy(), atol=1e-6)
    assert not np.allclose(plain.probs, tempered.probs, atol=1e-3)

    # Without an argument the hybrid's own temperature applies.
    hybrid.temperature = 2.5
    assert np.array_equal(predict_bayesian(hybrid, guide, loader, num_samples=6, seed=4).probs, tempered.probs)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        predict_bayesian(hybrid, guide, loader, num_samples=6, temperature=0.0)
