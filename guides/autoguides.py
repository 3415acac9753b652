"""Guides for the Bayesian head, chosen by name."""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_median, init_to_value

from models.heads import data_plate

GUIDE_NAMES = ("normal", "diagonal", "lowrank", "multivariate", "laplace", "delta", "meanfield")

# A full covariance over P parameters stores P*(P+1)/2 numbers and costs O(P**3) per step;
# the Laplace guide's Hessian needs P backward passes over the training set. Beyond this many
# parameters both guides are rejected. A CIFAR-10 head (128 features, 10 classes) has 1,290.
MAX_MULTIVARIATE_PARAMS = 2000


def _init_loc_fn(init_loc: dict[str, torch.Tensor] | None) -> Callable:
    if not init_loc:
        return init_to_median
    # Copies, because an autoguide wraps the initial value of a real site into its parameter
    # without copying it, and SVI would then overwrite the caller's tensor (for example the
    # weights of the trained deterministic head) in place.
    values = {name: torch.as_tensor(value).detach().clone() for name, value in init_loc.items()}
    return init_to_value(values=values, fallback=init_to_median)


def count_latent_params(model: Callable, *args, **kwargs) -> int:
    """Count the scalar latent values of ``model`` by tracing it once on ``args``."""
    trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(*args, **kwargs)
    return sum(
        site["value"].numel()
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"] and not poutine.util.site_is_subsample(site)
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
        ``multivariate`` and ``laplace``; :func:`count_latent_params` computes it.

    Returns
    -------
    guide : callable
        The guide, without parameters yet: call it once on example inputs to create them.
        The ``laplace`` guide is a MAP fit in unconstrained space; after training, turn it
        into its Laplace posterior with :func:`laplace_posterior` before predicting.

    Raises
    ------
    ValueError
        For an unknown ``kind``, a non-positive ``init_scale`` or ``rank``, or ``multivariate``
        or ``laplace`` without ``num_params`` or on more than ``MAX_MULTIVARIATE_PARAMS``
        parameters.
    """
    if kind not in GUIDE_NAMES:
        raise ValueError(f"unknown guide {kind!r}; valid names: {', '.join(GUIDE_NAMES)}")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    init_loc_fn = _init_loc_fn(init_loc)
    # AutoNormal and AutoDelta take the data plate, so their subsample draw matches the model's.
    # The AutoContinuous guides (diagonal, lowrank, multivariate, laplace) accept no
    # create_plates. They need none, because every latent site of the head is global, and the
    # model then draws the plate's subsample itself.
    common = {"init_loc_fn": init_loc_fn}
    plated = {**common, "create_plates": data_plate}

    if kind == "normal":
        return autoguide.AutoNormal(model, init_scale=init_scale, **plated)
    if kind == "diagonal":
        return autoguide.AutoDiagonalNormal(model, init_scale=init_scale, **common)
    if kind == "lowrank":
        if int(rank) < 1:
            raise ValueError(f"guide rank must be at least 1, got {rank}")
        return autoguide.AutoLowRankMultivariateNormal(model, rank=int(rank), init_scale=init_scale, **common)
    if kind in ("multivariate", "laplace"):
        _check_full_covariance_size(kind, num_params)
    if kind == "multivariate":
        return autoguide.AutoMultivariateNormal(model, init_scale=init_scale, **common)
    if kind == "laplace":
        return autoguide.AutoLaplaceApproximation(model, **common)
    if kind == "delta":
        return autoguide.AutoDelta(model, **plated)

    from guides.meanfield import MeanFieldGuide

    return MeanFieldGuide(model, init_scale=init_scale, init_loc=init_loc)


def _check_full_covariance_size(kind: str, num_params: int | None) -> None:
    if num_params is None:
        raise ValueError(f"the {kind} guide needs num_params (see count_latent_params)")
    if num_params > MAX_MULTIVARIATE_PARAMS:
        raise ValueError(
            f"the {kind} guide would hold a {num_params}x{num_params} covariance, above the "
            f"limit of {MAX_MULTIVARIATE_PARAMS} parameters (memory grows with the square, each "
            "step or Hessian with the cube); use --guide lowrank with --guide-rank R for "
            "correlations, or --guide normal"
        )


def laplace_posterior(guide: autoguide.AutoLaplaceApproximation, *args, **kwargs):
    """Turn a fitted Laplace guide (a MAP point) into its Gaussian Laplace posterior.

    The posterior is ``N(z_MAP, H^-1)`` in unconstrained space, with ``H`` the Hessian of
    ``-log p(z, y)`` at the MAP. Pass the whole training set as ``args``, for the head
    ``(features, targets, num_data)`` with ``num_data == len(features)``, so the likelihood
    enters with weight 1 per data point (a minibatch would rescale it by ``N / B``).

    Parameters
    ----------
    guide : AutoLaplaceApproximation
        The trained guide.
    *args, **kwargs
        Model arguments covering the training set.

    Returns
    -------
    AutoMultivariateNormal
        A guide whose ``loc``, ``scale`` and ``scale_tril`` buffers hold the posterior; it
        has no trainable parameters.

    Raises
    ------
    ValueError
        When the Hessian is not positive definite, so the Laplace covariance does not exist.

    Notes
    -----
    The Hessian takes one backward pass per latent scalar over ``args``: 1,290 passes for a
    CIFAR-10 head (128 features, 10 classes).
    """
    if not isinstance(guide, autoguide.AutoLaplaceApproximation):
        raise TypeError(f"laplace_posterior expects an AutoLaplaceApproximation, got {type(guide).__name__}")
    try:
        posterior = guide.laplace_approximation(*args, **kwargs)
    except torch.linalg.LinAlgError as error:
        raise ValueError(_NOT_POSITIVE_DEFINITE) from error
    if not (torch.isfinite(posterior.scale).all() and torch.isfinite(posterior.scale_tril).all()):
        raise ValueError(_NOT_POSITIVE_DEFINITE)
    return posterior


_NOT_POSITIVE_DEFINITE = (
    "the Hessian of the negative log joint at the MAP is not positive definite, so the Laplace "
    "posterior does not exist (a prior with no curvature, such as laplace, leaves the softmax's "
    "shift direction flat); train longer, or choose a normal or student-t prior, or another guide"
)


def laplace_state(posterior: autoguide.AutoMultivariateNormal) -> dict[str, torch.Tensor]:
    """Copy the buffers of a Laplace posterior (``loc``, ``scale``, ``scale_tril``) for a checkpoint."""
    return {name: getattr(posterior, name).detach().cpu().clone() for name in ("loc", "scale", "scale_tril")}


def laplace_from_state(model: Callable, state: dict[str, torch.Tensor], *args, **kwargs):
    """Rebuild the posterior that :func:`laplace_posterior` returned, from :func:`laplace_state`.

    ``args`` are any model arguments (a batch of two is enough); they only reveal the sites.
    """
    posterior = autoguide.AutoMultivariateNormal(model)
    # NOTE: _setup_prototype is private Pyro API; laplace_approximation itself calls it to
    # size a guide without creating its parameters (Pyro 1.9).
    posterior._setup_prototype(*args, **kwargs)
    tensors = [arg for arg in args if torch.is_tensor(arg)]
    device = tensors[0].device if tensors else torch.device("cpu")
    size = posterior.latent_dim
    expected = {"loc": (size,), "scale": (size,), "scale_tril": (size, size)}
    for name, shape in expected.items():
        value = state[name].to(device)
        if tuple(value.shape) != shape:
            raise ValueError(
                f"the saved Laplace posterior's {name} has shape {tuple(value.shape)}, but this model "
                f"needs {shape}; the checkpoint belongs to another model"
            )
        # Reading the attribute would put the unused PyroParam into the param store.
        delattr(posterior, name)
        posterior.register_buffer(name, value)
    return posterior


def check_meanfield_elbo(guide: Callable, *args, **kwargs) -> None:
    """Reject a guide whose ``TraceMeanField_ELBO`` would drop a log-Jacobian term.

    The autoguides (AutoNormal, AutoDiagonalNormal, AutoLowRankMultivariateNormal,
    AutoMultivariateNormal, AutoLaplaceApproximation) put a ``Delta`` at each constrained
    site that carries ``log |det J|`` as its ``log_density``. Pyro 1.9's
    ``kl_divergence(Delta, p)`` returns ``-p.log_prob(value)`` and ignores that term, so
    ``TraceMeanField_ELBO`` optimises the wrong objective on any constrained latent site, such
    as the positive scales of the hierarchical prior. Real-valued sites are unaffected.

    Raises
    ------
    ValueError
        Naming the sites concerned and the alternatives.
    """
    trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(*args, **kwargs)
    affected = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not isinstance(site["fn"], dist.Delta):
            continue
        log_density = site["fn"].log_density
        if torch.is_tensor(log_density) and bool((log_density != 0).any()):
            affected.append(name)
    if affected:
        raise ValueError(
            f"--elbo meanfield with the {type(guide).__name__} guide would leave out the log-Jacobian "
            f"of the constrained site(s) {', '.join(affected)} (Pyro's KL of a Delta ignores it); "
            "use --elbo trace, or --guide meanfield, whose sites are Normal distributions"
        )
