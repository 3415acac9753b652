"""Guides for the Bayesian head, chosen by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_median, init_to_value

from models.heads import data_plate

GUIDE_NAMES = ("normal", "diagonal", "lowrank", "multivariate", "laplace", "delta", "meanfield")

# A full covariance over P parameters stores P*(P+1)/2 numbers and costs O(P**3) per step,
# so beyond this many parameters the multivariate guide is rejected.
MAX_MULTIVARIATE_PARAMS = 2000


def _init_loc_fn(init_loc: dict[str, torch.Tensor] | None) -> Callable:
    if not init_loc:
        return init_to_median
    return init_to_value(values={k: torch.as_tensor(v) for k, v in init_loc.items()}, fallback=init_to_median)


def count_latent_params(model: Callable, *args, **kwargs) -> int:
    """Count the scalar latent values of ``model`` by tracing it once on ``args``."""
    import pyro.poutine as poutine

    trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(*args, **kwargs)
    return sum(
        site["value"].numel()
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"] and not site["infer"].get("_do_not_trace")
        and not site["name"] == "data"
    )


def make_guide(
    model: Callable,
    kind: str = "normal",
    *,
    init_scale: float = 0.01,
    init_loc: dict[str, torch.Tensor] | None = None,
    rank: int = 10,
    num_params: int | None = None,
):
    """Build a guide over the latent sites of ``model``.

    Parameters
    ----------
    model : callable
        A Pyro model with the signature ``model(inputs, targets=None, num_data=None)``, such as
        ``HybridClassifier.model`` or ``BayesianLinearHead.model``.
    kind : str
        ``normal`` (AutoNormal, mean-field Gaussian, the default), ``diagonal``
        (AutoDiagonalNormal), ``lowrank`` (AutoLowRankMultivariateNormal), ``multivariate``
        (AutoMultivariateNormal), ``laplace`` (AutoLaplaceApproximation), ``delta`` (AutoDelta,
        a MAP point estimate) or ``meanfield`` (the hand-written mean-field guide in
        :mod:`guides.meanfield`).
    init_scale : float
        Initial standard deviation of the Gaussian guides. Pyro's default of 0.1 is wide for a
        head with thousands of weights; 0.01 is near the posterior width of a head trained on
        tens of thousands of images, so early steps are less noisy.
    init_loc : dict or None
        Initial locations by site name, for example the weights of a trained deterministic
        head: ``{"head.weight": W, "head.bias": b}``. Missing sites start at the prior median.
    rank : int
        Rank of the covariance factor for ``lowrank``.
    num_params : int or None
        Number of latent scalars, used to reject ``multivariate`` on large heads. Required for
        ``multivariate``; :func:`count_latent_params` computes it.

    Raises
    ------
    ValueError
        For an unknown ``kind``, a non-positive ``init_scale`` or ``rank``, or ``multivariate``
        on more than ``MAX_MULTIVARIATE_PARAMS`` parameters.
    """
    if kind not in GUIDE_NAMES:
        raise ValueError(f"unknown guide {kind!r}; valid names: {', '.join(GUIDE_NAMES)}")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    init_loc_fn = _init_loc_fn(init_loc)
    common = {"init_loc_fn": init_loc_fn, "create_plates": data_plate}

    if kind == "normal":
        return autoguide.AutoNormal(model, init_scale=init_scale, **common)
    if kind == "diagonal":
        return autoguide.AutoDiagonalNormal(model, init_scale=init_scale, **common)
    if kind == "lowrank":
        if int(rank) < 1:
            raise ValueError(f"guide rank must be at least 1, got {rank}")
        return autoguide.AutoLowRankMultivariateNormal(model, rank=int(rank), init_scale=init_scale, **common)
    if kind == "multivariate":
        if num_params is None:
            raise ValueError("the multivariate guide needs num_params (see count_latent_params)")
        if num_params > MAX_MULTIVARIATE_PARAMS:
            raise ValueError(
                f"the multivariate guide would hold a {num_params}x{num_params} covariance, above the "
                f"limit of {MAX_MULTIVARIATE_PARAMS} parameters (memory grows with the square and each "
                "step with the cube); use --guide lowrank with --guide-rank R for correlations, or "
                "--guide normal"
            )
        return autoguide.AutoMultivariateNormal(model, init_scale=init_scale, **common)
    if kind == "laplace":
        return autoguide.AutoLaplaceApproximation(model, **common)
    if kind == "delta":
        return autoguide.AutoDelta(model, **common)

    from guides.meanfield import MeanFieldGuide

    return MeanFieldGuide(model, init_scale=init_scale, init_loc=init_loc)
