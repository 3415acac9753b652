"""Backbone, priors, Bayesian head and hybrid model."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.infer.autoguide.initialization import init_to_value

from guides import make_guide
from models import BayesianLinearHead, CNNBackbone, HybridClassifier, freeze, make_prior
from pipelines.training import train_hybrid


@pytest.mark.parametrize(
    ("channels", "side", "widths"),
    [(3, 32, (8, 16, 32)), (1, 64, (4, 8)), (1, 8, (4, 8, 16))],
)
def test_backbone_output_shape(channels, side, widths):
    backbone = CNNBackbone(channels, widths, convs_per_block=1)
    features = backbone(torch.randn(5, channels, side, side))
    assert features.shape == (5, widths[-1])
    assert backbone.out_features == widths[-1]


def test_backbone_rejects_wrong_channels():
    backbone = CNNBackbone(3, (4,))
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, H, W\)"):
        backbone(torch.randn(2, 1, 8, 8))


def test_head_sites_and_shapes():
    head = BayesianLinearHead(4, 3)
    trace = pyro.poutine.trace(head.model).get_trace(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    assert trace.nodes["head.weight"]["value"].shape == (3, 4)
    assert trace.nodes["head.bias"]["value"].shape == (3,)
    assert trace.nodes["logits"]["value"].shape == (6, 3)
    assert trace.nodes["obs"]["is_observed"]
    assert [f.name for f in trace.nodes["obs"]["cond_indep_stack"]] == ["data"]


def test_elbo_likelihood_scaled_by_num_data_over_batch():
    """One ELBO value on a tiny model, checked by hand.

    With a point-mass guide (AutoDelta) at fixed weights W, b, the guide's log density is 0,
    so the loss is -[log p(W) + log p(b) + (N / B) * sum_i log softmax(x_i W^T + b)[y_i]].
    """
    torch.manual_seed(0)
    head = BayesianLinearHead(2, 3, scale=0.5)
    weight = torch.tensor([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]])
    bias = torch.tensor([0.05, -0.1, 0.0])
    guide = AutoDelta(head.model, init_loc_fn=init_to_value(values={"head.weight": weight, "head.bias": bias}))
    features = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, -1.0], [2.0, 1.0]])
    targets = torch.tensor([0, 2, 1, 1])
    num_data = 100

    loss = Trace_ELBO().loss(head.model, guide, features, targets, num_data)

    prior = dist.Normal(0.0, 0.5)
    log_prior = prior.log_prob(weight).sum() + prior.log_prob(bias).sum()
    log_lik = torch.log_softmax(features @ weight.T + bias, -1)[torch.arange(4), targets].sum()
    expected = -(log_prior + (num_data / 4) * log_lik)
    assert loss == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["normal", "laplace", "student-t", "scale-mixture", "hierarchical"])
def test_prior_by_name_builds_sites(name):
    head = BayesianLinearHead(3, 2, name)
    trace = pyro.poutine.trace(head.model).get_trace(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert trace.nodes["head.weight"]["value"].shape == (2, 3)
    if name == "hierarchical":
        assert trace.nodes["head.scale"]["value"].shape == (2,)
        assert (trace.nodes["head.scale"]["value"] > 0).all()


def test_prior_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="valid names: normal, laplace, student-t, scale-mixture, hierarchical"):
        make_prior("cauchy")


def test_prior_rejects_foreign_parameter():
    with pytest.raises(ValueError, match="does not take df"):
        make_prior("normal", df=3.0)


def test_prior_parameters_are_buffers():
    prior = make_prior("scale-mixture", pi=0.3)
    assert {name for name, _ in prior.named_buffers()} == {"pi", "sigma1", "sigma2"}
    assert list(prior.parameters()) == []


def test_frozen_backbone_unchanged_by_svi(tmp_path):
    from pipelines.data import BatchIterator, ImageSet

    backbone = freeze(CNNBackbone(1, (4, 8), convs_per_block=1))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    hybrid = HybridClassifier(backbone, BayesianLinearHead(8, 3))
    images = ImageSet(torch.randint(0, 255, (24, 1, 8, 8), dtype=torch.uint8), torch.arange(24) % 3)
    loader = BatchIterator(images, 8, [0.5], [0.25], shuffle=True)
    guide = make_guide(hybrid.head.model)
    x, y = next(iter(loader))
    guide(hybrid.features(x), y)

    train_hybrid(hybrid, guide, loader, epochs=3, lr=0.05, weight_decay=0.1, progress=False)

    for name, value in backbone.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not any(name.startswith("backbone.") for name in pyro.get_param_store().keys())
    # The head did train: its guide moved away from the initial locations (zeros).
    assert pyro.get_param_store()["AutoNormal.locs.head.weight"].abs().max() > 0


def test_trainable_backbone_is_registered_and_trained():
    from pipelines.data import BatchIterator, ImageSet

    backbone = CNNBackbone(1, (4,), convs_per_block=1)
    kernel_before = backbone.blocks[0].weight.detach().clone()
    hybrid = HybridClassifier(backbone, BayesianLinearHead(4, 2))
    images = ImageSet(torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 2)
    loader = BatchIterator(images, 8, [0.5], [0.25])
    guide = make_guide(hybrid.head.model)
    x, y = next(iter(loader))
    guide(hybrid.features(x), y)
    train_hybrid(hybrid, guide, loader, epochs=2, lr=0.05, weight_decay=0.0, progress=False)

    store = pyro.get_param_store()
    assert store["backbone.blocks.0.weight"] is backbone.blocks[0].weight
    assert not torch.equal(backbone.blocks[0].weight, kernel_before)


def test_hybrid_rejects_mismatched_head():
    with pytest.raises(ValueError, match="head expects 5 features but the backbone gives 4"):
        HybridClassifier(CNNBackbone(1, (4,)), BayesianLinearHead(5, 2))


def test_prior_follows_module_device():
    head = BayesianLinearHead(3, 2, "laplace", scale=2.0).to(torch.float64)
    assert head.prior.scale.dtype == torch.float64
    assert math.isclose(float(head.prior.scale), 2.0)


def test_sgd_backbone_adam_guide_step():
    """One step of a run too short for the schedule: Nesterov SGD moves a kernel by
    (lr / 25) * 1.9 * grad, Adam moves a guide location by guide_lr * sign(grad). The guide's
    scale is tiny, so the gradient of the sampled ELBO is the same at every draw."""
    from pipelines.data import BatchIterator, ImageSet

    backbone = CNNBackbone(1, (4,), convs_per_block=1)
    hybrid = HybridClassifier(backbone, BayesianLinearHead(4, 2))
    images = ImageSet(torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 2)
    loader = BatchIterator(images, 16, [0.5], [0.25])
    guide = make_guide(hybrid.head.model, init_scale=1e-7, init_loc={"head.weight": torch.full((2, 4), 0.3)})
    x, y = next(iter(loader))
    guide(hybrid.features(x), y)
    kernel = backbone.blocks[0].weight
    loc = pyro.get_param_store()["AutoNormal.locs.head.weight"]
    kernel_before, loc_before = kernel.detach().clone(), loc.detach().clone()
    loss = Trace_ELBO().differentiable_loss(hybrid.model, guide, x, y, 16) / 16
    kernel_grad, loc_grad = torch.autograd.grad(loss, [kernel, loc])

    train_hybrid(hybrid, guide, loader, epochs=1, lr=0.5, weight_decay=0.0, optimizer="sgd", guide_lr=0.01,
                 progress=False)

    torch.testing.assert_close(kernel.detach() - kernel_before, -0.5 / 25 * 1.9 * kernel_grad, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(loc.detach() - loc_before, -0.01 * torch.sign(loc_grad), rtol=1e-3, atol=1e-6)


def test_recompute_batchnorm_replaces_history():
    from pipelines.training import recompute_batchnorm_statistics

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    model[1].running_mean.fill_(50.0)  # a stale history the pass must not average into
    model.eval()
    inputs = torch.randn(40, 3) * torch.tensor([1.0, 2.0, 3.0]) + 5.0
    batches = [(inputs[i : i + 10], None) for i in range(0, 40, 10)]

    assert recompute_batchnorm_statistics(model, batches) == 1

    with torch.no_grad():
        hidden = model[0](inputs)
    expected_var = torch.stack([hidden[i : i + 10].var(0, unbiased=True) for i in range(0, 40, 10)]).mean(0)
    torch.testing.assert_close(model[1].running_mean, hidden.mean(0))
    torch.testing.assert_close(model[1].running_var, expected_var)
    assert model[1].momentum == 0.1  # settings restored
    assert not model.training
    assert recompute_batchnorm_statistics(torch.nn.Linear(2, 2), batches) == 0
