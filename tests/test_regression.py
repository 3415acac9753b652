"""Gaussian likelihood: closed-form posterior, regression metrics and the tabular pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pyro
import pytest
import torch
from scipy.special import ndtr

from guides import make_guide
from models import BayesianLinearHead
from pipelines.cli import build_parser, config_from_args, main
from pipelines.config import ConfigError, RunConfig
from pipelines.data import DataError
from pipelines.regression import (
    RegressionPredictions,
    load_tabular,
    mixture_quantile,
    read_table,
    regression_metrics,
)
from pipelines.training import FeatureLoader, train_svi

NOISE, PRIOR_SCALE = 0.5, 0.5


def _linear_data(count=20):
    """``y = x w + b + noise`` with known noise; returns features, targets and the exact posterior.

    With the prior ``N(0, PRIOR_SCALE**2 I)`` on ``(w, b)`` and the design ``Phi = [x, 1]``, the
    posterior is Gaussian with precision ``I / PRIOR_SCALE**2 + Phi^T Phi / NOISE**2`` and mean
    ``covariance @ Phi^T y / NOISE**2``.
    """
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(count, 3, generator=generator)
    targets = features @ torch.tensor([1.0, -2.0, 0.5]) + 0.7 + NOISE * torch.randn(count, generator=generator)
    design = torch.cat([features, torch.ones(count, 1)], 1).double()
    precision = torch.eye(4, dtype=torch.float64) / PRIOR_SCALE**2 + design.T @ design / NOISE**2
    covariance = torch.linalg.inv(precision)
    mean = covariance @ design.T @ targets.double() / NOISE**2
    return features, targets, mean, covariance, precision


def _fit(kind: str, elbo: str, num_particles: int):
    features, targets, mean, covariance, precision = _linear_data()
    head = BayesianLinearHead(3, 1, "normal", likelihood="gaussian", noise_scale=NOISE, scale=PRIOR_SCALE)
    guide = make_guide(head.model, kind, num_params=4, init_scale=0.1)
    guide(features[:2], targets[:2])
    loader = FeatureLoader(features, targets, len(targets), torch.Generator().manual_seed(0))
    train_svi(head.model, guide, loader, epochs=150, lr=0.1, elbo=elbo, num_particles=num_particles, progress=False)
    return guide, mean, covariance, precision


def test_multivariate_guide_reaches_closed_form_posterior():
    """Mean within 0.3 posterior standard deviations, covariance within 10% of its largest entry.

    Ignoring the prior would move the mean by about 0.6 standard deviations here, and a
    likelihood scaled wrongly by 2 would change every variance by 2.
    """
    guide, mean, covariance, _ = _fit("multivariate", "trace", num_particles=32)
    posterior = guide.get_posterior()
    fitted_mean = posterior.loc.double()  # order: head.weight (3), then head.bias (1)
    fitted_covariance = posterior.covariance_matrix.double()

    standard_deviation = covariance.diagonal().sqrt()
    assert ((fitted_mean - mean).abs() / standard_deviation).max() < 0.3
    assert (fitted_covariance - covariance).abs().max() < 0.1 * covariance.abs().max()
    assert torch.allclose(fitted_covariance.diagonal().sqrt(), standard_deviation, rtol=0.1)


def test_meanfield_guide_means_match_closed_form():
    """Mean-field VI on a Gaussian posterior finds the exact means and the variances 1 / precision_ii."""
    _, mean, covariance, precision = _fit("meanfield", "meanfield", num_particles=16)
    store = pyro.get_param_store()
    locs = torch.cat([store["MeanFieldGuide.locs.head.weight"].flatten(), store["MeanFieldGuide.locs.head.bias"]])
    scales = torch.cat([store["MeanFieldGuide.scales.head.weight"].flatten(),
                        store["MeanFieldGuide.scales.head.bias"]])

    assert ((locs.double() - mean).abs() / covariance.diagonal().sqrt()).max() < 0.3
    assert torch.allclose(scales.double(), precision.diagonal().rsqrt(), rtol=0.1)


def test_ignoring_prior_would_fail_the_tolerance():
    """The closed-form tests can fail: the maximum-likelihood mean lies outside their tolerance."""
    features, targets, mean, covariance, _ = _linear_data()
    design = torch.cat([features, torch.ones(len(targets), 1)], 1).double()
    least_squares = torch.linalg.lstsq(design, targets.double()[:, None]).solution.squeeze(-1)
    assert ((least_squares - mean).abs() / covariance.diagonal().sqrt()).max() > 0.3


# ------------------------------------------------------------------------------------------
# Metrics


def test_metrics_single_gaussian_by_hand():
    """One sample, sigma 2: NLL = log(2) + log(2 pi)/2 + mean(r**2)/8; interval = mean +- 1.6449 * 2."""
    predictions = RegressionPredictions(sample_means=np.array([[0.0, 1.0, 2.0, 3.0]]), noise_scale=2.0,
                                        targets=np.array([1.0, 1.0, 6.0, 0.0]))
    metrics = regression_metrics(predictions)
    residuals = np.array([1.0, 0.0, 4.0, -3.0])
    assert metrics["rmse"] == pytest.approx(math.sqrt(np.mean(residuals**2)))
    assert metrics["nll"] == pytest.approx(math.log(2.0) + 0.5 * math.log(2 * math.pi) + np.mean(residuals**2) / 8)
    # 1.6448536... is the 95% quantile of the standard normal.
    assert metrics["interval_width_90"] == pytest.approx(2 * 1.6448536269514722 * 2.0, rel=1e-9)
    assert metrics["coverage_90"] == 0.75  # |r| <= 3.29 for all but the residual 4


def test_mixture_quantile_solves_mixture_cdf():
    means = np.array([[-1.0, 0.0, 5.0], [1.0, 0.5, 5.0], [3.0, 0.2, 5.0]])
    for level in (0.05, 0.5, 0.95):
        quantile = mixture_quantile(means, 0.7, level)
        cdf = ndtr((quantile - means) / 0.7).mean(0)
        assert np.allclose(cdf, level, atol=1e-12)
    symmetric = mixture_quantile(np.array([[-1.0], [1.0]]), 1.0, 0.5)
    assert symmetric[0] == pytest.approx(0.0, abs=1e-12)


def test_mixture_nll_uses_log_mean_exp():
    predictions = RegressionPredictions(sample_means=np.array([[0.0], [2.0]]), noise_scale=1.0,
                                        targets=np.array([1.0]))
    density = 0.5 * (math.exp(-0.5) + math.exp(-0.5)) / math.sqrt(2 * math.pi)
    assert regression_metrics(predictions)["nll"] == pytest.approx(-math.log(density))


def test_calibrated_predictions_cover_ninety_percent():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(1, 20000))
    targets = means[0] + 0.3 * rng.normal(size=20000)
    metrics = regression_metrics(RegressionPredictions(means, 0.3, targets))
    assert metrics["coverage_90"] == pytest.approx(0.9, abs=0.01)  # binomial sd is 0.002
    assert metrics["rmse"] == pytest.approx(0.3, rel=0.03)


# ------------------------------------------------------------------------------------------
# Tabular data


def _write_csv(path, rows=120, header=True, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(rows, 3))
    target = 3.0 * inputs[:, 0] - 2.0 * inputs[:, 1] + 0.5 * inputs[:, 2] + 10.0 + 0.2 * rng.normal(size=rows)
    lines = ["a,b,c,price"] if header else []
    lines += [",".join(f"{value:.6f}" for value in row) + f",{t:.6f}" for row, t in zip(inputs, target, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_table_with_and_without_header(tmp_path):
    columns, values = read_table(_write_csv(tmp_path / "a.csv", rows=5))
    assert columns == ["a", "b", "c", "price"]
    assert values.shape == (5, 4)
    columns, values = read_table(_write_csv(tmp_path / "b.csv", rows=5, header=False))
    assert columns == ["x0", "x1", "x2", "y"]
    assert values.shape == (5, 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b\n1,2\n3,oops\n", r"line 3, column 2: 'oops' is not a finite number"),
        ("a,b\n1,2\n3\n", "line 3: expected 2 columns, got 1"),
        ("a\n1\n2\n", "expected at least two columns"),
        ("a,b\n1,nan\n", "'nan' is not a finite number"),
        ("", "the CSV file is empty"),
    ],
)
def test_read_table_rejects_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_table(path)


def test_read_table_missing_file(tmp_path):
    with pytest.raises(DataError, match="tabular data file .*absent.csv not found"):
        read_table(tmp_path / "absent.csv")


def test_load_tabular_splits_and_standardises(tmp_path):
    data = load_tabular(_write_csv(tmp_path / "data.csv", rows=100), val_fraction=0.1)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (72, 8, 20)
    assert data.target == "price"
    assert torch.allclose(data.train_x.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(data.train_x.std(0, unbiased=False), torch.ones(3), atol=1e-5)
    assert float(data.train_y.mean()) == pytest.approx(0.0, abs=1e-5)
    assert data.y_mean == pytest.approx(10.0, abs=1.0)
    again = load_tabular(tmp_path / "data.csv", val_fraction=0.1, seed=5)
    assert torch.equal(again.test_y, data.test_y)  # the split does not depend on the run's seed


def test_load_tabular_too_few_rows(tmp_path):
    with pytest.raises(DataError, match="2 rows leave 2 for training and 0 for testing"):
        load_tabular(_write_csv(tmp_path / "small.csv", rows=2), val_fraction=0.0)


# ------------------------------------------------------------------------------------------
# Config and CLI


def test_regression_config_errors():
    with pytest.raises(ConfigError, match="--likelihood gaussian needs a regression dataset"):
        RunConfig(likelihood="gaussian").validate()
    with pytest.raises(ConfigError, match="--dataset tabular has real-valued targets; add --likelihood gaussian"):
        RunConfig(dataset="tabular").validate()
    with pytest.raises(ConfigError, match="invalid --noise-scale -1.0; expected a positive number or 'learned'"):
        RunConfig(dataset="tabular", likelihood="gaussian", noise_scale=-1.0).validate()


@pytest.mark.parametrize("value", ["0", "abc", "-2"])
def test_noise_scale_flag_rejects_invalid(value, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--dataset", "tabular", "--likelihood", "gaussian", "--noise-scale", value])
    assert "expected a positive number or 'learned'" in capsys.readouterr().err


def test_noise_scale_flag_values():
    parser = build_parser()
    fixed = config_from_args(parser.parse_args(
        ["run", "--dataset", "tabular", "--likelihood", "gaussian", "--noise-scale", "0.25"]))
    learned = config_from_args(parser.parse_args(
        ["run", "--dataset", "tabular", "--likelihood", "gaussian", "--noise-scale", "learned"]))
    assert fixed.fixed_noise_scale() == 0.25
    assert learned.fixed_noise_scale() is None


# ------------------------------------------------------------------------------------------
# The pipeline end to end


def _run_args(csv, out, *extra):
    return ["run", "--dataset", "tabular", "--data-dir", str(csv), "--likelihood", "gaussian", "--epochs", "40",
            "--lr", "0.03", "--widths", "16", "--batch-size", "32", "--num-samples", "20", "--out", str(out),
            "--device", "cpu", "--no-progress", *extra]


def test_regression_run_and_evaluate(tmp_path, capsys):
    csv = _write_csv(tmp_path / "data.csv", rows=200)
    out = tmp_path / "run"
    assert main(_run_args(csv, out)) == 0
    assert "| MLP + Bayesian head (SVI) |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())

    assert report["task"] == "regression"
    assert report["sizes"] == {"train": 144, "val": 16, "test": 40}
    target_sd = report["normalization"]["y_std"]  # about 3.6
    for name in ("deterministic", "bayesian"):
        row = report["models"][name]
        assert row["rmse"] < 0.5 * target_sd, name  # a linear target: both models learn it
        assert 0.0 <= row["coverage_90"] <= 1.0
        assert row["interval_width_90"] > 0
        assert math.isfinite(row["nll"])
    bayesian = report["models"]["bayesian"]
    assert bayesian["noise_learned"] is True
    assert bayesian["guide_class"] == "AutoNormal"
    assert "| MLP (mean squared error) |" in (out / "report.md").read_text()

    assert main(["evaluate", str(out)]) == 0
    recomputed = json.loads((out / "evaluation.json").read_text())["models"]
    for name in ("deterministic", "bayesian"):
        for key in ("rmse", "nll", "coverage_90", "interval_width_90"):
            assert recomputed[name][key] == pytest.approx(report["models"][name][key], abs=1e-6), (name, key)


def test_regression_fixed_noise_and_laplace_two_stage(tmp_path):
    from pipelines.runner import evaluate, run

    csv = _write_csv(tmp_path / "data.csv", rows=150)
    parser = build_parser()
    config = config_from_args(parser.parse_args(_run_args(
        csv, tmp_path / "run", "--noise-scale", "0.3", "--guide", "laplace", "--scheme", "two-stage",
        "--head-epochs", "20")))
    report = run(config)
    bayesian = report["models"]["bayesian"]
    assert bayesian["noise_scale"] == pytest.approx(0.3, rel=1e-6)  # given in the target's units
    assert bayesian["noise_learned"] is False
    assert bayesian["guide_class"] == "AutoMultivariateNormal"

    evaluated = evaluate(tmp_path / "run")
    assert evaluated["recomputed"]["bayesian"]["nll"] == pytest.approx(bayesian["nll"], abs=1e-9)
