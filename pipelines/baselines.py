"""Post-hoc calibration baselines that a Bayesian head should be compared against."""

from __future__ import annotations

import math

import numpy as np
import torch


def fit_temperature(log_probs, labels, max_iter: int = 200) -> float:
    """Fit the temperature T of temperature scaling by minimising the NLL (Guo et al., 2017).

    Temperature scaling divides the logits by one scalar ``T > 0`` fitted on held-out data.
    Because ``softmax(log_softmax(z) / T) == softmax(z / T)``, log-probabilities serve as
    well as logits.

    Given logits with a leading axis of S posterior samples, ``T`` divides each sample's
    logits, and the NLL is the one of the Monte-Carlo predictive: the mean over samples of
    ``softmax(z_s / T)``. Keeping the same S samples while ``T`` moves makes the objective
    smooth.

    Parameters
    ----------
    log_probs : array of shape ``(N, num_classes)`` or ``(S, N, num_classes)``
        Log-probabilities (or logits) on the validation split, optionally per posterior sample.
    labels : array of shape ``(N,)``
        Validation labels.
    max_iter : int
        Iterations of L-BFGS on ``log T``.

    Returns
    -------
    float
        The fitted temperature.

    References
    ----------
    Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural Networks", ICML 2017.
    """
    scores = torch.as_tensor(np.asarray(log_probs), dtype=torch.float64)
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if scores.dim() == 2:
        scores = scores.unsqueeze(0)
    if scores.dim() != 3 or scores.shape[1] != len(targets) or len(targets) == 0 or scores.shape[0] == 0:
        raise ValueError(
            f"expected log_probs of shape (N, num_classes) or (S, N, num_classes) and N labels with N > 0, "
            f"got {tuple(np.shape(log_probs))} and {tuple(targets.shape)}"
        )
    if not torch.isfinite(scores).all():
        raise ValueError("log_probs contain NaN or infinite values; pass finite logits or log-probabilities")
    num_samples = scores.shape[0]
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        per_sample = torch.log_softmax(scores / log_temperature.exp(), dim=-1)
        predictive = torch.logsumexp(per_sample, dim=0) - math.log(num_samples)
        loss = torch.nn.functional.nll_loss(predictive, targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_temperature.detach().exp())


def apply_temperature(log_probs, temperature: float) -> np.ndarray:
    """Return ``softmax(log_probs / temperature)`` as float64 probabilities."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scores = torch.as_tensor(np.asarray(log_probs), dtype=torch.float64) / temperature
    return torch.softmax(scores, dim=-1).numpy()
