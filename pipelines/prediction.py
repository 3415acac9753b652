"""Posterior predictive for the hybrid model and softmax prediction for the baseline.

The hybrid's backbone is deterministic, so it runs once per batch; the head's posterior
samples are drawn once for the whole dataset through ``pyro.infer.Predictive`` and applied to
each batch of features in one vectorised pass. Every input therefore sees the same S draws of
the head, whatever batch it falls in. Probabilities are averaged over samples, not logits, in
float64 log space: ``log p(y|x) = logsumexp_s log_softmax(logits_s) - log S``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Predictive


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


@torch.no_grad()
def predict_bayesian(hybrid, guide, loader, num_samples: int = 20, seed: int | None = 0,
                     keep_samples: bool = False) -> Predictions:
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
    """
    start = time.perf_counter()
    if seed is not None:
        pyro.set_rng_seed(seed)
    hybrid.eval()
    samples = None
    log_probs, entropies, labels, sample_batches = [], [], [], []
    for images, targets in loader:
        features = hybrid.features(images)
        if samples is None:
            samples = sample_posterior(hybrid.head.model, guide, num_samples, features[:1])
        per_sample = torch.log_softmax(head_logits(hybrid.head.model, samples, features).double(), dim=-1)
        log_probs.append(torch.logsumexp(per_sample, dim=0) - math.log(num_samples))
        entropies.append(_entropy(per_sample).mean(0))
        labels.append(targets)
        if keep_samples:
            sample_batches.append(per_sample.exp())
    return _collect(log_probs, entropies, labels, sample_batches, start)
