"""Posterior predictive for the hybrid model and softmax prediction for the baseline.

The hybrid's backbone is deterministic, so it runs once per batch; the head's posterior
samples are drawn once for the whole dataset through ``pyro.infer.Predictive`` and applied to
each batch of features in one vectorised pass. Every input therefore sees the same S draws of
the head, whatever batch it falls in. Probabilities are averaged over samples, not logits, in
float64 log space: ``log p(y|x) = logsumexp_s log_softmax(logits_s) - log S``.

With ``local_reparameterization=True`` and a mean-field Gaussian guide, the logits are sampled
directly from their Gaussian marginal given each input's features instead of through sampled
weights (Kingma, Salimans and Welling 2015, "Variational Dropout and the Local
Reparameterization Trick"); the per-input predictive distribution is the same, and the draws
are independent across inputs.

Samples are applied to each batch in chunks of at most ``CHUNK_ELEMENTS`` logits (one sample
at a time when a batch alone has more), so memory grows with ``batch * chunk * num_classes``
and not with the number of samples S.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from operator import attrgetter

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Predictive, autoguide


@dataclass
class Predictions:
    """Predictive probabilities and per-input uncertainty for one dataset.

    Attributes
    ----------
    probs : ndarray of shape ``(N, num_classes)``, float64
        Posterior predictive (or softmax) probabilities.
    log_probs : ndarray of shape ``(N, num_classes)``, float64
        Their logarithms, computed stably (no underflow to ``-inf`` from averaging).
    labels : ndarray of shape ``(N,)``
        True labels.
    expected_entropy : ndarray of shape ``(N,)`` or None
        Mean over samples of the entropy of each sample's softmax (aleatoric part); for a
        deterministic model it equals the predictive entropy.
    seconds : float
        Wall time of the prediction.
    sample_probs : ndarray of shape ``(num_samples, N, num_classes)`` or None
        Per-sample probabilities, kept only when asked for.
    """

    probs: np.ndarray
    log_probs: np.ndarray
    labels: np.ndarray
    expected_entropy: np.ndarray
    seconds: float
    sample_probs: np.ndarray | None = None

    @property
    def predictive_entropy(self) -> np.ndarray:
        return -(self.probs * np.where(self.probs > 0, self.log_probs, 0.0)).sum(axis=1)

    @property
    def mutual_information(self) -> np.ndarray:
        # Predictive entropy minus expected entropy; float error can make it a hair below 0.
        return np.maximum(self.predictive_entropy - self.expected_entropy, 0.0)


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).nan_to_num(0.0).sum(-1)


def _collect(log_prob_batches, entropy_batches, label_batches, sample_batches, start) -> Predictions:
    log_probs = torch.cat(log_prob_batches).cpu().numpy()
    sample_probs = None
    if sample_batches:
        sample_probs = torch.cat(sample_batches, dim=1).cpu().numpy()
    return Predictions(
        probs=np.exp(log_probs),
        log_probs=log_probs,
        labels=torch.cat(label_batches).cpu().numpy(),
        expected_entropy=torch.cat(entropy_batches).cpu().numpy(),
        seconds=time.perf_counter() - start,
        sample_probs=sample_probs,
    )


@torch.no_grad()
def predict_deterministic(model: torch.nn.Module, loader) -> Predictions:
    """Softmax probabilities of a deterministic classifier, in eval mode."""
    start = time.perf_counter()
    model.eval()
    log_probs, entropies, labels = [], [], []
    for images, targets in loader:
        batch_log_probs = torch.log_softmax(model(images).double(), dim=-1)
        log_probs.append(batch_log_probs)
        entropies.append(_entropy(batch_log_probs))
        labels.append(targets)
    return _collect(log_probs, entropies, labels, [], start)


def latent_site_shapes(guide, *args) -> dict[str, torch.Size]:
    """Shapes of the latent sample sites that ``guide`` produces (subsample sites excluded)."""
    trace = poutine.trace(guide).get_trace(*args)
    return {
        name: site["value"].shape
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not poutine.util.site_is_subsample(site)
        and not site["infer"].get("is_auxiliary")
    }


@torch.no_grad()
def sample_posterior(head_model, guide, num_samples: int, example_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Draw ``num_samples`` joint samples of the head's latent sites from the guide.

    ``example_inputs`` is any batch the guide accepts (it only sizes the plate). Returns a
    dict of tensors whose first dimension is ``num_samples``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    shapes = latent_site_shapes(guide, example_inputs)
    predictive = Predictive(head_model, guide=guide, num_samples=num_samples, parallel=True,
                            return_sites=list(shapes))
    # The vectorised plate can leave a singleton dimension, (S, 1, *shape): fold it away.
    return {name: value.reshape((num_samples,) + shapes[name]) for name, value in predictive(example_inputs).items()}


def head_logits(head_model, samples: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Logits of shape ``(num_samples, batch, num_classes)`` for fixed posterior samples."""
    num_samples = next(iter(samples.values())).shape[0]
    predictive = Predictive(head_model, posterior_samples=samples, num_samples=num_samples,
                            parallel=True, return_sites=["logits"])
    return predictive(features)["logits"]


# Logits per chunk of samples: 2**22 float64 values are 32 MiB per tensor, and the averaging
# keeps a few such tensors alive at once.
CHUNK_ELEMENTS = 2**22

LOCAL_REPARAMETERIZATION_GUIDES = (
    "normal (AutoNormal)",
    "diagonal (AutoDiagonalNormal)",
    "meanfield (guides.meanfield.MeanFieldGuide)",
)


@dataclass(frozen=True)
class GaussianHeadPosterior:
    """A mean-field Gaussian posterior over the weight and bias of a linear head.

    Attributes
    ----------
    weight_loc, weight_scale : Tensor of shape ``(num_classes, in_features)``
    bias_loc, bias_scale : Tensor of shape ``(num_classes,)``
    """

    weight_loc: torch.Tensor
    weight_scale: torch.Tensor
    bias_loc: torch.Tensor
    bias_scale: torch.Tensor

    def logit_moments(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean and variance of the logits given ``features``, each ``(batch, num_classes)``, float64.

        .. math::

            \mathbb{E}[z_{nk}] = \sum_j \phi_{nj} \mu_{kj} + \mu_{b,k}, \qquad
            \operatorname{Var}[z_{nk}] = \sum_j \phi_{nj}^2 \sigma_{kj}^2 + \sigma_{b,k}^2

        Logits of different classes depend on different, independent rows of the weight, so
        given one input they are independent Gaussians.
        """
        features = features.double()
        mean = features @ self.weight_loc.double().T + self.bias_loc.double()
        variance = features.square() @ self.weight_scale.double().square().T + self.bias_scale.double().square()
        return mean, variance


def _is_real(support) -> bool:
    while isinstance(support, torch.distributions.constraints.independent):
        support = support.base_constraint
    return support is torch.distributions.constraints.real


def _site_loc_scale(guide, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Location and scale of one site under a mean-field Gaussian guide, without sampling."""
    from guides.meanfield import MeanFieldGuide

    if isinstance(guide, autoguide.AutoNormal):
        return attrgetter(name)(guide.locs), attrgetter(name)(guide.scales)
    if isinstance(guide, MeanFieldGuide):
        return guide._params(name, guide.sites[name])
    # AutoDiagonalNormal keeps one flat vector for all sites; its own unpacking splits it.
    locs = {site["name"]: value for site, value in guide._unpack_latent(guide.loc)}
    scales = {site["name"]: value for site, value in guide._unpack_latent(guide.scale)}
    return locs[name], scales[name]


@torch.no_grad()
def gaussian_head_posterior(head, guide, example_features: torch.Tensor) -> GaussianHeadPosterior:
    """Read the Gaussian posterior of a :class:`models.BayesianLinearHead` from its guide.

    Parameters
    ----------
    head : BayesianLinearHead
        A head with the ``categorical`` likelihood and a prior whose weight and bias sites are
        real-valued (every prior but ``hierarchical``, which adds a scale site).
    guide : AutoNormal, AutoDiagonalNormal or MeanFieldGuide
        A trained guide over ``head.model``.
    example_features : Tensor of shape ``(batch, in_features)``
        Any features the guide accepts; a guide that has never run creates its parameters here.

    Raises
    ------
    ValueError
        For another guide (lowrank, multivariate, laplace, delta or a custom one), another
        likelihood, or a model whose latent sites are not exactly a real-valued weight and bias.
    """
    from guides.meanfield import MeanFieldGuide

    supported = (autoguide.AutoNormal, autoguide.AutoDiagonalNormal, MeanFieldGuide)
    if not isinstance(guide, supported):
        raise ValueError(
            f"local reparameterization needs a mean-field Gaussian guide, got {type(guide).__name__}; "
            f"supported guides: {', '.join(LOCAL_REPARAMETERIZATION_GUIDES)}. "
            "Predict with local_reparameterization=False for this guide."
        )
    if head.likelihood != "categorical":
        raise ValueError(
            f"local reparameterization samples logits, so it needs the categorical likelihood; "
            f"this head has {head.likelihood!r}"
        )
    weight_name, bias_name = f"{head.name}.weight", f"{head.name}.bias"
    sites = latent_site_shapes(guide, example_features)
    if set(sites) != {weight_name, bias_name}:
        raise ValueError(
            f"local reparameterization needs a guide over exactly the sites {weight_name} and "
            f"{bias_name}, got {', '.join(sorted(sites))} (the hierarchical prior adds a scale site); "
            "use another prior or local_reparameterization=False"
        )
    model_trace = poutine.trace(poutine.block(head.model, hide_types=["param"])).get_trace(example_features)
    for name in (weight_name, bias_name):
        support = model_trace.nodes[name]["fn"].support
        if not _is_real(support):
            raise ValueError(
                f"local reparameterization needs real-valued weight and bias sites, but the prior of "
                f"{name} has support {support}; use local_reparameterization=False"
            )
    weight_loc, weight_scale = _site_loc_scale(guide, weight_name)
    bias_loc, bias_scale = _site_loc_scale(guide, bias_name)
    return GaussianHeadPosterior(weight_loc.detach(), weight_scale.detach(), bias_loc.detach(), bias_scale.detach())


def local_reparameterization_logits(posterior: GaussianHeadPosterior, features: torch.Tensor,
                                    num_samples: int) -> torch.Tensor:
    """Draw logits of shape ``(num_samples, batch, num_classes)``, float64, from their marginal.

    Each input gets its own independent draws, so two inputs never share a weight sample.
    The draws come from torch's global generator (on the device of ``features``), which
    :func:`pyro.set_rng_seed` seeds.
    """
    mean, variance = posterior.logit_moments(features)
    noise = torch.randn((num_samples,) + tuple(mean.shape), dtype=mean.dtype, device=mean.device)
    return mean + variance.sqrt() * noise


def _chunk_size(samples_per_chunk: int | None, batch: int, num_classes: int) -> int:
    if samples_per_chunk is not None:
        return int(samples_per_chunk)
    return max(1, CHUNK_ELEMENTS // max(1, batch * num_classes))


def _average_samples(draw_logits, num_samples: int, chunk: int, keep_samples: bool, temperature: float = 1.0):
    """Average softmax over ``num_samples`` logits drawn chunk by chunk by ``draw_logits(start, stop)``.

    Each draw's logits are divided by ``temperature`` before the softmax. Returns the log
    predictive ``(batch, num_classes)``, the expected entropy ``(batch,)`` and, when
    ``keep_samples``, the per-sample probabilities ``(num_samples, batch, num_classes)``.
    """
    log_total, entropy_total, probability_chunks = None, None, []
    for start in range(0, num_samples, chunk):
        logits = draw_logits(start, min(start + chunk, num_samples)).double()
        per_sample = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
        chunk_total = torch.logsumexp(per_sample, dim=0)
        chunk_entropy = _entropy(per_sample).sum(0)
        if log_total is None:
            log_total, entropy_total = chunk_total, chunk_entropy
        else:
            log_total = torch.logaddexp(log_total, chunk_total)
            entropy_total = entropy_total + chunk_entropy
        if keep_samples:
            probability_chunks.append(per_sample.exp())
        del per_sample
    sample_probs = torch.cat(probability_chunks) if keep_samples else None
    return log_total - math.log(num_samples), entropy_total / num_samples, sample_probs


def _applies_linear_directly(head) -> bool:
    """True when ``head.model`` is :class:`BayesianLinearHead`'s own, whose logits are ``head.linear``."""
    from models.heads import BayesianLinearHead

    return (
        isinstance(head, BayesianLinearHead)
        and head.likelihood == "categorical"
        and type(head).model is BayesianLinearHead.model
        and type(head).linear is BayesianLinearHead.linear
    )


def _weight_sample_chunk(head, samples: dict[str, torch.Tensor], features: torch.Tensor,
                         first: int, stop: int) -> torch.Tensor:
    # The head's model computes its logits as head.linear(features, weight, bias) whatever the
    # prior, so calling it directly gives the same numbers as Predictive without the work on the
    # observed site (normalising and sampling a Categorical of shape (S, batch, num_classes)).
    if _applies_linear_directly(head):
        weight = samples[f"{head.name}.weight"][first:stop]
        bias = samples[f"{head.name}.bias"][first:stop]
        return head.linear(features, weight, bias)
    chunk = {name: value[first:stop] for name, value in samples.items()}
    return head_logits(head.model, chunk, features)


def _local_chunk(posterior: GaussianHeadPosterior, features: torch.Tensor, first: int, stop: int) -> torch.Tensor:
    return local_reparameterization_logits(posterior, features, stop - first)


def _batch_draws(hybrid, guide, loader, num_samples: int, seed: int | None, local_reparameterization: bool):
    """Yield ``(draw_logits, batch_size, targets)`` per batch, with ``draw_logits(start, stop)``.

    Seeds Pyro, then draws the head's samples once, at the first batch, so every batch uses
    the same S draws of the weights (without local reparameterization). The hybrid is put in eval mode first.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    return _draw_batches(hybrid, guide, loader, num_samples, seed, local_reparameterization)


def _draw_batches(hybrid, guide, loader, num_samples, seed, local_reparameterization):
    if seed is not None:
        pyro.set_rng_seed(seed)
    hybrid.eval()
    samples, posterior = None, None
    for images, targets in loader:
        features = hybrid.features(images)
        if local_reparameterization:
            if posterior is None:
                posterior = gaussian_head_posterior(hybrid.head, guide, features[:1])
            yield partial(_local_chunk, posterior, features), len(features), targets
        else:
            if samples is None:
                samples = sample_posterior(hybrid.head.model, guide, num_samples, features[:1])
            yield partial(_weight_sample_chunk, hybrid.head, samples, features), len(features), targets


def _resolve_temperature(hybrid, temperature: float | None) -> float:
    value = float(getattr(hybrid, "temperature", 1.0) if temperature is None else temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a positive finite number, got {value}")
    return value


@torch.no_grad()
def sample_logits(hybrid, guide, loader, num_samples: int = 20, seed: int | None = 0,
                  local_reparameterization: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-sample logits ``(S, N, num_classes)`` (float32, on the CPU) and labels ``(N,)``.

    With the same ``seed`` and ``num_samples``, these are the draws that :func:`predict_bayesian`
    averages, before any temperature. Memory grows with ``S * N * num_classes``.
    """
    logits, labels = [], []
    for draw_logits, _, targets in _batch_draws(hybrid, guide, loader, num_samples, seed, local_reparameterization):
        logits.append(draw_logits(0, num_samples).float().cpu())
        labels.append(targets.cpu())
    return torch.cat(logits, dim=1), torch.cat(labels)


@torch.no_grad()
def predict_bayesian(hybrid, guide, loader, num_samples: int = 20, seed: int | None = 0,
                     keep_samples: bool = False, local_reparameterization: bool = False,
                     samples_per_chunk: int | None = None, temperature: float | None = None) -> Predictions:
    """Monte-Carlo posterior predictive of a :class:`models.HybridClassifier`.

    Parameters
    ----------
    hybrid : HybridClassifier
        Put in eval mode here, so batch norm uses its running statistics.
    guide : callable
        A trained guide over the head's sites.
    loader : iterable of ``(images, labels)``
    num_samples : int
        Posterior samples S of the head.
    seed : int or None
        Seeds Pyro before sampling, so the same run gives the same numbers.
    keep_samples : bool
        Also return ``sample_probs`` of shape ``(S, N, num_classes)`` (memory grows with S*N).
    local_reparameterization : bool
        Sample each input's logits from their Gaussian marginal instead of sampling weights
        (see :func:`local_reparameterization_logits`). Needs a mean-field Gaussian guide and
        the categorical likelihood. The predictive distribution per input is the same, but the
        Monte-Carlo draws are independent across inputs, so a prediction depends on the seed and
        on the batch it falls in (in its noise only).
    samples_per_chunk : int or None
        Samples applied to one batch at once; ``None`` keeps each chunk at about
        ``CHUNK_ELEMENTS`` logits. With weight sampling the chunks reuse the same draws, so the
        results change only by float32 rounding of the smaller matrix products.
    temperature : float or None
        Divides every draw's logits before the softmax. ``None`` uses ``hybrid.temperature``
        (fitted on the validation split by :func:`pipelines.runner.fit_head_temperature`), or 1
        when the hybrid has none.

    Raises
    ------
    ValueError
        For ``num_samples < 1``, ``samples_per_chunk < 1``, a temperature that is not positive,
        or ``local_reparameterization`` with a guide or head it does not support.
    """
    if samples_per_chunk is not None and samples_per_chunk < 1:
        raise ValueError(f"samples_per_chunk must be at least 1 or None, got {samples_per_chunk}")
    temperature = _resolve_temperature(hybrid, temperature)
    start = time.perf_counter()
    log_probs, entropies, labels, sample_batches = [], [], [], []
    for draw_logits, batch, targets in _batch_draws(hybrid, guide, loader, num_samples, seed,
                                                    local_reparameterization):
        chunk = _chunk_size(samples_per_chunk, batch, hybrid.head.out_features)
        batch_log_probs, batch_entropy, batch_samples = _average_samples(draw_logits, num_samples, chunk,
                                                                         keep_samples, temperature)
        log_probs.append(batch_log_probs)
        entropies.append(batch_entropy)
        labels.append(targets)
        if keep_samples:
            sample_batches.append(batch_samples)
    return _collect(log_probs, entropies, labels, sample_batches, start)
