"""The Bayesian linear head, written as a Pyro model over features."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from models.priors import Prior, make_prior

LIKELIHOODS = ("categorical", "gaussian")


def data_plate(inputs: torch.Tensor, targets=None, num_data: int | None = None) -> pyro.plate:
    """Return the plate over data points that the model and its guide share.

    ``num_data`` is the size of the whole training set and ``len(inputs)`` the minibatch, so
    the likelihood inside the plate is scaled by ``num_data / len(inputs)`` while sample sites
    outside it (the head's weights, hence the KL term) count once per step. Guides are built
    with this function as their ``create_plates`` so both sides use the same subsample size,
    including a smaller last batch.
    """
    batch_size = inputs.shape[0]
    size = batch_size if num_data is None else int(num_data)
    if size < batch_size:
        raise ValueError(f"num_data ({size}) is smaller than the batch ({batch_size})")
    return pyro.plate("data", size=size, subsample_size=batch_size, dim=-1)


def _flatten_sample_dims(value: torch.Tensor, event_dim: int) -> torch.Tensor:
    """Fold all leading sample dimensions of a site value into one.

    Vectorised particles and ``Predictive(parallel=True)`` prepend a sample plate, and Pyro
    gives the site value either ``(S, 1, *event)`` or ``(S, *event)`` depending on the path.
    The head only needs ``(S, *event)``, or ``event`` alone when there is no sample plate.
    """
    if value.dim() == event_dim:
        return value
    return value.reshape((-1,) + tuple(value.shape[-event_dim:]))


class BayesianLinearHead(nn.Module):
    """A linear layer with a prior on its weights and bias, and a likelihood on its outputs.

    Parameters
    ----------
    in_features, out_features : int
        Feature dimension and number of classes (or regression outputs).
    prior : str, Prior or callable
        Passed to :func:`models.priors.make_prior`. The default is ``Normal(0, 1)``.
    likelihood : {"categorical", "gaussian"}
        ``categorical`` puts ``Categorical(logits=...)`` on integer class targets.
        ``gaussian`` puts ``Normal(mean, noise_scale)`` on real targets of shape
        ``(batch, out_features)`` (or ``(batch,)`` when ``out_features == 1``).
    noise_scale : float or None
        For ``gaussian``: a fixed noise scale, or ``None`` to learn it as a point estimate
        (the param ``{name}.noise_scale``).
    name : str
        Prefix of the sample sites: ``{name}.weight`` and ``{name}.bias``.

    Sites
    -----
    ``{name}.weight`` ``(out_features, in_features)``, ``{name}.bias`` ``(out_features,)``,
    the deterministic site ``logits`` (or ``mean``) ``(batch, out_features)`` and the
    observed site ``obs`` inside the plate ``data``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        prior: str | Prior = "normal",
        likelihood: str = "categorical",
        noise_scale: float | None = None,
        name: str = "head",
        **prior_params,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; valid values: {', '.join(LIKELIHOODS)}")
        if noise_scale is not None and not float(noise_scale) > 0:
            raise ValueError(f"noise_scale must be positive or None, got {noise_scale}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.prior = make_prior(prior, **prior_params)
        self.likelihood = likelihood
        self.name = name
        self.fixed_noise_scale = None if noise_scale is None else float(noise_scale)
        self.register_buffer("_device_anchor", torch.zeros(()))

    def linear(self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Apply sampled weights: ``(B, in)`` features give ``(B, out)`` or ``(S, B, out)``."""
        weight = _flatten_sample_dims(weight, 2)
        bias = _flatten_sample_dims(bias, 1)
        outputs = torch.einsum("...oi,bi->...bo", weight, features)
        return outputs + bias.unsqueeze(-2)

    def model(self, features: torch.Tensor, targets=None, num_data: int | None = None):
        """The Pyro model: prior on the head, then the likelihood of ``targets``.

        Parameters
        ----------
        features : Tensor of shape ``(batch, in_features)``
        targets : Tensor of shape ``(batch,)`` or None
            Observed class indices (or real values for ``gaussian``); ``None`` samples them.
        num_data : int or None
            Size of the full training set, for minibatch scaling of the likelihood.
        """
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"expected features of shape (batch, {self.in_features}), got {tuple(features.shape)}"
            )
        weight, bias = self.prior.sample(self.name, self.out_features, self.in_features)
        outputs = self.linear(features, weight, bias)

        with data_plate(features, targets, num_data):
            if self.likelihood == "categorical":
                pyro.deterministic("logits", outputs, event_dim=1)
                return pyro.sample("obs", dist.Categorical(logits=outputs), obs=targets)
            return self._gaussian_likelihood(outputs, targets)

    def _gaussian_likelihood(self, mean: torch.Tensor, targets):
        if self.fixed_noise_scale is None:
            noise_scale = pyro.param(
                f"{self.name}.noise_scale",
                lambda: torch.ones((), device=mean.device),
                constraint=dist.constraints.positive,
            )
        else:
            noise_scale = torch.tensor(self.fixed_noise_scale, device=mean.device)
        pyro.deterministic("mean", mean, event_dim=1)
        if targets is not None and targets.dim() == 1:
            targets = targets.unsqueeze(-1)
        obs = pyro.sample("obs", dist.Normal(mean, noise_scale).to_event(1), obs=targets)
        return obs

    def describe(self) -> dict:
        """Return the head's configuration as plain values, for reports."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "likelihood": self.likelihood,
            "noise_scale": self.fixed_noise_scale,
            "prior": self.prior.describe(),
        }
