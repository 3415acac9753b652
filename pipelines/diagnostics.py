"""ArviZ diagnostics of the Bayesian head: InferenceData, PSIS-LOO, model comparison, plots.

A trained run becomes an :class:`arviz.InferenceData` with these groups:

- ``posterior``: draws of the head's sample sites from the guide, ``head.weight`` with dims
  ``(chain, draw, class, feature)``, ``head.bias`` and (hierarchical prior) ``head.scale``
  with dims ``(chain, draw, class)``;
- ``posterior_predictive``: one sampled label ``obs`` per draw and test input,
  ``(chain, draw, obs_id)``;
- ``log_likelihood``: ``obs``, the pointwise ``log p(y_i | x_i, theta_s)`` on the test set,
  ``(chain, draw, obs_id)``, with each draw's logits divided by the run's fitted temperature
  (attribute ``temperature``), so the test lppd matches the run's NLL;
- ``observed_data``: the test labels ``obs``, ``(obs_id,)``;
- ``sample_stats``: ``train_loss``, the run's mean training loss per epoch (the negative ELBO
  per training example), ``(chain, epoch)``.

SVI gives independent draws from one variational distribution, not a Markov chain, so one run
is one chain and a run's draws are never split into chains. :func:`combine_runs` stacks runs
(for example several seeds) with one chain per run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyro
import torch

logger = logging.getLogger(__name__)

DEFAULT_NUM_DRAWS = 200
DEFAULT_TOP_WEIGHTS = 5
DEFAULT_MAX_ROWS = 80
# Pareto shape k above which the PSIS estimate is unreliable whatever the number of draws S.
# ArviZ 0.23's loo flags k above min(1 - 1/log10(S), 0.7), which this value caps.
PARETO_K_THRESHOLD = 0.7
RHAT_THRESHOLD = 1.01
HDI_PROB = 0.94
# Draws below which PSIS-LOO is not computed, because ArviZ's k threshold
# min(1 - 1/log10(S), 0.7) is 0 at S = 10 and 0.23 at S = 20.
# NOTE: 20 is a floor that keeps the numbers defined, not a recommendation; use hundreds.
MIN_LOO_DRAWS = 20
# Elements of the (draws, batch, classes) logits tensor computed at once.
LOGITS_PER_BATCH = 2**22
# Classes shown in the forest plot, and weights shown in the posterior plot.
MAX_FOREST_CLASSES = 10
NUM_POSTERIOR_PLOTS = 6

INFERENCE_DATA_FILE = "diagnostics.nc"
REPORT_FILE = "diagnostics.md"
TRAIN_LOSS_PLOT = "diagnostics_train_loss.png"
FOREST_PLOT = "diagnostics_forest.png"
POSTERIOR_PLOT = "diagnostics_posterior.png"
COMBINED_FILE = "combined.nc"
COMBINED_REPORT = "combined.md"
COMBINED_FOREST_PLOT = "combined_forest.png"
COMBINED_TRAIN_LOSS_PLOT = "combined_train_loss.png"


class DiagnosticsError(ValueError):
    """A run or InferenceData cannot be diagnosed as asked; the message names it and the fix."""


def import_arviz():
    """Import and return ArviZ with its once-a-day ``FutureWarning`` about version 1.0 silenced.

    ArviZ 0.23 warns on import, at most once a day, that its API will change. The warning is
    about ArviZ, not about this code, and it fails test suites that turn warnings into errors.
    """
    # ArviZ 0.23 also logs at INFO, on import, which of its future subpackages are missing.
    with _logger_level("arviz.preview", logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    return arviz


@contextmanager
def _logger_level(name: str, level: int):
    """Set another library's logger to ``level`` for the duration of the block."""
    target = logging.getLogger(name)
    previous = target.level
    target.setLevel(level)
    try:
        yield
    finally:
        target.setLevel(previous)


@contextmanager
def _warnings_logged():
    """Turn warnings raised by ArviZ calls into log records.

    Two kinds go to debug level: the high-Pareto-k warning, because the diagnostics report
    the count of high k values themselves, and deprecation warnings that ArviZ triggers in
    pandas or matplotlib, which a user of this package cannot act on.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen = set()
    for warning in caught:
        message = str(warning.message)
        if message in seen:
            continue
        seen.add(message)
        quiet = (message.startswith("Estimated shape parameter of Pareto")
                 or issubclass(warning.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)))
        logger.log(logging.DEBUG if quiet else logging.WARNING, "ArviZ: %s", message)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------
# InferenceData


def _class_dims(shape: tuple[int, ...], num_classes: int) -> list[str] | None:
    if len(shape) == 2 and shape[0] == num_classes:
        return ["class", "feature"]
    if len(shape) == 1 and shape[0] == num_classes:
        return ["class"]
    return None


def _loss_matrix(train_losses: Sequence[Sequence[float]], num_chains: int) -> np.ndarray:
    """Stack per-chain loss histories into ``(chain, epoch)``, padding shorter ones with NaN."""
    if len(train_losses) != num_chains:
        raise DiagnosticsError(f"expected one loss history per chain ({num_chains}), got {len(train_losses)}")
    num_epochs = max((len(losses) for losses in train_losses), default=0)
    matrix = np.full((num_chains, num_epochs), np.nan)
    for chain, losses in enumerate(train_losses):
        matrix[chain, : len(losses)] = np.asarray(losses, dtype=np.float64)
    return matrix


def to_inference_data(
    posterior: Mapping[str, np.ndarray],
    log_likelihood: np.ndarray,
    posterior_predictive: np.ndarray,
    observed: np.ndarray,
    classes: Sequence[str],
    train_losses: Sequence[Sequence[float]] | None = None,
    attrs: Mapping[str, str | int | float] | None = None,
):
    """Build InferenceData from arrays that carry an explicit chain axis.

    Parameters
    ----------
    posterior : dict of str to ndarray of shape ``(chain, draw, ...)``
        Draws of each sample site. Sites of shape ``(num_classes, num_features)`` get the dims
        ``class, feature`` and sites of shape ``(num_classes,)`` the dim ``class``.
    log_likelihood : ndarray of shape ``(chain, draw, N)``
        Pointwise ``log p(y_i | theta)`` of the observed labels.
    posterior_predictive : ndarray of shape ``(chain, draw, N)``
        A sampled label per draw and input.
    observed : ndarray of shape ``(N,)``
        The observed labels.
    classes : sequence of str
        Class names, the coordinates of the ``class`` dim.
    train_losses : sequence of sequences of float, or None
        Per chain, the mean training loss of each epoch; stored as ``sample_stats.train_loss``
        with dims ``(chain, epoch)``, NaN-padded when chains trained for different epochs.
    attrs : dict or None
        Attributes of the InferenceData; values must be str, int or float so netCDF keeps them.

    Raises
    ------
    DiagnosticsError
        When an array lacks the leading ``(chain, draw)`` axes or their sizes disagree: a
        ``(draw, ...)`` array would otherwise be read as ``draw`` chains of few draws.
    """
    az = import_arviz()
    log_likelihood = np.asarray(log_likelihood)
    if log_likelihood.ndim != 3:
        raise DiagnosticsError(f"expected log_likelihood of shape (chain, draw, N), got {log_likelihood.shape}")
    num_chains, num_draws, num_obs = log_likelihood.shape
    observed = np.asarray(observed)
    if observed.shape != (num_obs,):
        raise DiagnosticsError(f"expected observed labels of shape ({num_obs},), got {observed.shape}")
    if np.shape(posterior_predictive) != log_likelihood.shape:
        raise DiagnosticsError(
            f"posterior_predictive has shape {np.shape(posterior_predictive)}, expected {log_likelihood.shape}"
        )
    dims = {"obs": ["obs_id"]}
    for name, value in posterior.items():
        if np.shape(value)[:2] != (num_chains, num_draws):
            raise DiagnosticsError(
                f"posterior site {name!r} has shape {np.shape(value)}; expected leading (chain, draw) = "
                f"({num_chains}, {num_draws}): add the chain axis explicitly, e.g. value[np.newaxis]"
            )
        site_dims = _class_dims(np.shape(value)[2:], len(classes))
        if site_dims is not None:
            dims[name] = site_dims
    feature_sizes = {np.shape(v)[3] for n, v in posterior.items() if dims.get(n) == ["class", "feature"]}
    coords = {"class": list(classes), "obs_id": np.arange(num_obs)}
    if len(feature_sizes) == 1:
        coords["feature"] = np.arange(feature_sizes.pop())

    idata = az.from_dict(
        posterior={name: np.asarray(value) for name, value in posterior.items()},
        posterior_predictive={"obs": np.asarray(posterior_predictive)},
        log_likelihood={"obs": log_likelihood},
        observed_data={"obs": observed},
        coords=coords,
        dims=dims,
        attrs=dict(attrs or {}),
    )
    if train_losses is not None:
        idata.add_groups(sample_stats=_train_loss_dataset(_loss_matrix(train_losses, num_chains)))
    return idata


def _train_loss_dataset(matrix: np.ndarray):
    import xarray as xr

    loss = xr.DataArray(
        matrix, dims=("chain", "epoch"),
        coords={"chain": np.arange(matrix.shape[0]), "epoch": np.arange(1, matrix.shape[1] + 1)},
        attrs={"description": "mean training loss per epoch: the negative ELBO per training example, "
                              "with the KL term weighted as in training (--kl-weight, --kl-warmup-epochs)"},
    )
    return xr.Dataset({"train_loss": loss})


@torch.no_grad()
def _pointwise_log_likelihood(head, samples: dict[str, torch.Tensor], features: torch.Tensor,
                              labels: torch.Tensor, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Return ``log p(y_i | theta_s)`` in float64 and one sampled label per draw, both ``(S, N)``.

    Each draw's logits are divided by ``temperature`` first, as in prediction.
    """
    from pipelines.prediction import head_logits

    num_draws = next(iter(samples.values())).shape[0]
    num_classes = head.out_features
    batch_size = max(1, LOGITS_PER_BATCH // (num_draws * num_classes))
    log_likelihood, predictive = [], []
    for start in range(0, len(labels), batch_size):
        batch_features = features[start : start + batch_size]
        batch_labels = labels[start : start + batch_size]
        logits = head_logits(head.model, samples, batch_features).reshape(num_draws, len(batch_labels), num_classes)
        logits = logits / temperature
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        index = batch_labels.view(1, -1, 1).expand(num_draws, -1, 1)
        log_likelihood.append(log_probs.gather(-1, index).squeeze(-1).cpu())
        predictive.append(torch.distributions.Categorical(logits=logits).sample().cpu())
    return torch.cat(log_likelihood, dim=1).numpy(), torch.cat(predictive, dim=1).numpy()


def head_inference_data(head, guide, features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], *,
                        num_draws: int = DEFAULT_NUM_DRAWS, seed: int | None = 0,
                        train_losses: Sequence[float] | None = None, attrs: Mapping | None = None,
                        temperature: float = 1.0):
    """Draw the head's posterior from ``guide`` and build one-chain InferenceData on a dataset.

    Parameters
    ----------
    head : models.BayesianLinearHead
        The head whose ``model`` the guide was fitted to.
    guide : callable
        A trained guide over the head's sites.
    features : Tensor of shape ``(N, in_features)``
        Inputs of the head (backbone features of the test images).
    labels : Tensor of shape ``(N,)``
        True class indices.
    classes : sequence of str
        Class names, ``num_classes`` of them.
    num_draws : int
        Posterior draws S. Memory grows as ``S * N`` for the log-likelihood and the predictive;
        logits are computed in batches of at most ``LOGITS_PER_BATCH`` elements.
    seed : int or None
        Seeds Pyro (and torch, numpy) before drawing, so the same call gives the same draws.
    train_losses : sequence of float or None
        Mean training loss per epoch, stored as ``sample_stats.train_loss``.
    attrs : dict or None
        Attributes of the InferenceData.
    temperature : float
        Divides every draw's logits in the log-likelihood and the posterior predictive (a run's
        fitted ``hybrid.temperature``); 1 leaves the head as trained.

    Returns
    -------
    arviz.InferenceData
        With ``chain`` of size 1 and ``draw`` of size ``num_draws``.
    """
    from pipelines.prediction import sample_posterior

    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise DiagnosticsError(f"num_draws must be a positive integer, got {num_draws!r}")
    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise DiagnosticsError(
            f"expected features (N, in_features) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if len(classes) != head.out_features:
        raise DiagnosticsError(f"the head has {head.out_features} classes but {len(classes)} class names were given")
    if seed is not None:
        pyro.set_rng_seed(seed)
    samples = sample_posterior(head.model, guide, num_draws, features[:1])
    log_likelihood, predictive = _pointwise_log_likelihood(head, samples, features, labels.to(features.device),
                                                           float(temperature))
    posterior = {name: value.detach().cpu().numpy()[np.newaxis] for name, value in samples.items()}
    return to_inference_data(
        posterior, log_likelihood[np.newaxis], predictive[np.newaxis], labels.cpu().numpy(), classes,
        train_losses=None if train_losses is None else [list(train_losses)], attrs=attrs,
    )


# --------------------------------------------------------------------------------------------
# Runs


def _reload_run(run_dir: Path, data_dir: str | None, device: str | None, prior=None, guide_factory=None):
    """Rebuild a classification run's data, models and loaders as :func:`pipelines.runner.evaluate` does."""
    from pipelines.runner import check_components, read_run_report, reload_run, stored_config

    report = read_run_report(run_dir)
    config = stored_config(report, data_dir, device)
    if config.likelihood != "categorical":
        raise DiagnosticsError(
            f"{run_dir} is a regression run (--likelihood {config.likelihood}); the diagnostics cover "
            "classification runs (--likelihood categorical) only"
        )
    check_components(report["models"]["bayesian"], prior, guide_factory)
    return report, reload_run(run_dir, report, config, prior=prior, guide_factory=guide_factory)


@torch.no_grad()
def _test_features(hybrid, data, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backbone once over the test split, in eval mode."""
    from pipelines.data import BatchIterator
    from pipelines.runner import PREDICT_BATCH_SIZE

    loader = BatchIterator(data.test, PREDICT_BATCH_SIZE, data.mean, data.std, device=device)
    features, labels = [], []
    for images, targets in loader:
        features.append(hybrid.features(images))
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def fingerprint_test_split(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-1 of the test images and labels, to tell whether two runs share a test set."""
    import hashlib

    digest = hashlib.sha1()
    digest.update(images.cpu().contiguous().numpy().tobytes())
    digest.update(labels.cpu().to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def build_inference_data(run_dir: str | Path, *, num_draws: int = DEFAULT_NUM_DRAWS, data_dir: str | None = None,
                         device: str | None = None, seed: int | None = None, prior=None, guide_factory=None):
    """Reload a run and build its InferenceData on the test set (see the module docstring).

    Parameters
    ----------
    run_dir : path
        Output folder of ``bayeshead run``.
    num_draws : int
        Posterior draws of the head.
    data_dir, device : str or None
        Override the run's data folder and device.
    seed : int or None
        Seed of the draws; ``None`` uses the run's seed, as ``bayeshead run`` does when it
        predicts, so ``num_draws`` equal to the run's ``num_samples`` gives the same draws.
    prior, guide_factory : optional
        The Python prior and guide factory a run was trained with, as for
        :func:`pipelines.runner.evaluate`; runs of the CLI need neither.

    Raises
    ------
    FileNotFoundError
        When the folder, its ``report.json`` or a checkpoint is missing.
    DiagnosticsError
        When ``report.json`` is not a report of ``bayeshead run``, or the run is a regression.
    ConfigError
        When the run was trained with a Python prior or guide factory that is not passed.
    """
    run_dir = Path(run_dir)
    report, loaded = _reload_run(run_dir, data_dir, device, prior, guide_factory)
    config = report["config"]
    seed = config["seed"] if seed is None else seed
    hybrid, guide = loaded.models.hybrid, loaded.models.guide
    features, labels = _test_features(hybrid, loaded.data, loaded.device)
    attrs = {
        "run_dir": str(run_dir.resolve()),
        "dataset": report.get("dataset", config["dataset"]),
        "config": json.dumps(config, sort_keys=True),
        "test_set_sha1": fingerprint_test_split(loaded.data.test.images, loaded.data.test.labels),
        "draw_seed": int(seed),
        "likelihood_data": "test split",
        "temperature": float(hybrid.temperature),
    }
    logger.info("%s: %d draws of the head on %d test inputs", run_dir, num_draws, len(labels))
    return head_inference_data(hybrid.head, guide, features, labels, loaded.data.classes, num_draws=num_draws,
                               seed=seed, train_losses=report["models"]["bayesian"].get("train_losses"),
                               attrs=attrs, temperature=hybrid.temperature)


def save_inference_data(idata, path: str | Path) -> Path:
    """Write InferenceData to netCDF atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        idata.to_netcdf(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_inference_data(path: str | Path):
    """Read InferenceData from netCDF fully into memory, so no file handle stays open."""
    az = import_arviz()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run 'bayeshead diagnose {path.parent}' to write it")
    with az.rc_context({"data.load": "eager"}):
        return az.from_netcdf(path)


def load_or_build_inference_data(run_dir: str | Path, *, num_draws: int = DEFAULT_NUM_DRAWS,
                                 data_dir: str | None = None, device: str | None = None):
    """Return the run's ``diagnostics.nc``, building and saving it first when it is missing.

    A file older than the run's ``bayesian.pt`` describes an earlier training and is rebuilt.
    ``num_draws`` applies only when the file is built.
    """
    run_dir = Path(run_dir)
    path = run_dir / INFERENCE_DATA_FILE
    checkpoint = run_dir / "bayesian.pt"
    if path.is_file() and (not checkpoint.is_file() or path.stat().st_mtime >= checkpoint.stat().st_mtime):
        return load_inference_data(path)
    idata = build_inference_data(run_dir, num_draws=num_draws, data_dir=data_dir, device=device)
    save_inference_data(idata, path)
    logger.info("wrote %s", path)
    return idata


# --------------------------------------------------------------------------------------------
# Combining and comparing runs


def _num_chains(idata) -> int:
    return int(idata.posterior.sizes["chain"])


def check_same_test_set(named: Mapping[str, object]) -> None:
    """Raise :class:`DiagnosticsError` unless every InferenceData has the same observed labels.

    When both carry a ``test_set_sha1`` attribute the test images must match too.
    """
    items = list(named.items())
    reference_name, reference = items[0]
    expected = reference.observed_data["obs"].values
    hint = ("runs are comparable only on the same dataset with the same --subset; with --subset "
            "smaller than the test split, the test images also depend on --seed")
    for name, idata in items[1:]:
        observed = idata.observed_data["obs"].values
        if observed.shape != expected.shape:
            raise DiagnosticsError(
                f"{name} has {observed.size} test labels but {reference_name} has {expected.size}; {hint}"
            )
        mismatches = int(np.count_nonzero(observed != expected))
        if mismatches:
            raise DiagnosticsError(
                f"test labels of {name} and {reference_name} differ at {mismatches} of {expected.size} positions; {hint}"
            )
        fingerprints = (idata.attrs.get("test_set_sha1"), reference.attrs.get("test_set_sha1"))
        if None not in fingerprints and fingerprints[0] != fingerprints[1]:
            raise DiagnosticsError(f"test images of {name} and {reference_name} differ; {hint}")


def _check_same_head(named: Mapping[str, object]) -> None:
    items = list(named.items())
    reference_name, reference = items[0]
    for name, idata in items[1:]:
        for variable, value in reference.posterior.data_vars.items():
            other = idata.posterior.get(variable)
            if other is None or other.shape[1:] != value.shape[1:]:
                shape = None if other is None else tuple(other.shape)
                raise DiagnosticsError(
                    f"{name} has posterior {variable!r} of shape {shape} but {reference_name} has {tuple(value.shape)}; "
                    "combine runs with the same head and the same --num-draws"
                )
        if list(idata.posterior["class"].values) != list(reference.posterior["class"].values):
            raise DiagnosticsError(f"{name} and {reference_name} have different class names")


def _train_losses(idata) -> list[list[float]] | None:
    if "sample_stats" not in idata.groups() or "train_loss" not in idata.sample_stats:
        return None
    matrix = idata.sample_stats["train_loss"].values
    return [[float(x) for x in row if not np.isnan(x)] for row in matrix]


def _run_label(idata, fallback: str) -> str:
    return idata.attrs.get("run_dir", fallback)


def combine_runs(runs: Sequence) -> object:
    """Stack runs into one InferenceData with one chain per run (more if an input has more).

    Parameters
    ----------
    runs : sequence of InferenceData or paths
        InferenceData objects, or run folders (their ``diagnostics.nc`` is read, and built with
        :data:`DEFAULT_NUM_DRAWS` draws when missing). At least two runs.

    Raises
    ------
    DiagnosticsError
        When fewer than two runs are given, or the runs differ in test set, head shape, classes
        or number of draws.
    """
    if len(runs) < 2:
        raise DiagnosticsError(f"combine_runs needs at least two runs, got {len(runs)}")
    named = {}
    for index, run in enumerate(runs):
        idata = run if hasattr(run, "posterior") else load_or_build_inference_data(run)
        label = str(run) if not hasattr(run, "posterior") else _run_label(idata, f"run {index}")
        named[label if label not in named else f"{label} ({index})"] = idata
    check_same_test_set(named)
    _check_same_head(named)

    idatas = list(named.values())
    reference = idatas[0]
    posterior = {
        name: np.concatenate([idata.posterior[name].values for idata in idatas])
        for name in reference.posterior.data_vars
    }
    losses = [_train_losses(idata) for idata in idatas]
    train_losses = None if any(x is None for x in losses) else [row for rows in losses for row in rows]
    runs_attr = [{"run_dir": _run_label(idata, label), "config": json.loads(idata.attrs.get("config", "null"))}
                 for label, idata in named.items()]
    attrs = {"runs": json.dumps(runs_attr), "likelihood_data": reference.attrs.get("likelihood_data", "")}
    if "test_set_sha1" in reference.attrs:
        attrs["test_set_sha1"] = reference.attrs["test_set_sha1"]
    return to_inference_data(
        posterior,
        np.concatenate([idata.log_likelihood["obs"].values for idata in idatas]),
        np.concatenate([idata.posterior_predictive["obs"].values for idata in idatas]),
        reference.observed_data["obs"].values,
        [str(c) for c in reference.posterior["class"].values],
        train_losses=train_losses,
        attrs=attrs,
    )


def _psis_loo(idata):
    az = import_arviz()
    num_draws = _num_chains(idata) * int(idata.posterior.sizes["draw"])
    if num_draws < MIN_LOO_DRAWS:
        raise DiagnosticsError(
            f"PSIS-LOO needs at least {MIN_LOO_DRAWS} draws, got {num_draws}; rebuild with a larger --num-draws"
        )
    # The draws are independent (SVI, not MCMC), so the relative efficiency is 1; left to
    # ArviZ, several chains would get an MCMC estimate of it.
    with _warnings_logged():
        return az.loo(idata, pointwise=True, var_name="obs", reff=1.0)


def loo_diagnostics(idata) -> dict:
    """PSIS-LOO on the ``log_likelihood`` group, with the Pareto k counts.

    Returns
    -------
    dict
        ``elpd_loo``, ``se``, ``p_loo`` (floats, nats); ``lppd``: the test-set log predictive
        density ``sum_i log(mean_s p(y_i | theta_s))`` (float); ``num_observations``,
        ``num_draws`` (ints); ``pareto_k`` (ndarray of shape ``(N,)``); ``k_threshold``
        (:data:`PARETO_K_THRESHOLD`) and ``num_high_k``, the count of k above it; ``good_k``,
        ArviZ's sample-size-dependent threshold ``min(1 - 1/log10(S), 0.7)``, and
        ``num_above_good_k``; ``loo``: ArviZ's ``ELPDData``.
    """
    loo = _psis_loo(idata)
    pareto_k = np.asarray(loo.pareto_k.values, dtype=np.float64)
    log_likelihood = idata.log_likelihood["obs"].values
    num_draws = log_likelihood.shape[0] * log_likelihood.shape[1]
    flat = log_likelihood.reshape(num_draws, -1)
    lppd = float(np.sum(np.logaddexp.reduce(flat, axis=0) - math.log(num_draws)))
    return {
        "elpd_loo": float(loo.elpd_loo),
        "se": float(loo.se),
        "p_loo": float(loo.p_loo),
        "lppd": lppd,
        "num_observations": int(loo.n_data_points),
        "num_draws": int(loo.n_samples),
        "pareto_k": pareto_k,
        "k_threshold": PARETO_K_THRESHOLD,
        "num_high_k": int(np.count_nonzero(pareto_k > PARETO_K_THRESHOLD)),
        "good_k": float(loo.good_k),
        "num_above_good_k": int(np.count_nonzero(pareto_k > loo.good_k)),
        "loo": loo,
    }


def compare_inference_data(named: Mapping[str, object]):
    """``az.compare`` of two or more InferenceData on PSIS-LOO; returns ArviZ's DataFrame.

    Raises
    ------
    DiagnosticsError
        For fewer than two entries or entries on different test sets.
    """
    az = import_arviz()
    if len(named) < 2:
        raise DiagnosticsError(f"comparing needs at least two runs, got {len(named)}")
    check_same_test_set(named)
    elpds = {name: _psis_loo(idata) for name, idata in named.items()}
    with _warnings_logged():
        return az.compare(elpds, ic="loo")


def _unique_labels(run_dirs: Sequence[Path]) -> list[str]:
    names = [path.name or str(path) for path in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(path) for path in run_dirs]


def compare_runs(run_dirs: Sequence[str | Path], *, num_draws: int = DEFAULT_NUM_DRAWS,
                 data_dir: str | None = None, device: str | None = None):
    """Compare runs on PSIS-LOO of the test set with ``az.compare``.

    Each run's ``diagnostics.nc`` is read, or built with ``num_draws`` draws and saved when
    missing or older than the run's checkpoint. Rows are named by the run folders' names (by
    the paths as given when two names clash).

    Returns
    -------
    pandas.DataFrame
        ArviZ's comparison table: ``rank``, ``elpd_loo``, ``p_loo``, ``elpd_diff``, ``weight``
        (stacking), ``se``, ``dse``, ``warning``, ``scale``, best run first.

    Raises
    ------
    DiagnosticsError
        For fewer than two runs, or runs on different test sets.
    """
    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        raise DiagnosticsError(f"comparing needs at least two runs, got {len(paths)}")
    named = {
        label: load_or_build_inference_data(path, num_draws=num_draws, data_dir=data_dir, device=device)
        for label, path in zip(_unique_labels(paths), paths, strict=True)
    }
    return compare_inference_data(named)


def rhat_across_runs(idata):
    """Rank-normalised split R-hat (``az.rhat``) over the chains of combined runs.

    Returns
    -------
    pandas.DataFrame
        One row per posterior variable and one for the pointwise log-likelihood
        (``log_likelihood obs``), with columns ``size``, ``median_r_hat``, ``max_r_hat`` and
        ``num_above_threshold`` (R-hat above :data:`RHAT_THRESHOLD`).
    """
    import pandas as pd

    az = import_arviz()
    if _num_chains(idata) < 2:
        raise DiagnosticsError("R-hat across runs needs at least two chains; combine runs with combine_runs first")
    with _warnings_logged():
        parameters = az.rhat(idata.posterior)
        log_likelihood = az.rhat(idata.log_likelihood)
    rows = {}
    sources = [(name, parameters[name]) for name in parameters.data_vars]
    sources.append(("log_likelihood obs", log_likelihood["obs"]))
    for name, values in sources:
        values = np.asarray(values.values, dtype=np.float64).ravel()
        rows[name] = {
            "size": values.size,
            "median_r_hat": float(np.nanmedian(values)),
            "max_r_hat": float(np.nanmax(values)),
            "num_above_threshold": int(np.count_nonzero(values > RHAT_THRESHOLD)),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


# --------------------------------------------------------------------------------------------
# Posterior summary


def top_weights(idata, per_class: int = DEFAULT_TOP_WEIGHTS) -> list[tuple[str, int]]:
    """Return ``(class, feature)`` of the ``per_class`` largest-|mean| weights of each class.

    The means are taken over all chains and draws. Classes keep their order, and within a
    class the weights are ordered by decreasing |mean|.
    """
    weight = idata.posterior["head.weight"]
    mean_abs = np.abs(weight.mean(("chain", "draw")).values)
    per_class = min(per_class, mean_abs.shape[1])
    order = np.argsort(-mean_abs, axis=1, kind="stable")[:, :per_class]
    classes = [str(c) for c in weight["class"].values]
    return [(classes[k], int(feature)) for k in range(len(classes)) for feature in order[k]]


def _selected_weights(idata, selection: Sequence[tuple[str, int]]):
    """``head.weight`` at the selected entries, along one dim with labels ``class, feature``."""
    import xarray as xr

    weight = idata.posterior["head.weight"]
    class_index = {str(c): i for i, c in enumerate(weight["class"].values)}
    rows = xr.DataArray([class_index[c] for c, _ in selection], dims="weight")
    columns = xr.DataArray([f for _, f in selection], dims="weight")
    selected = weight.isel({"class": rows, "feature": columns}).drop_vars(["class", "feature"])
    return selected.assign_coords(weight=[f"{c}, {f}" for c, f in selection])


def summary_dataset(idata, selection: Sequence[tuple[str, int]]):
    """Collect the bias (and hierarchical scale) of every class and the selected weights in a Dataset."""
    import xarray as xr

    variables = {name: idata.posterior[name] for name in ("head.bias", "head.scale") if name in idata.posterior}
    variables["head.weight"] = _selected_weights(idata, selection)
    return xr.Dataset(variables)


def posterior_summary(idata, *, per_class: int = DEFAULT_TOP_WEIGHTS, max_rows: int = DEFAULT_MAX_ROWS):
    """``az.summary`` of the head: every bias, the scales, and the top weights of each class.

    One chain gives mean, sd and the 94% HDI; several chains add ESS and R-hat. Rows beyond
    ``max_rows`` are dropped (the weights of the last classes first).

    Returns
    -------
    tuple of (pandas.DataFrame, str)
        The table and a sentence that states the selection.
    """
    az = import_arviz()
    selection = top_weights(idata, per_class)
    kind = "stats" if _num_chains(idata) == 1 else "all"
    with _warnings_logged():
        table = az.summary(summary_dataset(idata, selection), kind=kind, hdi_prob=HDI_PROB)
    total = len(table)
    num_classes = idata.posterior.sizes["class"]
    scale = " and the hierarchical scale" if "head.scale" in idata.posterior else ""
    sentence = (f"Rows: the bias{scale} of each of the {num_classes} classes, then for each class the "
                f"{len(selection) // num_classes} weights with the largest |posterior mean|, labelled "
                f"`head.weight[class, feature]` (feature = index of the backbone output); HDI is the "
                f"{HDI_PROB:.0%} highest-density interval.")
    if total > max_rows:
        table = table.iloc[:max_rows]
        sentence += f" The first {max_rows} of {total} rows are shown (--max-rows); all draws are in the netCDF file."
    return table, sentence


# --------------------------------------------------------------------------------------------
# Plots


def plot_train_loss(losses: Mapping[str, Sequence[float]], ax=None):
    """Plot the mean training loss (negative ELBO per example) per epoch, one line per run."""
    plt = _pyplot()
    if ax is None:
        figure, ax = plt.subplots(figsize=(6, 4))
    else:
        figure = ax.figure
    for label, values in losses.items():
        epochs = np.arange(1, len(values) + 1)
        ax.plot(epochs, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per training example")
    ax.set_title("Bayesian head: training loss")
    if len(losses) > 1:
        ax.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_weight_forest(idata, selection: Sequence[tuple[str, int]], chain_names: Sequence[str] | None = None,
                       ax=None):
    """``az.plot_forest`` of the selected weights: the 94% HDI of each chain, one row per weight.

    Several chains are drawn as separate models, each in its own colour and named in the
    legend by ``chain_names`` (default ``chain 0``, ``chain 1``, ...).
    """
    plt = _pyplot()
    az = import_arviz()
    dataset = summary_dataset(idata, selection)[["head.weight"]]
    num_chains = _num_chains(idata)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 1.0 + 0.22 * len(selection) * (1 + 0.3 * (num_chains - 1))))
    if num_chains == 1:
        data, options = dataset, {}
    else:
        data = [dataset.isel(chain=[chain]) for chain in range(num_chains)]
        names = list(chain_names) if chain_names is not None else [f"chain {c}" for c in range(num_chains)]
        options = {"model_names": names, "colors": "cycle", "legend": True}
    with _warnings_logged():
        az.plot_forest(data, var_names=["head.weight"], combined=False, hdi_prob=HDI_PROB, ax=ax, **options)
    ax.set_title(f"head.weight [class, feature]: {HDI_PROB:.0%} HDI")
    return ax.figure


def plot_weight_posteriors(idata, selection: Sequence[tuple[str, int]]):
    """``az.plot_posterior`` of the selected weights, with the mass below and above 0."""
    plt = _pyplot()
    az = import_arviz()
    dataset = summary_dataset(idata, selection)[["head.weight"]]
    columns = min(3, len(selection))
    rows = math.ceil(len(selection) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for extra in axes.ravel()[len(selection):]:
        extra.set_visible(False)
    # ArviZ requests a "semibold" font weight that DejaVu Sans lacks, so matplotlib logs a
    # warning each time the figure is laid out or drawn, and uses bold.
    with _warnings_logged(), _logger_level("matplotlib.font_manager", logging.ERROR):
        az.plot_posterior(dataset, var_names=["head.weight"], hdi_prob=HDI_PROB, ref_val=0.0, textsize=9,
                          ax=axes.ravel()[: len(selection)])
        figure.tight_layout()
    return figure


def _save_figure(figure, path: Path) -> None:
    from pipelines.io import atomic_save_figure

    try:
        atomic_save_figure(figure, path, dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(figure)


def _forest_selection(selection: Sequence[tuple[str, int]]) -> tuple[list[tuple[str, int]], int]:
    classes = list(dict.fromkeys(c for c, _ in selection))
    shown = set(classes[:MAX_FOREST_CLASSES])
    return [item for item in selection if item[0] in shown], len(classes)


def _write_plots(out: Path, idata, selection, losses: Mapping[str, Sequence[float]], names: Mapping[str, str]) -> dict:
    files = {}
    if losses and any(len(v) for v in losses.values()):
        _save_figure(plot_train_loss(losses), out / names["train_loss"])
        files["train_loss"] = names["train_loss"]
    forest, _ = _forest_selection(selection)
    chain_names = list(losses) if len(losses) == _num_chains(idata) > 1 else None
    _save_figure(plot_weight_forest(idata, forest, chain_names), out / names["forest"])
    files["forest"] = names["forest"]
    if "posterior" in names:
        largest = {}
        for class_name, feature in selection:
            largest.setdefault(class_name, (class_name, feature))
        chosen = list(largest.values())[:NUM_POSTERIOR_PLOTS]
        with _logger_level("matplotlib.font_manager", logging.ERROR):
            _save_figure(plot_weight_posteriors(idata, chosen), out / names["posterior"])
        files["posterior"] = names["posterior"]
    return files


# --------------------------------------------------------------------------------------------
# Reports


def _format_cell(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(frame) -> str:
    """Render a DataFrame as a Markdown table, floats with three decimals."""
    header = "| " + " | ".join([""] + [str(c) for c in frame.columns]) + " |"
    lines = [header, "|" + "---|" * (len(frame.columns) + 1)]
    # Column by column, so integer columns stay integers (a row of mixed types becomes float).
    columns = [frame[column].tolist() for column in frame.columns]
    for position, index in enumerate(frame.index):
        cells = [str(index)] + [_format_cell(values[position]) for values in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LOO_EXPLANATION = (
    "PSIS-LOO estimates the expected log predictive density (ELPD) of each test input as if "
    "that input were left out of the data the posterior conditions on, by importance sampling "
    "the posterior draws with weights 1/p(y_i | theta_s), smoothed by a Pareto fit to the "
    "largest weights. Its shape k is high when a few draws dominate those weights because "
    "p(y_i | theta) changes a lot across the head's posterior: the posterior would move a lot "
    "if this observation were left out, so the importance-sampling estimate of its "
    "leave-one-out predictive is unreliable. Above k = 0.7 the estimate is unreliable for any "
    "number of draws S; ArviZ also flags k above min(1 - 1/log10(S), 0.7)."
)

LOO_CAVEATS = (
    "Two caveats apply to this model. The head was fitted on the training split and the "
    "log-likelihood is computed on the test split, which the posterior never saw: the plain "
    "test log predictive density (lppd) is already an out-of-sample estimate, and ELPD-LOO "
    "equals lppd minus p_loo, a stricter figure whose main use here is the Pareto k check and "
    "`az.compare`. And the draws come from the variational posterior (the guide), not the exact "
    "posterior, so every number describes the guide; a guide that is too narrow makes p_loo "
    "small and k low."
)

RHAT_EXPLANATION = (
    "Each chain is one variational run. Disagreement between them (R-hat above 1.01) shows that "
    "the optimisation found different local optima or stopped at different points, not that "
    "a sampler has not converged: within a run the draws are independent, and each variational "
    "posterior is typically narrower than the exact posterior. When the backbones differ (joint "
    "training, or two-stage with different seeds), feature j of one run need not be feature j "
    "of another, so R-hat of the weights also reflects that the features are not identified; "
    "the R-hat of the pointwise log-likelihood does not depend on how features are numbered."
)


def _loo_lines(loo: dict) -> list[str]:
    return [
        "| ELPD-LOO | SE | p_loo | test lppd | Pareto k > 0.7 | Pareto k > good_k |",
        "|---|---|---|---|---|---|",
        f"| {loo['elpd_loo']:.2f} | {loo['se']:.2f} | {loo['p_loo']:.2f} | {loo['lppd']:.2f} | "
        f"{loo['num_high_k']} of {loo['num_observations']} | "
        f"{loo['num_above_good_k']} (good_k = {loo['good_k']:.2f}) |",
        "",
        f"Values are in nats, summed over the {loo['num_observations']} test inputs, from "
        f"{loo['num_draws']} draws.",
        "",
        LOO_EXPLANATION,
        "",
        LOO_CAVEATS,
    ]


def diagnose_run(run_dir: str | Path, *, num_draws: int = DEFAULT_NUM_DRAWS, data_dir: str | None = None,
                 device: str | None = None, seed: int | None = None, per_class: int = DEFAULT_TOP_WEIGHTS,
                 max_rows: int = DEFAULT_MAX_ROWS, prior=None, guide_factory=None) -> dict:
    """Build a run's InferenceData and write ``diagnostics.nc``, ``diagnostics.md`` and plots.

    The options are those of :func:`build_inference_data` and :func:`posterior_summary`.

    Returns
    -------
    dict
        ``inference_data`` (arviz.InferenceData), ``summary`` (DataFrame), ``selection``
        (sentence), ``loo`` (the dict of :func:`loo_diagnostics`) and ``files`` (names of the
        written files, relative to ``run_dir``).
    """
    run_dir = Path(run_dir)
    idata = build_inference_data(run_dir, num_draws=num_draws, data_dir=data_dir, device=device, seed=seed,
                                 prior=prior, guide_factory=guide_factory)
    save_inference_data(idata, run_dir / INFERENCE_DATA_FILE)
    summary, selection_sentence = posterior_summary(idata, per_class=per_class, max_rows=max_rows)
    loo = loo_diagnostics(idata)
    losses = _train_losses(idata) or []
    names = {"train_loss": TRAIN_LOSS_PLOT, "forest": FOREST_PLOT, "posterior": POSTERIOR_PLOT}
    selection = top_weights(idata, per_class)
    files = {"inference_data": INFERENCE_DATA_FILE,
             **_write_plots(run_dir, idata, selection, {"training": losses[0]} if losses else {}, names)}
    files["report"] = REPORT_FILE
    text = _diagnostics_markdown(run_dir, idata, summary, selection_sentence, loo, files, selection)
    from pipelines.io import atomic_write_text

    atomic_write_text(run_dir / REPORT_FILE, text)
    return {"inference_data": idata, "summary": summary, "selection": selection_sentence, "loo": loo, "files": files}


def _diagnostics_markdown(run_dir, idata, summary, selection_sentence, loo, files, selection) -> str:
    config = json.loads(idata.attrs["config"])
    _, num_classes = _forest_selection(selection)
    lines = [
        f"# Diagnostics of the Bayesian head: {idata.attrs.get('dataset', config['dataset'])}",
        "",
        f"Run `{run_dir}`: prior {config['prior']}, guide {config['guide']}, scheme {config['scheme']}, "
        f"seed {config['seed']}. {idata.posterior.sizes['draw']} draws of the head from the guide "
        f"(draw seed {idata.attrs['draw_seed']}), one chain, on {idata.observed_data.sizes['obs_id']} test "
        f"inputs. All draws are in `{files['inference_data']}` (reload with `arviz.from_netcdf`).",
        "",
        "## Posterior of the head",
        "",
        selection_sentence,
        "",
        markdown_table(summary),
        "",
        "## PSIS-LOO on the test set",
        "",
        *_loo_lines(loo),
        "",
        "## Plots",
        "",
    ]
    if "train_loss" in files:
        lines += [f"![training loss per epoch]({files['train_loss']})", ""]
    shown = min(num_classes, MAX_FOREST_CLASSES)
    lines += [f"Forest plot: the selected weights (the selection of the table) of the first {shown} of "
              f"{num_classes} classes.", "",
              f"![forest plot of selected weights]({files['forest']})", "",
              "Posterior of the largest-|mean| weight of the first classes, with the share of draws "
              "below and above 0:", "", f"![posterior of selected weights]({files['posterior']})", ""]
    return "\n".join(lines)


def write_comparison(run_dirs: Sequence[str | Path], out: str | Path = ".", **options):
    """Compare runs (:func:`compare_runs`) and write ``comparison.md`` and ``comparison.csv`` to ``out``."""
    from pipelines.io import atomic_write_text

    table = compare_runs(run_dirs, **options)
    out = Path(out)
    atomic_write_text(out / "comparison.csv", table.to_csv())
    lines = [
        "# Comparison of runs by PSIS-LOO on the test set",
        "",
        "Runs: " + ", ".join(f"`{p}`" for p in run_dirs) + ".",
        "",
        markdown_table(table),
        "",
        "elpd_loo: ELPD-LOO in nats (higher is better); p_loo: effective number of parameters; "
        "elpd_diff and dse: difference to the best run and its standard error; weight: stacking "
        "weight; warning: True when some Pareto k exceeds ArviZ's threshold.",
        "",
        LOO_CAVEATS,
        "",
    ]
    atomic_write_text(out / "comparison.md", "\n".join(lines))
    return table


def write_combined(run_dirs: Sequence[str | Path], out: str | Path = ".", *, per_class: int = DEFAULT_TOP_WEIGHTS,
                   max_rows: int = DEFAULT_MAX_ROWS) -> dict:
    """Combine runs (one chain each) and write ``combined.nc``, ``combined.md`` and plots to ``out``.

    Returns
    -------
    dict
        ``inference_data``, ``rhat`` (DataFrame of :func:`rhat_across_runs`), ``summary``,
        ``loo`` and ``files``.
    """
    from pipelines.io import atomic_write_text

    out = Path(out)
    idata = combine_runs([Path(p) for p in run_dirs])
    save_inference_data(idata, out / COMBINED_FILE)
    rhat = rhat_across_runs(idata)
    summary, selection_sentence = posterior_summary(idata, per_class=per_class, max_rows=max_rows)
    loo = loo_diagnostics(idata)
    selection = top_weights(idata, per_class)
    losses = _train_losses(idata) or []
    labels = _unique_labels([Path(p) for p in run_dirs])
    names = {"train_loss": COMBINED_TRAIN_LOSS_PLOT, "forest": COMBINED_FOREST_PLOT}
    files = {"inference_data": COMBINED_FILE,
             **_write_plots(out, idata, selection, dict(zip(labels, losses, strict=False)), names),
             "report": COMBINED_REPORT}
    lines = [
        "# Diagnostics of combined runs",
        "",
        "Chains (one per run): " + ", ".join(f"{i}: `{p}`" for i, p in enumerate(run_dirs)) + ".",
        "",
        "## R-hat across runs",
        "",
        markdown_table(rhat),
        "",
        RHAT_EXPLANATION,
        "",
        "## Posterior of the head, all runs pooled",
        "",
        selection_sentence,
        "",
        markdown_table(summary),
        "",
        "## PSIS-LOO of the pooled draws",
        "",
        *_loo_lines(loo),
        "",
        "## Plots",
        "",
    ]
    if "train_loss" in files:
        lines += [f"![training loss per run]({files['train_loss']})", ""]
    lines += [f"![forest plot, one line per run]({files['forest']})", ""]
    atomic_write_text(out / COMBINED_REPORT, "\n".join(lines))
    return {"inference_data": idata, "rhat": rhat, "summary": summary, "loo": loo, "files": files}


# --------------------------------------------------------------------------------------------
# Command line


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipelines.config import ConfigError, RunFolderError
    from pipelines.data import DataError
    from pipelines.training import TrainingError

    return (DiagnosticsError, ConfigError, DataError, RunFolderError, TrainingError, FileNotFoundError,
            NotADirectoryError, PermissionError)


def _report_error(error: BaseException) -> int:
    print(f"bayeshead: error: {error}", file=sys.stderr)
    return 2


def _diagnose_command(args: argparse.Namespace) -> int:
    try:
        result = diagnose_run(args.run_dir, num_draws=args.num_draws, data_dir=args.data_dir, device=args.device,
                              seed=args.seed, per_class=args.top_weights, max_rows=args.max_rows)
    except _user_errors() as error:
        return _report_error(error)
    loo = result["loo"]
    print(f"ELPD-LOO {loo['elpd_loo']:.2f} (SE {loo['se']:.2f}); Pareto k > {PARETO_K_THRESHOLD}: "
          f"{loo['num_high_k']} of {loo['num_observations']} test inputs")
    print(f"diagnostics: {Path(args.run_dir) / REPORT_FILE}")
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    try:
        table = write_comparison(args.run_dirs, args.out, num_draws=args.num_draws, data_dir=args.data_dir,
                                 device=args.device)
    except _user_errors() as error:
        return _report_error(error)
    print(markdown_table(table))
    print(f"comparison: {Path(args.out) / 'comparison.md'}")
    return 0


def _combine_command(args: argparse.Namespace) -> int:
    try:
        result = write_combined(args.run_dirs, args.out, per_class=args.top_weights, max_rows=args.max_rows)
    except _user_errors() as error:
        return _report_error(error)
    print(markdown_table(result["rhat"]))
    print(f"combined diagnostics: {Path(args.out) / COMBINED_REPORT}")
    return 0


def _add_summary_options(parser, positive_int) -> None:
    """Add ``--top-weights`` and ``--max-rows``, the size options of the posterior summary."""
    parser.add_argument("--top-weights", type=positive_int, default=DEFAULT_TOP_WEIGHTS, metavar="K",
                        help=f"weights per class in the summary and plots, largest |mean| first "
                             f"(default: {DEFAULT_TOP_WEIGHTS})")
    parser.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS, metavar="N",
                        help=f"rows of the posterior summary table (default: {DEFAULT_MAX_ROWS})")


def add_commands(subparsers) -> None:
    """Add this module's sub-commands to the ``bayeshead`` parser."""
    from pipelines.cli import positive_int
    from pipelines.config import DEVICES

    diagnose = subparsers.add_parser(
        "diagnose", help="ArviZ diagnostics of a run's Bayesian head",
        description="Draw the Bayesian head's posterior, write diagnostics.nc (ArviZ InferenceData), "
                    "diagnostics.md (posterior summary, PSIS-LOO with Pareto k) and plots into RUN_DIR.")
    diagnose.add_argument("run_dir", metavar="RUN_DIR", help="output folder of 'bayeshead run'")
    diagnose.add_argument("--num-draws", type=positive_int, default=DEFAULT_NUM_DRAWS, metavar="N",
                          help=f"posterior draws of the head (default: {DEFAULT_NUM_DRAWS})")
    diagnose.add_argument("--seed", type=int, help="seed of the draws (default: the run's seed)")
    _add_summary_options(diagnose, positive_int)
    diagnose.add_argument("--data-dir", metavar="DIR", help="data folder, if it moved since the run")
    diagnose.add_argument("--device", choices=DEVICES, help="device to draw on (default: the run's)")
    diagnose.set_defaults(handler=_diagnose_command)

    compare = subparsers.add_parser(
        "compare", help="compare runs by PSIS-LOO (az.compare)",
        description="Compare two or more runs on the same test set by PSIS-LOO with az.compare; "
                    "print the table and write comparison.md and comparison.csv. A run without "
                    "diagnostics.nc gets one first, as 'bayeshead diagnose' would write it.")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output folders of 'bayeshead run'")
    compare.add_argument("--out", default=".", metavar="DIR",
                         help="folder for comparison.md and comparison.csv (default: the current folder)")
    compare.add_argument("--num-draws", type=positive_int, default=DEFAULT_NUM_DRAWS, metavar="N",
                         help=f"posterior draws for runs without diagnostics.nc (default: {DEFAULT_NUM_DRAWS})")
    compare.add_argument("--data-dir", metavar="DIR", help="data folder, if it moved since the runs")
    compare.add_argument("--device", choices=DEVICES, help="device to draw on (default: each run's)")
    compare.set_defaults(handler=_compare_command)

    combine = subparsers.add_parser(
        "combine", help="combine runs (e.g. seeds) as chains and report R-hat across them",
        description="Stack the diagnostics.nc of two or more runs with one chain per run, write "
                    "combined.nc, combined.md (R-hat across runs, pooled summary and PSIS-LOO) and plots.")
    combine.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output folders of 'bayeshead run'")
    combine.add_argument("--out", default=".", metavar="DIR",
                         help="folder for the combined files (default: the current folder)")
    _add_summary_options(combine, positive_int)
    combine.set_defaults(handler=_combine_command)
