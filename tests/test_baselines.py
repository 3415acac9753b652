"""Temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.baselines import apply_temperature, fit_temperature


def test_temperature_recovers_known_value():
    # Labels drawn from softmax(z / 2.5) make T = 2.5 the maximum-likelihood temperature.
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(20000, 5))
    true_probs = apply_temperature(logits, 2.5)
    labels = (rng.random((len(true_probs), 1)) > true_probs.cumsum(1)).sum(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_temperature_invariant_to_log_softmax_shift():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(500, 3))
    labels = (rng.random((500, 1)) > apply_temperature(logits, 1.5).cumsum(1)).sum(1)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert fit_temperature(logits, labels) == pytest.approx(fit_temperature(log_probs, labels), rel=1e-6)


def test_apply_temperature_rows_sum_to_one():
    probs = apply_temperature(np.array([[1.0, 2.0, 3.0]]), 0.5)
    assert probs.sum() == pytest.approx(1.0)
    assert probs[0, 2] == pytest.approx(np.exp(6) / (np.exp(2) + np.exp(4) + np.exp(6)))


def test_temperature_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="expected log_probs of shape"):
        fit_temperature(np.zeros((3, 2)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="temperature must be positive"):
        apply_temperature(np.zeros((1, 2)), 0.0)


def _mc_nll(sample_logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """NLL of the mean over samples of softmax(z_s / T), computed plainly in numpy."""
    probs = np.stack([apply_temperature(z, temperature) for z in sample_logits]).mean(0)
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


def test_identical_samples_match_single_fit():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(800, 4))
    labels = (rng.random((800, 1)) > apply_temperature(logits, 0.7).cumsum(1)).sum(1)
    single = fit_temperature(logits, labels)
    assert fit_temperature(np.stack([logits] * 3), labels) == pytest.approx(single, rel=1e-6)
    assert single == pytest.approx(0.7, rel=0.15)


def test_sample_fit_minimises_mc_nll():
    # Samples that disagree: the fit must minimise the NLL of the averaged softmax, which is
    # not the NLL of the averaged logits.
    rng = np.random.default_rng(3)
    base = rng.normal(scale=4.0, size=(600, 3))
    samples = base + rng.normal(scale=3.0, size=(8, 600, 3))
    labels = (rng.random((600, 1)) > apply_temperature(base, 2.0).cumsum(1)).sum(1)
    fitted = fit_temperature(samples, labels)
    best = _mc_nll(samples, labels, fitted)
    for factor in (0.9, 0.97, 1.03, 1.1):
        assert best < _mc_nll(samples, labels, fitted * factor), factor
    assert abs(fitted - fit_temperature(samples.mean(0), labels)) > 0.05


def test_temperature_rejects_mismatched_samples():
    with pytest.raises(ValueError, match=r"\(S, N, num_classes\)"):
        fit_temperature(np.zeros((2, 3, 4)), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="expected log_probs of shape"):
        fit_temperature(np.zeros((2, 2, 3, 4)), np.zeros(3, dtype=int))
