"""Priors, guides and objectives: every combination trains and predicts; values checked by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_value

from guides import (
    GUIDE_NAMES,
    MAX_MULTIVARIATE_PARAMS,
    MeanFieldGuide,
    check_meanfield_elbo,
    count_latent_params,
    laplace_from_state,
    laplace_posterior,
    laplace_state,
    make_guide,
)
from models import (
    PRIOR_NAMES,
    BayesianLinearHead,
    CNNBackbone,
    HybridClassifier,
    StudentTPrior,
    make_prior,
)
from pipelines.config import ConfigError, RunConfig
from pipelines.data import BatchIterator, ImageSet, load_dataset
from pipelines.prediction import head_logits, predict_bayesian, sample_posterior
from pipelines.training import (
    FeatureLoader,
    KLWeight,
    collect_svi_params,
    kl_weight_at,
    make_elbo,
    train_hybrid,
)

FEATURES = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [-0.2, 0.8, 0.1],
                         [1.0, 1.0, -1.0], [-1.3, 0.2, 0.6], [0.0, -0.5, 1.2]])
TARGETS = torch.tensor([0, 1, 1, 0, 1, 0])
NUM_DATA = 60  # the batch of 6 stands for a training set of 60, so the likelihood is scaled by 10


def _head_and_guide(prior: str, kind: str, init_scale: float = 0.1):
    head = BayesianLinearHead(3, 2, prior)
    num_params = count_latent_params(head.model, FEATURES, TARGETS)
    guide = make_guide(head.model, kind, init_scale=init_scale, rank=2, num_params=num_params)
    guide(FEATURES, TARGETS, NUM_DATA)
    return head, guide


def _param_values() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in store.keys()}


@pytest.mark.parametrize(("prior", "kind"), list(itertools.product(PRIOR_NAMES, GUIDE_NAMES)))
def test_every_prior_with_every_guide(prior, kind):
    head, guide = _head_and_guide(prior, kind)
    elbo = make_elbo("trace", num_particles=2)
    params = collect_svi_params(elbo, head.model, guide, FEATURES, TARGETS, NUM_DATA)
    optimizer = torch.optim.Adam(params, lr=0.05)
    before = _param_values()

    loss = elbo.differentiable_loss(head.model, guide, FEATURES, TARGETS, NUM_DATA)
    loss.backward()
    optimizer.step()

    assert loss.shape == ()
    assert torch.isfinite(loss)
    after = _param_values()
    assert any(not torch.equal(before[name], after[name]) for name in before), "the SVI step changed nothing"

    samples = sample_posterior(head.model, guide, 5, FEATURES[:1])
    assert samples["head.weight"].shape == (5, 2, 3)
    assert samples["head.bias"].shape == (5, 2)
    if prior == "hierarchical":
        assert samples["head.scale"].shape == (5, 2)
        assert (samples["head.scale"] > 0).all()
    logits = head_logits(head.model, samples, FEATURES)
    assert logits.shape == (5, 6, 2)
    probs = torch.softmax(logits, -1).mean(0)
    assert torch.allclose(probs.sum(-1), torch.ones(6))
    spread = samples["head.weight"].std(0).max()
    if kind in ("delta", "laplace"):
        assert spread == 0  # point estimates: every draw is the MAP
    else:
        assert spread > 0


@pytest.mark.parametrize(("prior", "kind"), [("hierarchical", "normal"), ("scale-mixture", "lowrank"),
                                             ("student-t", "meanfield"), ("laplace", "diagonal")])
def test_hybrid_trains_and_predicts(prior, kind):
    torch.manual_seed(0)
    hybrid = HybridClassifier(CNNBackbone(1, (4, 8), convs_per_block=1), BayesianLinearHead(8, 3, prior))
    images = ImageSet(torch.randint(0, 255, (24, 1, 8, 8), dtype=torch.uint8), torch.arange(24) % 3)
    loader = BatchIterator(images, 8, [0.5], [0.25], shuffle=True)
    x, y = next(iter(loader))
    guide = make_guide(hybrid.head.model, kind, rank=2, init_scale=0.1)
    guide(hybrid.features(x), y)

    result = train_hybrid(hybrid, guide, loader, epochs=2, lr=0.01, weight_decay=0.0, num_particles=2,
                          progress=False)
    predictions = predict_bayesian(hybrid, guide, BatchIterator(images, 10, [0.5], [0.25]), num_samples=4)

    assert len(result.losses) == 2
    assert all(math.isfinite(loss) for loss in result.losses)
    assert predictions.probs.shape == (24, 3)
    assert np.allclose(predictions.probs.sum(1), 1.0, atol=1e-12)


def test_scale_mixture_density_is_two_normals():
    prior = make_prior("scale-mixture", pi=0.25, sigma1=1.5, sigma2=0.1)
    values = torch.tensor([-2.0, -0.05, 0.0, 0.3])
    expected = torch.log(0.25 * dist.Normal(0.0, 1.5).log_prob(values).exp()
                         + 0.75 * dist.Normal(0.0, 0.1).log_prob(values).exp())
    log_prob = prior.distribution(torch.Size((4,))).log_prob(values)
    assert torch.allclose(log_prob, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Hand-written guide and AutoNormal


def _copy_autonormal_params_to_meanfield():
    """Give both guides the same random locations and scales."""
    store = pyro.get_param_store()
    generator = torch.Generator().manual_seed(5)
    for name in list(store.keys()):
        if not name.startswith("AutoNormal.locs."):
            continue
        site = name[len("AutoNormal.locs."):]
        loc = torch.randn(store[name].shape, generator=generator)
        scale = torch.rand(store[name].shape, generator=generator) + 0.1
        store[name] = loc
        store[f"AutoNormal.scales.{site}"] = scale
        store[f"MeanFieldGuide.locs.{site}"] = loc.clone()
        store[f"MeanFieldGuide.scales.{site}"] = scale.clone()


@pytest.mark.parametrize("prior", ["normal", "hierarchical", "scale-mixture"])
def test_meanfield_guide_equals_autonormal(prior):
    """Same locations, scales and random numbers: same draws and the same Trace_ELBO.

    With the hierarchical prior this also covers a positive site, where both guides add the
    log-Jacobian of the exp transform.
    """
    head = BayesianLinearHead(3, 2, prior)
    auto = make_guide(head.model, "normal")
    handwritten = make_guide(head.model, "meanfield")
    auto(FEATURES, TARGETS, NUM_DATA)
    handwritten(FEATURES, TARGETS, NUM_DATA)
    _copy_autonormal_params_to_meanfield()

    losses, draws = [], []
    for guide in (auto, handwritten):
        pyro.set_rng_seed(11)
        losses.append(Trace_ELBO().loss(head.model, guide, FEATURES, TARGETS, NUM_DATA))
        pyro.set_rng_seed(11)
        draws.append(guide(FEATURES, TARGETS, NUM_DATA))

    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name in draws[0]:
        assert torch.allclose(draws[0][name], draws[1][name], atol=1e-6), name


def test_meanfield_guide_initial_values_in_constrained_space():
    head = BayesianLinearHead(3, 2, "hierarchical")
    guide = MeanFieldGuide(head.model, init_loc={"head.scale": torch.tensor([2.0, 0.5])})
    guide(FEATURES, TARGETS)
    store = pyro.get_param_store()
    assert torch.allclose(store["MeanFieldGuide.locs.head.scale"], torch.log(torch.tensor([2.0, 0.5])))
    assert torch.equal(store["MeanFieldGuide.locs.head.weight"], torch.zeros(2, 3))
    assert torch.allclose(store["MeanFieldGuide.scales.head.weight"], torch.full((2, 3), 0.01))


def test_meanfield_guide_rejects_unknown_site():
    head = BayesianLinearHead(3, 2)
    guide = MeanFieldGuide(head.model, init_loc={"head.weights": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="init_loc names head.weights, which are not latent sites"):
        guide(FEATURES, TARGETS)


# ------------------------------------------------------------------------------------------
# Objectives


def test_tracemeanfield_uses_analytic_kl_for_meanfield_guide():
    """loss = -(N/B) log p(y | w_draw) + KL(q || p), the KL from torch.distributions."""
    head = BayesianLinearHead(3, 2, "normal", scale=0.7)
    guide = make_guide(head.model, "meanfield", init_scale=0.3)
    guide(FEATURES, TARGETS, NUM_DATA)

    pyro.set_rng_seed(3)
    loss = TraceMeanField_ELBO().loss(head.model, guide, FEATURES, TARGETS, NUM_DATA)
    pyro.set_rng_seed(3)
    draw = guide(FEATURES, TARGETS, NUM_DATA)

    store = pyro.get_param_store()
    kl = sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(store[f"MeanFieldGuide.locs.{site}"], store[f"MeanFieldGuide.scales.{site}"]),
            torch.distributions.Normal(0.0, 0.7),
        ).sum()
        for site in ("head.weight", "head.bias")
    )
    logits = FEATURES @ draw["head.weight"].T + draw["head.bias"]
    log_lik = torch.log_softmax(logits, -1)[torch.arange(6), TARGETS].sum()
    expected = -(NUM_DATA / 6) * log_lik + kl
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_tracemeanfield_equals_trace_in_expectation():
    """Both objectives estimate the same ELBO; 20,000 vectorised particles each.

    The Monte-Carlo standard error of each estimate is about 0.01 here, so 0.1 is a wide margin.
    """
    head = BayesianLinearHead(3, 2, "normal", scale=0.7)
    guide = make_guide(head.model, "meanfield", init_scale=0.3)
    guide(FEATURES, TARGETS, NUM_DATA)
    options = {"num_particles": 20000, "vectorize_particles": True, "max_plate_nesting": 1}
    trace = Trace_ELBO(**options).loss(head.model, guide, FEATURES, TARGETS, NUM_DATA)
    meanfield = TraceMeanField_ELBO(**options).loss(head.model, guide, FEATURES, TARGETS, NUM_DATA)
    assert meanfield == pytest.approx(trace, abs=0.1)


def test_tracemeanfield_with_autonormal_is_monte_carlo():
    """AutoNormal's sites are Deltas, and Pyro's KL of a Delta is -log p(value): no analytic KL."""
    head = BayesianLinearHead(3, 2, "normal", scale=0.7)
    guide = make_guide(head.model, "normal", init_scale=0.3)
    guide(FEATURES, TARGETS, NUM_DATA)
    losses = []
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        pyro.set_rng_seed(4)
        losses.append(elbo.loss(head.model, guide, FEATURES, TARGETS, NUM_DATA))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_meanfield_elbo_check_rejects_autoguide_on_positive_site():
    head = BayesianLinearHead(3, 2, "hierarchical")
    auto = make_guide(head.model, "normal")
    auto(FEATURES, TARGETS)
    with pytest.raises(ValueError, match=r"log-Jacobian of the constrained site\(s\) head.scale"):
        check_meanfield_elbo(auto, FEATURES, TARGETS)

    handwritten = make_guide(head.model, "meanfield")
    handwritten(FEATURES, TARGETS)
    check_meanfield_elbo(handwritten, FEATURES, TARGETS)  # Normal sites: no Delta, no error

    plain = BayesianLinearHead(3, 2, "normal")
    real_sites = make_guide(plain.model, "normal")
    real_sites(FEATURES, TARGETS)
    check_meanfield_elbo(real_sites, FEATURES, TARGETS)  # real sites have no Jacobian


@pytest.mark.parametrize("prior", PRIOR_NAMES)
def test_vectorised_particles_average_not_sum(prior):
    """With a point-mass guide every particle is the same, so 4 particles give the 1-particle loss."""
    head = BayesianLinearHead(3, 2, prior)
    guide = AutoDelta(head.model)
    guide(FEATURES, TARGETS, NUM_DATA)
    single = make_elbo("trace", 1).loss(head.model, guide, FEATURES, TARGETS, NUM_DATA)
    for kind in ("trace", "meanfield"):
        vectorised = make_elbo(kind, 4).differentiable_loss(head.model, guide, FEATURES, TARGETS, NUM_DATA)
        assert vectorised.shape == ()
        assert vectorised.item() == pytest.approx(single, rel=1e-5)


def test_vectorised_particles_hierarchical_meanfield_guide():
    head = BayesianLinearHead(3, 2, "hierarchical")
    guide = make_guide(head.model, "meanfield", init_scale=0.1)
    guide(FEATURES, TARGETS, NUM_DATA)
    trace = poutine.trace(poutine.block(head.model, hide_types=["param"]))
    with pyro.plate("particles", 7, dim=-2):
        sites = trace.get_trace(FEATURES, TARGETS, NUM_DATA).nodes
    assert sites["head.weight"]["value"].shape == (7, 1, 2, 3)
    assert sites["obs"]["fn"].batch_shape == (7, 6)
    loss = make_elbo("meanfield", 7).differentiable_loss(head.model, guide, FEATURES, TARGETS, NUM_DATA)
    assert loss.shape == ()
    assert torch.isfinite(loss)


def _delta_head():
    head = BayesianLinearHead(3, 2, "normal", scale=0.5)
    weight = torch.tensor([[0.3, -0.2, 0.1], [0.1, 0.4, -0.3]])
    bias = torch.tensor([0.05, -0.1])
    guide = AutoDelta(head.model, init_loc_fn=init_to_value(values={"head.weight": weight, "head.bias": bias}))
    log_prior = dist.Normal(0.0, 0.5).log_prob(weight).sum() + dist.Normal(0.0, 0.5).log_prob(bias).sum()
    log_lik = torch.log_softmax(FEATURES @ weight.T + bias, -1)[torch.arange(6), TARGETS].sum()
    return head, guide, log_prior, log_lik


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_kl_weight_scales_prior_term_by_hand(beta):
    """With a point mass at W, b: loss = -(beta * log p(W, b) + (N/B) * log p(y | W, b))."""
    head, guide, log_prior, log_lik = _delta_head()
    weight = KLWeight(beta)
    loss = Trace_ELBO().loss(weight(head.model), weight(guide), FEATURES, TARGETS, NUM_DATA)
    expected = -(beta * log_prior + (NUM_DATA / 6) * log_lik)
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_kl_weight_linear_in_beta():
    """loss(beta) = -E[log lik] + beta * (log q - log p) at fixed draws: linear in beta."""
    head, guide = _head_and_guide("normal", "normal", init_scale=0.3)
    losses = {}
    for beta in (0.0, 0.5, 1.0):
        weight = KLWeight(beta)
        pyro.set_rng_seed(2)
        losses[beta] = Trace_ELBO().loss(weight(head.model), weight(guide), FEATURES, TARGETS, NUM_DATA)
    assert losses[0.5] == pytest.approx((losses[0.0] + losses[1.0]) / 2, rel=1e-5)
    assert losses[0.0] != pytest.approx(losses[1.0], rel=1e-3)


@pytest.mark.parametrize(
    ("step", "warmup_epochs", "expected"),
    [(0, 2, 0.0625), (3, 2, 0.25), (6, 2, 0.4375), (7, 2, 0.5), (40, 2, 0.5), (0, 0, 0.5), (5, 0, 0.5)],
)
def test_kl_warmup_schedule(step, warmup_epochs, expected):
    """4 steps per epoch, final weight 0.5: the weight after step s is 0.5 * (s + 1) / 8 in warm-up."""
    assert kl_weight_at(step, 4, warmup_epochs, 0.5) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------
# Laplace guide


def test_laplace_and_multivariate_reject_large_heads():
    head = BayesianLinearHead(3, 2)
    for kind in ("laplace", "multivariate"):
        with pytest.raises(ValueError, match=f"the {kind} guide would hold a 2001x2001 covariance"):
            make_guide(head.model, kind, num_params=MAX_MULTIVARIATE_PARAMS + 1)
        with pytest.raises(ValueError, match=f"the {kind} guide needs num_params"):
            make_guide(head.model, kind)


def test_laplace_posterior_is_exact_for_linear_gaussian_model():
    """The log joint of a Gaussian linear model is quadratic, so the Laplace posterior is exact.

    Posterior precision ``I / alpha**2 + Phi^T Phi / sigma**2`` with ``Phi = [x, 1]``.
    """
    torch.manual_seed(1)
    features = torch.randn(40, 2)
    targets = features @ torch.tensor([1.0, -0.5]) + 0.3
    head = BayesianLinearHead(2, 1, "normal", likelihood="gaussian", noise_scale=0.4, scale=2.0)
    design = torch.cat([features, torch.ones(40, 1)], 1).double()
    precision = torch.eye(3, dtype=torch.float64) / 4.0 + design.T @ design / 0.16
    covariance = torch.linalg.inv(precision)
    mean = covariance @ design.T @ targets.double() / 0.16

    guide = make_guide(head.model, "laplace", num_params=3)
    guide(features, targets)
    with torch.no_grad():
        guide.loc.copy_(mean.float())  # the MAP, in closed form
    posterior = laplace_posterior(guide, features, targets, 40)

    laplace_covariance = posterior.get_posterior().covariance_matrix.double()
    assert torch.allclose(posterior.loc.double(), mean, atol=1e-6)
    assert torch.allclose(laplace_covariance, covariance, rtol=1e-4, atol=1e-8)


def test_laplace_posterior_round_trips_through_state():
    head = BayesianLinearHead(3, 2, "normal")
    guide = make_guide(head.model, "laplace", num_params=8)
    guide(FEATURES, TARGETS)
    posterior = laplace_posterior(guide, FEATURES, TARGETS, 6)
    state = laplace_state(posterior)

    pyro.clear_param_store()
    restored = laplace_from_state(head.model, state, FEATURES[:2], TARGETS[:2])
    pyro.set_rng_seed(8)
    first = sample_posterior(head.model, posterior, 6, FEATURES[:1])
    pyro.set_rng_seed(8)
    second = sample_posterior(head.model, restored, 6, FEATURES[:1])

    assert list(pyro.get_param_store().keys()) == []  # buffers only: nothing to train
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert first["head.weight"].std(0).min() > 0  # a real posterior, not the MAP point
    with pytest.raises(ValueError, match=r"loc has shape \(8,\), but this model needs \(4,\)"):
        laplace_from_state(BayesianLinearHead(1, 2).model, state, FEATURES[:2, :1], TARGETS[:2])


def test_laplace_posterior_rejects_flat_hessian():
    """A laplace prior has no curvature, and the softmax shift direction leaves the Hessian singular."""
    head = BayesianLinearHead(3, 2, "laplace")
    guide = make_guide(head.model, "laplace", num_params=8)
    guide(FEATURES, TARGETS)
    with pytest.raises(ValueError, match="not positive definite"):
        laplace_posterior(guide, FEATURES, TARGETS, 6)
    with pytest.raises(ConfigError, match="--guide laplace cannot follow --prior laplace"):
        RunConfig(prior="laplace", guide="laplace").validate()


# ------------------------------------------------------------------------------------------
# The runner: schemes, Laplace, Python objects


def _tiny_config(tmp_path, **changes) -> RunConfig:
    options = {"dataset": "digits", "subset": 200, "epochs": 1, "widths": (4, 8), "convs_per_block": 1,
               "batch_size": 64, "num_samples": 5, "device": "cpu", "progress": False, "out": str(tmp_path / "run"),
               "scheme": "two-stage", "head_epochs": 3}
    options.update(changes)
    return RunConfig(**options)


def test_two_stage_trains_only_the_head(tmp_path):
    from pipelines.runner import make_loaders, train_models

    config = _tiny_config(tmp_path)
    data = load_dataset("digits", "unused", subset=200, seed=0)
    out = tmp_path / "run"
    out.mkdir()
    models = train_models(config, data, make_loaders(config, data, torch.device("cpu")), torch.device("cpu"), out)

    saved = torch.load(out / "deterministic.pt", weights_only=True)["model"]
    for name, value in models.deterministic.state_dict().items():
        assert torch.equal(value, saved[name]), f"deterministic {name} changed after its own training"
    for name, value in models.hybrid.backbone.state_dict().items():
        assert torch.equal(value, models.deterministic.backbone.state_dict()[name]), name
    assert not any(p.requires_grad for p in models.hybrid.backbone.parameters())
    assert not any(name.startswith("backbone.") for name in pyro.get_param_store().keys())
    assert len(models.results["bayesian"].losses) == config.head_epochs  # SVI epochs on cached features


@pytest.mark.parametrize("kind", [k for k in GUIDE_NAMES if k != "laplace"])
def test_guide_params_round_trip(kind):
    """Saved params loaded into a fresh guide give the same draws, for every guide class."""
    from pipelines.runner import guide_param_state, load_param_values

    head, guide = _head_and_guide("hierarchical", kind)
    elbo = make_elbo("trace", 1)
    optimizer = torch.optim.Adam(collect_svi_params(elbo, head.model, guide, FEATURES, TARGETS, NUM_DATA), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        elbo.differentiable_loss(head.model, guide, FEATURES, TARGETS, NUM_DATA).backward()
        optimizer.step()
    saved = guide_param_state()
    pyro.set_rng_seed(6)
    expected = sample_posterior(head.model, guide, 4, FEATURES[:1])

    pyro.clear_param_store()
    _, fresh = _head_and_guide("hierarchical", kind)
    load_param_values(saved, torch.device("cpu"))
    pyro.set_rng_seed(6)
    restored = sample_posterior(head.model, fresh, 4, FEATURES[:1])
    for name in expected:
        assert torch.equal(expected[name], restored[name]), name
    with pytest.raises(ValueError, match="contains param 'other.loc', which this model and guide do not create"):
        load_param_values({"other.loc": torch.zeros(2)}, torch.device("cpu"))


def test_laplace_run_round_trips(tmp_path):
    from pipelines.runner import evaluate, run

    report = run(_tiny_config(tmp_path, guide="laplace"))
    entry = report["models"]["bayesian"]
    assert entry["guide"] == "laplace"
    assert entry["guide_class"] == "AutoMultivariateNormal"
    state = torch.load(tmp_path / "run" / "bayesian.pt", weights_only=True)
    assert state["laplace"]["scale_tril"].shape == (90, 90)  # 8 features x 10 classes + 10 biases

    evaluated = evaluate(tmp_path / "run")
    for key in ("accuracy", "ece", "nll", "brier"):
        assert evaluated["recomputed"]["bayesian"][key] == pytest.approx(entry[key], abs=1e-9), key


def test_python_prior_and_guide_objects(tmp_path):
    from pipelines.runner import evaluate, run

    prior = StudentTPrior(df=4.0, scale=0.5)

    def lowrank(model):
        return AutoLowRankMultivariateNormal(model, rank=2, init_scale=0.05)

    report = run(_tiny_config(tmp_path), prior=prior, guide_factory=lowrank)
    entry = report["models"]["bayesian"]
    assert entry["prior"] == {"name": "student-t", "df": 4.0, "scale": 0.5}
    assert entry["guide_class"] == "AutoLowRankMultivariateNormal"
    assert entry["custom_prior"] and entry["custom_guide"]

    with pytest.raises(ConfigError, match="pass the same prior to evaluate"):
        evaluate(tmp_path / "run")
    evaluated = evaluate(tmp_path / "run", prior=StudentTPrior(df=4.0, scale=0.5), guide_factory=lowrank)
    assert evaluated["recomputed"]["bayesian"]["nll"] == pytest.approx(entry["nll"], abs=1e-9)


def test_guide_factory_by_name_and_prior_callable(tmp_path):
    from pipelines.runner import build_guide, build_hybrid

    config = _tiny_config(tmp_path)
    hybrid = build_hybrid(config, 1, 3, prior=lambda shape: dist.Normal(0.0, 0.2).expand(shape))
    features = hybrid.features(torch.randn(2, 1, 8, 8))
    guide = build_guide(config, hybrid, features, torch.tensor([0, 2]), guide_factory="multivariate")
    assert isinstance(guide, AutoMultivariateNormal)
    assert hybrid.head.prior.describe()["name"] == "callable"
    with pytest.raises(ConfigError, match="unknown guide 'full'"):
        build_guide(config, hybrid, features, torch.tensor([0, 2]), guide_factory="full")


def test_meanfield_elbo_autoguide_rejected(tmp_path):
    from pipelines.runner import build_guide, build_hybrid

    config = _tiny_config(tmp_path, prior="hierarchical", elbo="meanfield")
    hybrid = build_hybrid(config, 1, 3)
    features = hybrid.features(torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="use --elbo trace, or --guide meanfield"):
        build_guide(config, hybrid, features, torch.tensor([0, 2]))
    assert isinstance(build_guide(config, hybrid, features, torch.tensor([0, 2]), guide_factory="meanfield"),
                      MeanFieldGuide)


def test_feature_loader_svi_on_head_alone():
    """The notebook path: a head, a guide object and train_svi on cached features."""
    from pipelines.training import train_svi

    torch.manual_seed(0)
    features = torch.randn(64, 3)
    labels = (features[:, 0] > 0).long()
    head = BayesianLinearHead(3, 2, StudentTPrior(df=5.0))
    guide = AutoNormal(head.model, init_scale=0.05)
    guide(features[:2], labels[:2])
    loader = FeatureLoader(features, labels, 16, torch.Generator().manual_seed(0))
    result = train_svi(head.model, guide, loader, epochs=30, lr=0.05, progress=False)
    assert result.losses[-1] < result.losses[0]
    samples = sample_posterior(head.model, guide, 50, features[:1])
    accuracy = (head_logits(head.model, samples, features).softmax(-1).mean(0).argmax(-1) == labels).float().mean()
    assert accuracy > 0.9  # the first feature decides the label
