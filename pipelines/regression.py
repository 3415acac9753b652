"""Regression through the same pipeline: a tabular CSV, an MSE baseline and a Gaussian head.

``bayeshead run --dataset tabular --data-dir FILE.csv --likelihood gaussian`` lands here (via
:func:`pipelines.runner.run`). The CSV has one row per example and only numeric columns, and
the last column is the target. An optional first row of column names is recognised by containing a
cell that is not a number.

Both models share a fully connected backbone (:class:`models.MLPBackbone`, hidden sizes from
``--widths``):

- the deterministic baseline, backbone plus ``nn.Linear``, is trained with mean squared error.
  For its NLL and intervals it predicts ``N(f(x), s**2)``, with ``s`` the root mean squared
  error on the validation split (on the training split when there is no validation split);
- the hybrid puts :class:`models.BayesianLinearHead` with ``likelihood="gaussian"`` on the
  backbone and is trained by SVI, jointly or in two stages as for classification. Its noise
  scale is fixed (``--noise-scale SIGMA``, in the target's units) or learned as a point
  estimate (``--noise-scale learned``). Its posterior predictive is the mixture
  ``(1/S) sum_s N(f_s(x), sigma**2)`` over S posterior samples of the head.

Inputs and targets are standardised with the training split's mean and standard deviation;
every reported number is in the target's original units.

Metrics (:func:`regression_metrics`): RMSE of the predictive mean, the Gaussian negative
log-likelihood of the predictive distribution in nats per test point, and the coverage and
mean width of its central 90% interval.
"""

from __future__ import annotations

import csv
import datetime
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import Predictive

from models import DeterministicClassifier, HybridClassifier, MLPBackbone, Prior, freeze
from pipelines.config import RunConfig
from pipelines.data import SPLIT_SEED, DataError, subset_indices
from pipelines.io import atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint
from pipelines.prediction import sample_posterior
from pipelines.training import (
    FeatureLoader,
    TrainResult,
    make_optimizer,
    run_epochs,
    seed_everything,
    select_device,
    train_hybrid,
    train_svi,
)

logger = logging.getLogger(__name__)

REGRESSION_METRICS = ("rmse", "nll", "coverage_90", "interval_width_90")
MODEL_TITLES = {"deterministic": "MLP (mean squared error)", "bayesian": "MLP + Bayesian head (SVI)"}
TEST_FRACTION = 0.2
INTERVAL = 0.9


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class TabularData:
    """A regression table split into train, validation and test, with its standardisation.

    ``*_x`` are float32 tensors ``(N, num_columns)`` and ``*_y`` float32 tensors ``(N,)``, both
    standardised with the training split's ``x_mean``/``x_std`` and ``y_mean``/``y_std``.
    """

    columns: list[str]
    target: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    x_mean: list[float]
    x_std: list[float]
    y_mean: float
    y_std: float
    info: dict = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return len(self.columns)


def read_table(path: Path) -> tuple[list[str], np.ndarray]:
    """Read a numeric CSV into column names and a float64 array ``(rows, columns)``.

    Raises
    ------
    DataError
        When the file is missing, has fewer than two columns, rows of unequal length, or a
        cell that is not a number (the message names the line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tabular data file {path} not found: expected a CSV file, target in the last column")
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"{path}: the CSV file is empty")
    header = None
    if not all(_is_number(cell) for cell in rows[0]):
        header, rows = [cell.strip() for cell in rows[0]], rows[1:]
    if header:
        width = len(header)
    elif rows:
        width = len(rows[0])
    else:
        width = 0
    if width < 2:
        raise DataError(f"{path}: expected at least two columns (inputs, then the target), got {width}")
    values = np.empty((len(rows), width))
    first_data_line = 2 if header else 1
    for index, row in enumerate(rows):
        line = index + first_data_line
        if len(row) != width:
            raise DataError(f"{path}, line {line}: expected {width} columns, got {len(row)}")
        for column, cell in enumerate(row):
            if not _is_number(cell):
                raise DataError(f"{path}, line {line}, column {column + 1}: {cell!r} is not a finite number")
            values[index, column] = float(cell)
    names = header or [f"x{i}" for i in range(width - 1)] + ["y"]
    return names, values


def _is_number(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def load_tabular(path: str | Path, *, subset: int | None = None, seed: int = 0,
                 val_fraction: float = 0.1) -> TabularData:
    """Load a regression CSV and split it into train, validation and test.

    The test split is ``TEST_FRACTION`` of the rows and the validation split ``val_fraction``
    of the rest, both drawn with the fixed seed ``SPLIT_SEED``, so runs with different seeds
    are compared on the same rows. ``subset`` then keeps a seeded random subset of at most that
    many training and test rows.
    """
    columns, values = read_table(Path(path))
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(values))
    num_test = int(round(TEST_FRACTION * len(values)))
    test_rows, rest = order[:num_test], order[num_test:]
    num_val = int(round(val_fraction * len(rest)))
    val_rows, train_rows = rest[:num_val], rest[num_val:]
    train_rows = np.sort(train_rows)[subset_indices(len(train_rows), subset, seed)]
    test_rows = np.sort(test_rows)[subset_indices(len(test_rows), subset, seed + 1)]
    if len(train_rows) < 2 or len(test_rows) < 1:
        raise DataError(
            f"{path}: {len(values)} rows leave {len(train_rows)} for training and {len(test_rows)} for "
            "testing; expected at least 2 and 1 (give the file more rows)"
        )

    train = values[train_rows]
    x_mean, y_mean = train[:, :-1].mean(0), float(train[:, -1].mean())
    x_std = train[:, :-1].std(0)
    x_std[x_std == 0] = 1.0  # a constant column stays constant instead of dividing by 0
    y_std = float(train[:, -1].std()) or 1.0

    def split(rows):
        x = (values[rows, :-1] - x_mean) / x_std
        y = (values[rows, -1] - y_mean) / y_std
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = split(train_rows), split(val_rows), split(test_rows)
    return TabularData(columns[:-1], columns[-1], train_x, train_y, val_x, val_y, test_x, test_y,
                       x_mean.tolist(), x_std.tolist(), y_mean, y_std, {"source": str(path)})


# --------------------------------------------------------------------------------------------
# Predictions and metrics


@dataclass
class RegressionPredictions:
    """A predictive distribution ``(1/S) sum_s N(sample_means[s], noise_scale**2)`` per input.

    Attributes
    ----------
    sample_means : ndarray of shape ``(num_samples, N)``, float64
        Predicted means in the target's units; ``num_samples`` is 1 for the baseline.
    noise_scale : float
        Standard deviation of the Gaussian noise, in the target's units.
    targets : ndarray of shape ``(N,)``
        True targets, in the target's units.
    seconds : float
        Wall time of the prediction.
    """

    sample_means: np.ndarray
    noise_scale: float
    targets: np.ndarray
    seconds: float = 0.0

    @property
    def mean(self) -> np.ndarray:
        return self.sample_means.mean(0)


def mixture_quantile(sample_means: np.ndarray, noise_scale: float, level: float, iterations: int = 60) -> np.ndarray:
    """Quantile ``level`` of the mixture ``(1/S) sum_s N(sample_means[s], noise_scale**2)`` per input.

    Solved by bisection on the mixture CDF, which is increasing, inside
    ``[min_s mean - 10 sigma, max_s mean + 10 sigma]``; 60 halvings leave an error below
    ``20 sigma / 2**60``.
    """
    from scipy.special import ndtr

    low = sample_means.min(0) - 10 * noise_scale
    high = sample_means.max(0) + 10 * noise_scale
    for _ in range(iterations):
        middle = (low + high) / 2
        below = ndtr((middle - sample_means) / noise_scale).mean(0) < level
        low = np.where(below, middle, low)
        high = np.where(below, high, middle)
    return (low + high) / 2


def regression_metrics(predictions: RegressionPredictions) -> dict[str, float]:
    """RMSE, Gaussian NLL and central 90% interval coverage and width of a predictive mixture.

    .. math::

        \\mathrm{RMSE} = \\sqrt{\\tfrac1N \\sum_n (y_n - \\bar\\mu_n)^2}, \\qquad
        \\mathrm{NLL} = -\\tfrac1N \\sum_n \\log \\tfrac1S \\sum_s
            \\mathcal N(y_n;\\ \\mu_{sn}, \\sigma^2)

    with ``mu_sn`` the mean of sample ``s`` for input ``n`` and ``mu_bar_n`` their average. The
    interval runs from the 5% to the 95% quantile of each input's mixture.
    """
    means, sigma, targets = predictions.sample_means, predictions.noise_scale, predictions.targets
    rmse = float(np.sqrt(np.mean((targets - means.mean(0)) ** 2)))
    log_density = -0.5 * ((targets - means) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    log_mixture = np.logaddexp.reduce(log_density, axis=0) - math.log(len(means))
    lower = mixture_quantile(means, sigma, (1 - INTERVAL) / 2)
    upper = mixture_quantile(means, sigma, (1 + INTERVAL) / 2)
    return {
        "rmse": rmse,
        "nll": float(-log_mixture.mean()),
        "coverage_90": float(np.mean((targets >= lower) & (targets <= upper))),
        "interval_width_90": float(np.mean(upper - lower)),
    }


@torch.no_grad()
def predict_deterministic(model: DeterministicClassifier, inputs: torch.Tensor, targets: torch.Tensor,
                          noise_scale: float, data: TabularData) -> RegressionPredictions:
    """Predict the baseline's ``N(f(x), s**2)``, with the noise scale ``s`` in standardised units."""
    start = time.perf_counter()
    model.eval()
    means = model(inputs).squeeze(-1).double().cpu().numpy()[None]
    return _to_target_units(means, noise_scale, targets, data, start)


def head_means(head_model, samples: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Means of shape ``(num_samples, batch)`` of a one-output Gaussian head for fixed samples."""
    num_samples = next(iter(samples.values())).shape[0]
    predictive = Predictive(head_model, posterior_samples=samples, num_samples=num_samples,
                            parallel=True, return_sites=["mean"])
    return predictive(features)["mean"].reshape(num_samples, len(features))


def noise_scale_of(head) -> float:
    """Return the Gaussian head's noise scale in standardised units: fixed, or the learned param."""
    if head.fixed_noise_scale is not None:
        return head.fixed_noise_scale
    return float(pyro.param(f"{head.name}.noise_scale").detach())


@torch.no_grad()
def predict_bayesian(hybrid: HybridClassifier, guide, inputs: torch.Tensor, targets: torch.Tensor,
                     num_samples: int, data: TabularData, seed: int | None = 0) -> RegressionPredictions:
    """Posterior predictive mixture of the hybrid: S draws of the head, one noise scale."""
    start = time.perf_counter()
    if seed is not None:
        pyro.set_rng_seed(seed)
    hybrid.eval()
    features = hybrid.features(inputs)
    samples = sample_posterior(hybrid.head.model, guide, num_samples, features[:1])
    means = head_means(hybrid.head.model, samples, features).double().cpu().numpy()
    return _to_target_units(means, noise_scale_of(hybrid.head), targets, data, start)


def _to_target_units(means, noise_scale, targets, data: TabularData, start) -> RegressionPredictions:
    return RegressionPredictions(
        sample_means=data.y_mean + data.y_std * means,
        noise_scale=data.y_std * float(noise_scale),
        targets=data.y_mean + data.y_std * targets.double().cpu().numpy(),
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------
# Models and training


def build_models(config: RunConfig, data: TabularData, prior: Prior | Callable | None = None):
    """Build the baseline and the hybrid, each with its own fully connected backbone."""
    from pipelines.runner import build_head, copy_config

    deterministic = DeterministicClassifier(MLPBackbone(data.num_features, config.resolved_widths()), 1)
    head_config = config
    if config.fixed_noise_scale() is not None:
        head_config = copy_config(config, noise_scale=config.fixed_noise_scale() / data.y_std)
    backbone = MLPBackbone(data.num_features, config.resolved_widths())
    hybrid = HybridClassifier(backbone, build_head(head_config, backbone.out_features, 1, prior))
    return deterministic, hybrid


def train_mse(model: torch.nn.Module, loader, *, epochs: int, lr: float, weight_decay: float,
              optimizer: str = "adamw", on_epoch_end=None, progress: bool = True) -> TrainResult:
    """Train ``model`` (inputs to one output) with mean squared error; weight matrices are decayed."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    optimizer, scheduler = make_optimizer(groups, lr, epochs, len(loader), kind=optimizer)

    def step(inputs, targets, epoch, index):
        return torch.nn.functional.mse_loss(model(inputs).squeeze(-1), targets)

    return run_epochs(step, loader, optimizer, scheduler, epochs, "deterministic", on_epoch_end, progress)


@torch.no_grad()
def residual_scale(model: torch.nn.Module, data: TabularData) -> float:
    """Root mean squared error on the validation split (the training split if it is empty)."""
    model.eval()
    inputs, targets = (data.val_x, data.val_y) if len(data.val_y) else (data.train_x, data.train_y)
    device = next(model.parameters()).device
    residuals = model(inputs.to(device)).squeeze(-1) - targets.to(device)
    return float(residuals.square().mean().sqrt().clamp_min(1e-6))


@dataclass
class TrainedRegression:
    deterministic: DeterministicClassifier
    baseline_noise_scale: float
    hybrid: HybridClassifier
    guide: object
    results: dict[str, TrainResult]


def train_regression(config: RunConfig, data: TabularData, device, out: Path | None = None, *,
                     prior=None, guide_factory=None) -> TrainedRegression:
    """Train the MSE baseline, then the hybrid (jointly or in two stages), on standardised data."""
    from pipelines.runner import (
        build_guide,
        fit_laplace,
        optimizer_options,
        save_hybrid,
        svi_options,
    )

    epochs = config.resolved_epochs()
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    seed_everything(config.seed)
    deterministic, hybrid = build_models(config, data, prior)
    deterministic, hybrid = deterministic.to(device), hybrid.to(device)
    loader = FeatureLoader(train_x, train_y, config.batch_size, torch.Generator().manual_seed(config.seed))

    def save_det(epoch, loss):
        if out is not None:
            atomic_torch_save({"model": deterministic.state_dict(), "epoch": epoch}, out / "deterministic.pt")

    det_result = train_mse(deterministic, loader, epochs=epochs, lr=config.resolved_lr(),
                           weight_decay=config.resolved_weight_decay(), optimizer=config.resolved_optimizer(),
                           on_epoch_end=save_det, progress=config.progress)
    baseline_noise = residual_scale(deterministic, data)

    seed_everything(config.seed)
    pyro.clear_param_store()

    def save_hyb(epoch, loss):
        if out is not None:
            save_hybrid(out / "bayesian.pt", hybrid, epoch)

    if config.scheme == "joint":
        guide = build_guide(config, hybrid, hybrid.features(train_x[:2]), train_y[:2], guide_factory=guide_factory)
        loader.generator.manual_seed(config.seed)
        hyb_result = train_hybrid(hybrid, guide, loader, epochs=epochs, **optimizer_options(config),
                                  guide_lr=config.guide_lr, on_epoch_end=save_hyb, **svi_options(config))
    else:
        hybrid.backbone.load_state_dict(deterministic.backbone.state_dict())
        freeze(hybrid.backbone).eval()
        init_loc = {"head.weight": deterministic.head.weight.detach(), "head.bias": deterministic.head.bias.detach()}
        features = hybrid.features(train_x)
        guide = build_guide(config, hybrid, features[:2], train_y[:2], init_loc=init_loc, guide_factory=guide_factory)
        feature_loader = FeatureLoader(features, train_y, config.batch_size, torch.Generator().manual_seed(config.seed))
        hyb_result = train_svi(hybrid.head.model, guide, feature_loader, epochs=config.head_epochs, lr=config.guide_lr,
                               on_epoch_end=save_hyb, description="bayesian head", **svi_options(config))
        hyb_result.seconds += det_result.seconds  # the head needs the trained backbone first

    laplace = fit_laplace(guide, hybrid.head.model, hybrid.features(train_x), train_y)
    if laplace is not guide:
        guide = laplace
        if out is not None:
            save_hybrid(out / "bayesian.pt", hybrid, len(hyb_result.losses) - 1, laplace=guide)
    if out is not None:
        atomic_torch_save({"model": deterministic.state_dict(), "epoch": epochs - 1, "noise_scale": baseline_noise},
                          out / "deterministic.pt")
    return TrainedRegression(deterministic, baseline_noise, hybrid, guide,
                             {"deterministic": det_result, "bayesian": hyb_result})


# --------------------------------------------------------------------------------------------
# Run, report, evaluate


def predict_models(config: RunConfig, trained: TrainedRegression, data: TabularData, device) -> dict:
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    return {
        "deterministic": predict_deterministic(trained.deterministic, test_x, test_y, trained.baseline_noise_scale, data),
        "bayesian": predict_bayesian(trained.hybrid, trained.guide, test_x, test_y, config.num_samples, data,
                                     seed=config.seed),
    }


def metrics_table(predictions: dict[str, RegressionPredictions]) -> dict[str, dict]:
    return {
        name: {**regression_metrics(p), "noise_scale": p.noise_scale, "predict_seconds": p.seconds}
        for name, p in predictions.items()
    }


def run_regression(config: RunConfig, *, prior=None, guide_factory=None) -> dict:
    """Train and evaluate both regression models; write checkpoints, ``report.json`` and ``report.md``."""
    from pipelines.report import versions
    from pipelines.runner import record_components

    device = select_device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_tabular(config.data_dir, subset=config.subset, seed=config.seed, val_fraction=config.val_fraction)
    logger.info("%s: %d train, %d validation, %d test rows, %d input columns, target %r", config.data_dir,
                len(data.train_y), len(data.val_y), len(data.test_y), data.num_features, data.target)
    trained = train_regression(config, data, device, out, prior=prior, guide_factory=guide_factory)
    predictions = predict_models(config, trained, data, device)

    models = metrics_table(predictions)
    for name, result in trained.results.items():
        models[name]["train_seconds"] = result.seconds
        models[name]["train_losses"] = result.losses
    bayesian = models["bayesian"]
    bayesian.update({
        "prior": trained.hybrid.head.prior.describe(), "guide": config.guide, "elbo": config.elbo,
        "num_particles": config.num_particles, "kl_weight": config.kl_weight,
        "kl_warmup_epochs": config.kl_warmup_epochs, "scheme": config.scheme, "num_samples": config.num_samples,
        "noise_learned": config.fixed_noise_scale() is None,
    })
    record_components(bayesian, trained.guide, prior, guide_factory)
    report = {
        "dataset": config.dataset,
        "task": "regression",
        "columns": data.columns,
        "target": data.target,
        "sizes": {"train": len(data.train_y), "val": len(data.val_y), "test": len(data.test_y)},
        "data_source": data.info,
        "config": config.to_dict(),
        "seed": config.seed,
        "device": str(device),
        "versions": versions(),
        "normalization": {"x_mean": data.x_mean, "x_std": data.x_std, "y_mean": data.y_mean, "y_std": data.y_std},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "models": models,
    }
    write_report(out, report)
    return report


def markdown_table(models: dict) -> str:
    """Format the regression metrics as a Markdown table, one row per model."""
    header = "| model | RMSE | NLL | 90% coverage | 90% width | noise scale | train s | predict s |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for name, row in models.items():
        cells = [f"{row[key]:.4f}" for key in REGRESSION_METRICS] + [f"{row['noise_scale']:.4f}"]
        cells += [f"{row.get('train_seconds', float('nan')):.1f}", f"{row['predict_seconds']:.2f}"]
        lines.append(f"| {MODEL_TITLES.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    """Write ``report.json`` and ``report.md`` for a regression run."""
    report["files"] = {"checkpoints": ["deterministic.pt", "bayesian.pt"]}
    atomic_write_json(out / "report.json", report)
    config, sizes, bayesian = report["config"], report["sizes"], report["models"]["bayesian"]
    lines = [
        f"# bayeshead regression run: {report['data_source'].get('source', report['dataset'])}",
        "",
        f"{sizes['train']} training, {sizes['val']} validation and {sizes['test']} test rows, "
        f"{len(report['columns'])} input columns, target {report['target']!r}; {config['epochs']} epochs, "
        f"batch size {config['batch_size']}, seed {report['seed']}, device {report['device']}, {report['created']}.",
        f"Bayesian head: prior {bayesian['prior']}, guide {bayesian['guide_class']}, ELBO {config['elbo']}, "
        f"scheme {config['scheme']}, noise scale {'learned' if bayesian['noise_learned'] else 'fixed'}, "
        f"{config['num_samples']} posterior samples.",
        "RMSE, interval width and noise scale are in the target's units; NLL is in nats per test row. "
        "The baseline's noise scale is its validation RMSE.",
        "",
        markdown_table(report["models"]),
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))


def evaluate_regression(run_dir: Path, stored: dict, config: RunConfig, device, *, prior=None,
                        guide_factory=None) -> dict:
    """Reload a regression run's checkpoints, recompute its test metrics and write ``evaluation.json``."""
    from pipelines.runner import restore_guide

    for name in ("deterministic.pt", "bayesian.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"missing checkpoint {run_dir / name}; train the run again with its original "
                                    f"options and --out {run_dir}")
    data = load_tabular(config.data_dir, subset=config.subset, seed=config.seed, val_fraction=config.val_fraction)
    deterministic, hybrid = build_models(config, data, prior)
    det_state = load_checkpoint(run_dir / "deterministic.pt", map_location=device)
    deterministic.load_state_dict(det_state["model"])

    pyro.clear_param_store()
    hyb_state = load_checkpoint(run_dir / "bayesian.pt", map_location=device)
    hybrid.backbone.load_state_dict(hyb_state["backbone"])
    hybrid.head.load_state_dict(hyb_state["head"])
    deterministic, hybrid = deterministic.to(device), hybrid.to(device).eval()
    example_x, example_y = data.test_x[:2].to(device), data.test_y[:2].to(device)
    guide = restore_guide(config, hybrid, hyb_state, run_dir / "bayesian.pt", hybrid.features(example_x),
                          example_y, guide_factory)
    trained = TrainedRegression(deterministic, float(det_state["noise_scale"]), hybrid, guide, {})

    recomputed = metrics_table(predict_models(config, trained, data, device))
    differences = {
        name: {key: abs(recomputed[name][key] - stored["models"][name][key]) for key in REGRESSION_METRICS}
        for name in recomputed
    }
    atomic_write_json(run_dir / "evaluation.json", {"models": recomputed, "abs_difference": differences})
    return {"stored": stored["models"], "recomputed": recomputed}
