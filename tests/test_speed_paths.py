"""Fast prediction and training paths: local reparameterization, sample chunks, one sync per
step, vectorised particles, and the quick mode of each benchmark script."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import REPO_ROOT

from guides import count_latent_params, make_guide
from models import BayesianLinearHead, CNNBackbone, HybridClassifier
from pipelines import prediction
from pipelines.data import BatchIterator, ImageSet
from pipelines.prediction import (
    gaussian_head_posterior,
    head_logits,
    local_reparameterization_logits,
    predict_bayesian,
    sample_posterior,
)
from pipelines.training import TrainingError, run_epochs, train_hybrid

NUM_CLASSES, NUM_FEATURES = 3, 8


def _hybrid(prior="normal", **prior_params):
    torch.manual_seed(0)
    backbone = CNNBackbone(1, (4, NUM_FEATURES), convs_per_block=1)
    return HybridClassifier(backbone, BayesianLinearHead(NUM_FEATURES, NUM_CLASSES, prior, **prior_params))


def _images(count=24):
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 255, (count, 1, 8, 8), dtype=torch.uint8, generator=generator)
    return ImageSet(pixels, torch.arange(count) % NUM_CLASSES)


def _wide_guide(hybrid, kind="normal", images=None):
    """A guide with spread-out locations and scales, so the logit variance matters."""
    generator = torch.Generator().manual_seed(2)
    init_loc = {"head.weight": 2.0 * torch.randn(NUM_CLASSES, NUM_FEATURES, generator=generator),
                "head.bias": torch.randn(NUM_CLASSES, generator=generator)}
    features = hybrid.features(next(iter(BatchIterator(images or _images(), 2, [0.5], [0.25])))[0])
    targets = torch.zeros(len(features), dtype=torch.long)
    num_params = count_latent_params(hybrid.head.model, features, targets)
    guide = make_guide(hybrid.head.model, kind, init_scale=0.8, init_loc=init_loc, num_params=num_params)
    guide(features, targets)
    return guide


def _loader(images, batch_size=24):
    return BatchIterator(images, batch_size, [0.5], [0.25])


@pytest.mark.parametrize("kind", ["normal", "diagonal", "meanfield"])
def test_local_reparameterization_matches_weights(kind):
    """Per-input predictive of both paths agrees within Monte-Carlo error (S = 20,000 each)."""
    hybrid, images = _hybrid(), _images()
    guide = _wide_guide(hybrid, kind)
    num_samples = 20_000
    by_weights = predict_bayesian(hybrid, guide, _loader(images), num_samples, seed=1, keep_samples=True)
    local = predict_bayesian(hybrid, guide, _loader(images), num_samples, seed=2, keep_samples=True,
                             local_reparameterization=True)

    # Standard error of each mean probability from the per-sample spread; the difference of two
    # independent estimates has the root sum of squares of theirs.
    standard_error = np.sqrt(by_weights.sample_probs.var(0) / num_samples + local.sample_probs.var(0) / num_samples)
    difference = np.abs(by_weights.probs - local.probs)
    assert standard_error.max() < 0.01
    assert (difference <= 5 * standard_error + 1e-12).all(), (difference / standard_error).max()
    # The guide is wide, so the predictive is far from the softmax at the mean weights.
    assert np.abs(by_weights.probs - by_weights.sample_probs[0]).max() > 0.05
    assert np.allclose(local.probs.sum(1), 1.0, atol=1e-12)


def test_local_reparameterization_drops_variance_terms_detectably():
    """The comparison above can fail: logits without the variance term give other probabilities."""
    hybrid, images = _hybrid(), _images()
    guide = _wide_guide(hybrid)
    features = hybrid.features(_loader(images).transform(images.images))
    posterior = gaussian_head_posterior(hybrid.head, guide, features[:1])
    mean, _ = posterior.logit_moments(features)
    at_mean = torch.softmax(mean, -1).numpy()
    local = predict_bayesian(hybrid, guide, _loader(images), 20_000, seed=2, local_reparameterization=True)
    assert np.abs(local.probs - at_mean).max() > 0.05


def test_logit_moments_by_hand():
    posterior = prediction.GaussianHeadPosterior(
        weight_loc=torch.tensor([[1.0, -1.0], [0.5, 2.0]]),
        weight_scale=torch.tensor([[0.1, 0.2], [0.3, 0.4]]),
        bias_loc=torch.tensor([0.25, -0.5]),
        bias_scale=torch.tensor([0.5, 1.0]),
    )
    mean, variance = posterior.logit_moments(torch.tensor([[2.0, 3.0]]))
    # Class 0: 2*1 + 3*(-1) + 0.25 = -0.75; variance 4*0.01 + 9*0.04 + 0.25 = 0.65.
    # Class 1: 2*0.5 + 3*2 - 0.5 = 6.5; variance 4*0.09 + 9*0.16 + 1 = 2.8.
    assert torch.allclose(mean, torch.tensor([[-0.75, 6.5]], dtype=torch.float64))
    assert torch.allclose(variance, torch.tensor([[0.65, 2.8]], dtype=torch.float64))


def test_local_logits_have_marginal_moments():
    hybrid = _hybrid()
    guide = _wide_guide(hybrid)
    features = torch.rand(4, NUM_FEATURES)
    posterior = gaussian_head_posterior(hybrid.head, guide, features[:1])
    mean, variance = posterior.logit_moments(features)
    logits = local_reparameterization_logits(posterior, features, 40_000)
    assert logits.shape == (40_000, 4, NUM_CLASSES)
    assert logits.dtype == torch.float64
    # Standard error of a sample mean is sqrt(var / S); of a sample variance about var * sqrt(2 / S).
    assert ((logits.mean(0) - mean).abs() <= 5 * (variance / 40_000).sqrt()).all()
    assert ((logits.var(0) - variance).abs() <= 5 * variance * math.sqrt(2 / 40_000)).all()


def test_guide_moments_read_from_store():
    hybrid = _hybrid()
    guide = _wide_guide(hybrid)
    posterior = gaussian_head_posterior(hybrid.head, guide, torch.rand(1, NUM_FEATURES))
    store = pyro.get_param_store()
    assert torch.equal(posterior.weight_loc, store["AutoNormal.locs.head.weight"].detach())
    assert torch.equal(posterior.bias_scale, store["AutoNormal.scales.head.bias"].detach())
    assert torch.allclose(posterior.weight_scale, torch.full((NUM_CLASSES, NUM_FEATURES), 0.8))


@pytest.mark.parametrize("kind", ["lowrank", "multivariate", "delta", "laplace"])
def test_local_reparameterization_rejects_guide(kind):
    hybrid, images = _hybrid(), _images()
    guide = _wide_guide(hybrid, kind)
    expected = (r"needs a mean-field Gaussian guide, got Auto\w+; supported guides: normal \(AutoNormal\), "
                r"diagonal \(AutoDiagonalNormal\), meanfield")
    with pytest.raises(ValueError, match=expected):
        predict_bayesian(hybrid, guide, _loader(images), 10, local_reparameterization=True)


def test_local_reparameterization_rejects_hierarchical():
    hybrid, images = _hybrid("hierarchical"), _images()
    features = hybrid.features(_loader(images).transform(images.images[:2]))
    guide = make_guide(hybrid.head.model, "normal")
    guide(features, images.labels[:2])
    with pytest.raises(ValueError, match=r"exactly the sites head\.weight and head\.bias, got head\.bias, "
                                         r"head\.scale, head\.weight"):
        predict_bayesian(hybrid, guide, _loader(images), 10, local_reparameterization=True)


def test_local_reparameterization_rejects_positive_prior():
    hybrid, images = _hybrid(lambda shape: dist.LogNormal(0.0, 1.0).expand(shape)), _images()
    features = hybrid.features(_loader(images).transform(images.images[:2]))
    guide = make_guide(hybrid.head.model, "normal")
    guide(features, images.labels[:2])
    with pytest.raises(ValueError, match=r"real-valued weight and bias sites, but the prior of head\.weight"):
        predict_bayesian(hybrid, guide, _loader(images), 10, local_reparameterization=True)


def test_local_reparameterization_rejects_gaussian():
    head = BayesianLinearHead(NUM_FEATURES, 2, likelihood="gaussian", noise_scale=1.0)
    guide = make_guide(head.model, "normal")
    guide(torch.rand(2, NUM_FEATURES), torch.rand(2, 2))
    with pytest.raises(ValueError, match="needs the categorical likelihood; this head has 'gaussian'"):
        gaussian_head_posterior(head, guide, torch.rand(1, NUM_FEATURES))


@pytest.mark.parametrize("prior", ["normal", "hierarchical"])
def test_direct_head_matches_predictive(prior):
    """predict_bayesian's direct matmul gives what Predictive gives on the same samples."""
    hybrid, images = _hybrid(prior), _images()
    loader = _loader(images)
    x, y = next(iter(loader))
    features = hybrid.features(x)
    guide = make_guide(hybrid.head.model, "normal", init_scale=0.5)
    guide(features[:2], y[:2])

    fast = predict_bayesian(hybrid, guide, loader, num_samples=30, seed=4)
    pyro.set_rng_seed(4)
    samples = sample_posterior(hybrid.head.model, guide, 30, features[:1])
    per_sample = torch.log_softmax(head_logits(hybrid.head.model, samples, features).double(), -1)
    reference = (torch.logsumexp(per_sample, 0) - math.log(30)).numpy()
    assert np.allclose(fast.log_probs, reference, atol=1e-12)


@pytest.mark.parametrize("local", [False, True])
def test_large_num_samples_rows_sum_to_one(local):
    hybrid, images = _hybrid(), _images(40)
    guide = _wide_guide(hybrid, images=images)
    predictions = predict_bayesian(hybrid, guide, _loader(images, 16), num_samples=1000,
                                   local_reparameterization=local)
    assert predictions.probs.shape == (40, NUM_CLASSES)
    assert np.allclose(predictions.probs.sum(1), 1.0, atol=1e-12)
    assert np.isfinite(predictions.expected_entropy).all()
    assert (predictions.mutual_information >= 0).all()


def test_sample_chunks_do_not_change_result(monkeypatch):
    hybrid, images = _hybrid(), _images()
    guide = _wide_guide(hybrid)
    whole = predict_bayesian(hybrid, guide, _loader(images), num_samples=100, seed=5, keep_samples=True)
    in_sevens = predict_bayesian(hybrid, guide, _loader(images), num_samples=100, seed=5, keep_samples=True,
                                 samples_per_chunk=7)
    # A budget of 200 logits makes the default chunk 200 // (24 * 3) = 2 samples.
    monkeypatch.setattr(prediction, "CHUNK_ELEMENTS", 200)
    in_twos = predict_bayesian(hybrid, guide, _loader(images), num_samples=100, seed=5)
    assert prediction._chunk_size(None, 24, NUM_CLASSES) == 2
    # The same weight samples in smaller products: only float32 rounding of the logits differs.
    for chunked in (in_sevens, in_twos):
        assert np.allclose(chunked.log_probs, whole.log_probs, rtol=0, atol=1e-6)
        assert np.allclose(chunked.expected_entropy, whole.expected_entropy, rtol=0, atol=1e-6)
    assert np.allclose(in_sevens.sample_probs, whole.sample_probs, rtol=0, atol=1e-6)


def test_samples_per_chunk_zero_rejected():
    hybrid, images = _hybrid(), _images()
    guide = _wide_guide(hybrid)
    with pytest.raises(ValueError, match="samples_per_chunk must be at least 1 or None, got 0"):
        predict_bayesian(hybrid, guide, _loader(images), 10, samples_per_chunk=0)


def test_cli_flag_reaches_prediction():
    from models import DeterministicClassifier
    from pipelines.cli import build_parser, config_from_args
    from pipelines.runner import TrainedModels, predict_both

    config = config_from_args(build_parser().parse_args(["run", "--local-reparameterization"]))
    assert config.local_reparameterization is True
    assert config_from_args(build_parser().parse_args(["run"])).local_reparameterization is False

    hybrid, images = _hybrid(), _images()
    guide = _wide_guide(hybrid)
    deterministic = DeterministicClassifier(CNNBackbone(1, (4, NUM_FEATURES), convs_per_block=1), NUM_CLASSES)
    models = TrainedModels(deterministic, hybrid, guide, {})
    config.num_samples = 50
    local = predict_both(config, models, _loader(images))["bayesian"]
    expected = predict_bayesian(hybrid, guide, _loader(images), 50, seed=config.seed, local_reparameterization=True)
    assert np.array_equal(local.probs, expected.probs)
    config.local_reparameterization = False
    by_weights = predict_both(config, models, _loader(images))["bayesian"]
    assert not np.array_equal(local.probs, by_weights.probs)


def test_nonfinite_loss_stops_before_update():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [(torch.zeros(2), torch.zeros(2))] * 3

    def step(images, labels, epoch, index):
        loss = weight.sum()
        return loss * float("nan") if index == 1 else loss

    with pytest.raises(TrainingError, match=r"the loss became nan at epoch 1, step 2"):
        run_epochs(step, batches, optimizer, scheduler, epochs=1, description="test", progress=False)
    # One SGD step on sum(w) moved each weight by -lr; the NaN step never reached them.
    assert torch.allclose(weight.detach(), torch.full((3,), 0.9))


def test_run_epochs_mean_loss():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [(torch.zeros(3), torch.zeros(3)), (torch.zeros(1), torch.zeros(1))]
    losses = iter([2.0, 6.0])

    def step(images, labels, epoch, index):
        return weight.sum() + next(losses)

    result = run_epochs(step, batches, optimizer, scheduler, epochs=1, description="test", progress=False)
    assert result.losses == [pytest.approx((3 * 2.0 + 1 * 6.0) / 4)]  # weighted by batch size


def test_particles_run_backbone_once_per_step():
    hybrid, images = _hybrid(), _images(32)
    loader = BatchIterator(images, 8, [0.5], [0.25], shuffle=True)
    features = hybrid.features(next(iter(loader))[0])
    guide = make_guide(hybrid.head.model, "normal")
    guide(features[:2], images.labels[:2])
    calls = []
    hybrid.backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))

    result = train_hybrid(hybrid, guide, loader, epochs=1, lr=0.01, weight_decay=0.0, num_particles=4,
                          progress=False)
    assert math.isfinite(result.losses[0])
    # One call collects the parameters, then one per step: 4 particles share one backbone pass.
    assert len(calls) == 1 + len(loader)
    assert calls[1:] == [8, 8, 8, 8]


# --------------------------------------------------------------------------------------------
# Quick mode of the benchmark scripts

RATIO_LINE = re.compile(r"^ratio (?P<label>.+): (?P<value>[0-9]+\.[0-9]+)", re.MULTILINE)


def _run_benchmark(script: str, root, *options: str) -> str:
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / script), "--quick", "--data-dir", str(root),
               "--threads", "1", *options]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout


def _ratios(output: str) -> dict[str, float]:
    """Wall-time ratios by label; each must come with its ``[CPU time]`` twin."""
    ratios = {match["label"]: float(match["value"]) for match in RATIO_LINE.finditer(output)}
    for label, value in ratios.items():
        assert math.isfinite(value), label
        assert value > 0, label
    wall = {label: value for label, value in ratios.items() if not label.endswith(" [CPU time]")}
    assert sorted(ratios) == sorted(list(wall) + [f"{label} [CPU time]" for label in wall])
    return wall


def test_prediction_benchmark_quick(cifar_jpeg_root):
    ratios = _ratios(_run_benchmark("prediction_speed.py", cifar_jpeg_root, "--subset", "40"))
    assert sorted(ratios) == sorted([
        "bayesian S=20 / deterministic",
        "bayesian S=20 local reparameterization / deterministic",
        "bayesian S=100 / deterministic",
        "bayesian S=100 local reparameterization / deterministic",
        "naive Predictive parallel=False S=20 / ours S=20",
        "naive Predictive parallel=True S=20 / ours S=20",
    ])


def test_training_benchmark_quick(cifar_jpeg_root):
    output = _run_benchmark("training_speed.py", cifar_jpeg_root, "--subset", "32")
    assert sorted(_ratios(output)) == [
        "joint SVI epoch / deterministic epoch",
        "joint SVI epoch, 4 vectorised particles / deterministic epoch",
    ]
    assert re.search(r"^plate subsample draw \(randperm of 45000\): [0-9.]+ ms per step", output, re.MULTILINE)
    assert re.search(r"^head-only step on cached features \(batch of 32\): Pyro Trace_ELBO [0-9.]+ ms", output,
                     re.MULTILINE)


def test_memory_benchmark_quick(cifar_jpeg_root):
    output = _run_benchmark("peak_memory.py", cifar_jpeg_root, "--subset", "24",
                            "--only", "predict bayesian S=1000", "--only", "train joint SVI epoch")
    lines = re.findall(r"^memory (.+) \((\d+) images\): peak RSS (\d+) MiB, after setup (\d+) MiB", output,
                       re.MULTILINE)
    assert [line[0] for line in lines] == ["predict bayesian S=1000", "train joint SVI epoch"]
    for _, images, peak, setup in lines:
        assert int(images) == 24
        assert int(peak) >= int(setup) > 0
    assert "rows sum to 1: True" in output


def test_peer_benchmark_quick(cifar_jpeg_root):
    output = _run_benchmark("peer_predictive.py", cifar_jpeg_root, "--subset", "8")
    ratios = _ratios(output)
    # Each peer either gives its ratio or a line saying why it was skipped.
    assert any(label.startswith("tyxe predict S=20") for label in ratios) or "skipped tyxe:" in output
    assert "laplace-torch nn mc S=20 / ours S=20" in ratios or "skipped laplace-torch:" in output
