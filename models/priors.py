"""Priors over the weights and biases of a Bayesian linear head.

Every prior is an ``nn.Module`` whose parameters are registered as buffers, so moving the
model with ``.to(device)`` moves the prior too and the sample sites are created on the
device of the features. A prior emits the head's sample sites itself: the plain priors emit
``{prefix}.weight`` of shape ``(out_features, in_features)`` and ``{prefix}.bias`` of shape
``(out_features,)``, and the hierarchical prior adds ``{prefix}.scale`` of shape
``(out_features,)`` before them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

PRIOR_NAMES = ("normal", "laplace", "student-t", "scale-mixture", "hierarchical")
HYPERPRIOR_NAMES = ("half-cauchy", "inverse-gamma")


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


class Prior(nn.Module):
    """Base class: a distribution over each entry of the weight matrix and the bias.

    Subclasses implement :meth:`distribution`, which returns a distribution with batch shape
    ``shape`` and empty event shape, built from buffers so it lives on the module's device.
    """

    name = "custom"

    def distribution(self, shape: torch.Size) -> dist.Distribution:
        raise NotImplementedError

    def sample(self, prefix: str, out_features: int, in_features: int):
        """Emit the weight and bias sample sites and return their values."""
        weight = pyro.sample(
            f"{prefix}.weight", self.distribution(torch.Size((out_features, in_features))).to_event(2)
        )
        bias = pyro.sample(f"{prefix}.bias", self.distribution(torch.Size((out_features,))).to_event(1))
        return weight, bias

    def describe(self) -> dict:
        """Return the prior's name and parameters as plain Python values, for reports."""
        params = {k: float(v) for k, v in self.named_buffers() if v.numel() == 1}
        return {"name": self.name, **params}


class NormalPrior(Prior):
    """Independent ``Normal(0, scale**2)`` on every weight and bias."""

    name = "normal"

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.register_buffer("scale", torch.tensor(_positive("prior scale", scale)))

    def distribution(self, shape):
        return dist.Normal(torch.zeros_like(self.scale), self.scale).expand(shape)


class LaplacePrior(Prior):
    """Independent ``Laplace(0, scale)``: heavier tails and a sparser mode than the Normal."""

    name = "laplace"

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.register_buffer("scale", torch.tensor(_positive("prior scale", scale)))

    def distribution(self, shape):
        return dist.Laplace(torch.zeros_like(self.scale), self.scale).expand(shape)


class StudentTPrior(Prior):
    """Independent Student-t with ``df`` degrees of freedom, location 0 and ``scale``."""

    name = "student-t"

    def __init__(self, df: float = 3.0, scale: float = 1.0):
        super().__init__()
        self.register_buffer("df", torch.tensor(_positive("prior df", df)))
        self.register_buffer("scale", torch.tensor(_positive("prior scale", scale)))

    def distribution(self, shape):
        return dist.StudentT(self.df, torch.zeros_like(self.scale), self.scale).expand(shape)


class _RealScaleMixture(dist.MixtureSameFamily):
    """A mixture of zero-mean Normals whose support is declared as the real line.

    ``MixtureSameFamily`` reports a ``MixtureSameFamilyConstraint`` support, which has no
    ``biject_to`` transform, so the autoguides could not place a guide on it. A mixture of
    Normals is supported on the whole real line, and saying so lets every guide work.
    """

    support = constraints.real


class ScaleMixturePrior(Prior):
    """Two-component Gaussian scale mixture of Blundell et al. (2015), "Weight Uncertainty in
    Neural Networks": ``pi * N(0, sigma1**2) + (1 - pi) * N(0, sigma2**2)``, with a wide
    component ``sigma1`` and a narrow one ``sigma2``.
    """

    name = "scale-mixture"

    def __init__(self, pi: float = 0.5, sigma1: float = 1.0, sigma2: float = 0.0025):
        super().__init__()
        if not 0.0 < float(pi) < 1.0:
            raise ValueError(f"prior pi must lie strictly between 0 and 1, got {pi}")
        self.register_buffer("pi", torch.tensor(float(pi)))
        self.register_buffer("sigma1", torch.tensor(_positive("prior sigma1", sigma1)))
        self.register_buffer("sigma2", torch.tensor(_positive("prior sigma2", sigma2)))

    def distribution(self, shape):
        mixing = dist.Categorical(probs=torch.stack([self.pi, 1.0 - self.pi]).expand(shape + (2,)))
        scales = torch.stack([self.sigma1, self.sigma2]).expand(shape + (2,))
        components = dist.Normal(torch.zeros_like(scales), scales)
        return _RealScaleMixture(mixing, components)


class HierarchicalPrior(Prior):
    """Normal weights whose scale is itself a sample site, one scale per class.

    ``tau_k ~ HalfCauchy(scale)`` (or ``tau_k**2 ~ InverseGamma(concentration, rate)``), then
    ``w_kj ~ Normal(0, tau_k**2)`` and ``b_k ~ Normal(0, tau_k**2)``. The model can thus learn
    how large each class's weights are. The scale site is ``{prefix}.scale``.
    """

    name = "hierarchical"

    def __init__(
        self,
        hyperprior: str = "half-cauchy",
        scale: float = 1.0,
        concentration: float = 2.0,
        rate: float = 1.0,
    ):
        super().__init__()
        if hyperprior not in HYPERPRIOR_NAMES:
            raise ValueError(
                f"unknown hyperprior {hyperprior!r}; valid values: {', '.join(HYPERPRIOR_NAMES)}"
            )
        self.hyperprior = hyperprior
        self.register_buffer("scale", torch.tensor(_positive("hyperprior scale", scale)))
        self.register_buffer("concentration", torch.tensor(_positive("concentration", concentration)))
        self.register_buffer("rate", torch.tensor(_positive("rate", rate)))

    def sample(self, prefix, out_features, in_features):
        shape = torch.Size((out_features,))
        if self.hyperprior == "half-cauchy":
            tau = pyro.sample(f"{prefix}.scale", dist.HalfCauchy(self.scale).expand(shape).to_event(1))
        else:
            variance = pyro.sample(
                f"{prefix}.scale",
                dist.InverseGamma(self.concentration, self.rate).expand(shape).to_event(1),
            )
            tau = variance.sqrt()
        # tau may carry sample dimensions in front, (..., out_features). The weights get the
        # same leading dimensions, so each draw of tau scales its own weight draw.
        weight_scale = tau.unsqueeze(-1).expand(tau.shape + (in_features,))
        weight = pyro.sample(
            f"{prefix}.weight", dist.Normal(torch.zeros_like(weight_scale), weight_scale).to_event(2)
        )
        bias = pyro.sample(f"{prefix}.bias", dist.Normal(torch.zeros_like(tau), tau).to_event(1))
        return weight, bias

    def describe(self):
        return {**super().describe(), "hyperprior": self.hyperprior}


class CallablePrior(Prior):
    """Wrap a user function ``shape -> distribution`` (batch shape ``shape``) as a prior."""

    name = "callable"

    def __init__(self, build: Callable[[torch.Size], dist.Distribution]):
        super().__init__()
        self.build = build
        self.register_buffer("_device_anchor", torch.zeros(()))

    def distribution(self, shape):
        built = self.build(shape)
        if not isinstance(built, torch.distributions.Distribution):
            raise TypeError(f"the prior callable must return a distribution, got {type(built).__name__}")
        if built.batch_shape != shape:
            built = built.expand(shape)
        return built

    def describe(self):
        return {"name": self.name, "callable": getattr(self.build, "__name__", repr(self.build))}


def make_prior(prior: str | Prior | Callable = "normal", **params) -> Prior:
    """Build a prior by name, or pass through a :class:`Prior`, or wrap a callable.

    Parameters
    ----------
    prior : str, Prior or callable
        One of ``normal``, ``laplace``, ``student-t``, ``scale-mixture``, ``hierarchical``;
        a :class:`Prior` instance; or a function ``shape -> distribution``.
    **params
        Keyword arguments of the named prior's class (``scale``, ``df``, ``pi``, ``sigma1``,
        ``sigma2``, ``hyperprior``, ``concentration``, ``rate``). Arguments the named prior
        does not take raise ``ValueError``.
    """
    if isinstance(prior, Prior):
        return prior
    if callable(prior) and not isinstance(prior, str):
        return CallablePrior(prior)
    classes = {
        "normal": NormalPrior,
        "laplace": LaplacePrior,
        "student-t": StudentTPrior,
        "scale-mixture": ScaleMixturePrior,
        "hierarchical": HierarchicalPrior,
    }
    if prior not in classes:
        raise ValueError(f"unknown prior {prior!r}; valid names: {', '.join(PRIOR_NAMES)}")
    cls = classes[prior]
    accepted = set(cls.__init__.__code__.co_varnames[1 : cls.__init__.__code__.co_argcount])
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"prior {prior!r} does not take {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}"
        )
    return cls(**params)
