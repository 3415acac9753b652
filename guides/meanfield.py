"""A mean-field Gaussian guide written by hand with Pyro primitives.

This is the worked example behind ``AutoNormal``. The variational family is

.. math::

    q(z) = \\prod_{\\text{sites } s} \\prod_i \\mathcal{N}(u_{s,i};\\ \\mu_{s,i}, \\sigma_{s,i}^2),
    \\qquad z_s = T_s(u_s),

where ``u_s`` is site ``s`` in unconstrained space and ``T_s = biject_to(support_s)`` maps it
onto the site's support (the identity for real sites such as the head's weights, ``exp`` for
the positive scales of the hierarchical prior). Every site gets one location ``mu`` and one
positive scale ``sigma`` per entry, both of the site's shape; nothing couples two entries.

How it reads, step by step:

1. ``_setup`` runs the model once and records each latent site's shape and support.
2. ``forward`` creates the data plate (drawing the same subsample as the model would) and,
   for each site, samples ``Normal(loc, scale)`` directly for real sites, or the
   ``TransformedDistribution`` of that Normal through ``T_s`` for constrained sites. The
   transformed distribution adds ``log |det dT^-1/dz|`` to the log density, so ``log q`` is
   the density of ``z`` itself.
3. ``_params`` declares the locations and scales with ``pyro.param``; the scales carry the
   ``softplus_positive`` constraint that ``AutoNormal`` uses too.

Relation to ``AutoNormal`` (Pyro 1.9): ``AutoNormal`` draws the same ``u = loc + scale * eps``
at an auxiliary site ``{name}_unconstrained`` and then puts a ``Delta`` at ``T(u)`` carrying
the same log-determinant. The two guides therefore draw the same values from the same random
numbers and give the same ``Trace_ELBO``. They differ under ``TraceMeanField_ELBO``: this
guide's sites are ``Normal`` distributions, so the KL term is computed in closed form wherever
PyTorch registers ``kl_divergence(Normal, prior)`` (a Normal prior), while ``AutoNormal``'s
``Delta`` sites make Pyro fall back to the Monte-Carlo estimate ``log q(u) - log p(z)``.

Parameter names mirror ``AutoNormal``'s (``AutoNormal.locs.<site>``,
``AutoNormal.scales.<site>``) under the prefix ``MeanFieldGuide``, so the two param stores
can be compared side by side.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn
from torch.distributions import biject_to, constraints

from models.heads import data_plate


class MeanFieldGuide(nn.Module):
    """Mean-field Gaussian guide over the latent sites of ``model``.

    Parameters
    ----------
    model : callable
        A Pyro model with the signature ``model(inputs, targets=None, num_data=None)``.
    init_scale : float
        Initial standard deviation of every entry, in unconstrained space.
    init_loc : dict or None
        Initial values by site name, in the site's own (constrained) space, as
        ``init_to_value`` takes them for the autoguides. Sites left out start at 0 in
        unconstrained space: 0 for real sites, 1 for positive ones.

    Examples
    --------
    >>> import torch
    >>> from models import BayesianLinearHead
    >>> head = BayesianLinearHead(3, 2)
    >>> guide = MeanFieldGuide(head.model, init_scale=0.05)
    >>> draws = guide(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    >>> sorted(draws), tuple(draws["head.weight"].shape)
    (['head.bias', 'head.weight'], (2, 3))
    """

    prefix = "MeanFieldGuide"

    def __init__(self, model: Callable, init_scale: float = 0.01, init_loc: dict | None = None):
        super().__init__()
        if not float(init_scale) > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        self.model = model
        self.init_scale = float(init_scale)
        self.init_loc = dict(init_loc or {})
        self.sites: dict[str, dict] | None = None

    def _setup(self, *args, **kwargs) -> None:
        """Run the model once to find its latent sites, their shapes and supports."""
        hidden = poutine.block(self.model, hide_types=["param"])
        trace = poutine.trace(hidden).get_trace(*args, **kwargs)
        self.sites = {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            if poutine.util.site_is_subsample(site):  # the plate's subsample indices
                continue
            self.sites[name] = {
                "shape": site["value"].shape,
                "support": site["fn"].support,
                "device": site["value"].device,
            }
        unknown = sorted(set(self.init_loc) - set(self.sites))
        if unknown:
            raise ValueError(
                f"init_loc names {', '.join(unknown)}, which are not latent sites of the model; "
                f"its latent sites are {', '.join(self.sites)}"
            )

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Sample every latent site; returns the values by site name."""
        if self.sites is None:
            self._setup(*args, **kwargs)

        # Creating the plate draws its subsample indices (as AutoNormal does), and the model
        # replays them. No guide site lies inside the plate, so it is never entered.
        data_plate(*args, **kwargs)

        values = {}
        for name, info in self.sites.items():
            loc, scale = self._params(name, info)
            unconstrained = dist.Normal(loc, scale).to_event(len(info["shape"]))
            if _is_real(info["support"]):
                values[name] = pyro.sample(name, unconstrained)
            else:
                transform = biject_to(info["support"])
                values[name] = pyro.sample(name, dist.TransformedDistribution(unconstrained, transform))
        return values

    def _params(self, name: str, info: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Declare (or fetch) the location and scale of one site, both of the site's shape."""
        shape, device = info["shape"], info["device"]

        def initial_loc():
            if name not in self.init_loc:
                return torch.zeros(shape, device=device)
            value = torch.as_tensor(self.init_loc[name], device=device, dtype=torch.get_default_dtype())
            if value.shape != shape:
                raise ValueError(f"init_loc[{name!r}] has shape {tuple(value.shape)}, expected {tuple(shape)}")
            return biject_to(info["support"]).inv(value).detach().clone()

        loc = pyro.param(f"{self.prefix}.locs.{name}", initial_loc)
        scale = pyro.param(
            f"{self.prefix}.scales.{name}",
            lambda: torch.full(shape, self.init_scale, device=device),
            constraint=dist.constraints.softplus_positive,
        )
        return loc, scale


def _is_real(support) -> bool:
    """True when ``support`` is the real line, possibly wrapped in ``independent``."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real
