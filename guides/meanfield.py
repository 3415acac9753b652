"""A mean-field Gaussian guide written by hand with Pyro primitives.

This is the worked example behind ``AutoNormal``: for every latent site of the model it keeps
a location and a positive scale of the same shape as the site, and samples the site from
``Normal(loc, scale)`` in the site's unconstrained space. Sites with a constrained support
(the positive scale of the hierarchical prior) are sampled in unconstrained space and mapped
through ``biject_to(support)``, with the log-determinant of that map added by
``TransformedDistribution``, exactly as ``AutoNormal`` does.

Parameter names follow ``AutoNormal``'s convention (``AutoNormal.locs.<site>`` and
``AutoNormal.scales.<site>``) under the prefix ``MeanFieldGuide``, so a reader can compare the
two param stores side by side.
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


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class MeanFieldGuide(nn.Module):
    """Mean-field Gaussian guide over the latent sites of ``model``.

    Parameters
    ----------
    model : callable
        A Pyro model with the signature ``model(inputs, targets=None, num_data=None)``.
    init_scale : float
        Initial standard deviation of every site.
    init_loc : dict or None
        Initial unconstrained locations by site name; missing sites start at 0 in
        unconstrained space (the prior median of the zero-centred priors).
    """

    prefix = "MeanFieldGuide"

    def __init__(self, model: Callable, init_scale: float = 0.01, init_loc: dict | None = None):
        super().__init__()
        self.model = model
        self.init_scale = float(init_scale)
        self.init_loc = dict(init_loc or {})
        self.sites: dict[str, dict] | None = None

    def _setup(self, *args, **kwargs) -> None:
        # One run of the model finds the latent sites, their shapes and supports.
        hidden = poutine.block(self.model, hide_types=["param"])
        trace = poutine.trace(hidden).get_trace(*args, **kwargs)
        self.sites = {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site["infer"].get("is_auxiliary"):
                continue
            if name == "data" or site["infer"].get("_do_not_trace"):
                continue
            self.sites[name] = {
                "shape": site["value"].shape,
                "support": site["fn"].support,
                "event_dim": site["fn"].event_dim,
                "device": site["value"].device,
            }

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        if self.sites is None:
            self._setup(*args, **kwargs)
        values = {}
        # Entering the plate draws its subsample site, which the model then replays.
        with data_plate(*args, **kwargs):
            pass
        for name, info in self.sites.items():
            loc, scale = self._params(name, info)
            base = dist.Normal(loc, scale).to_event(len(info["shape"]))
            if _is_real(info["support"]):
                values[name] = pyro.sample(name, base)
            else:
                transform = biject_to(info["support"])
                values[name] = pyro.sample(name, dist.TransformedDistribution(base, transform))
        return values

    def _params(self, name: str, info: dict):
        shape, device = info["shape"], info["device"]
        start = self.init_loc.get(name)
        if start is None:
            start = torch.zeros(shape, device=device)
        loc = pyro.param(f"{self.prefix}.locs.{name}", lambda: torch.as_tensor(start, device=device).clone())
        scale = pyro.param(
            f"{self.prefix}.scales.{name}",
            lambda: torch.full(shape, self.init_scale, device=device),
            constraint=constraints.softplus_positive,
        )
        return loc, scale
