"""The main job as Python functions: build, train, predict, evaluate and report both models.

``run(config)`` is what ``bayeshead run`` calls and ``evaluate(run_dir)`` what
``bayeshead evaluate`` calls, so a notebook gets exactly the CLI's behaviour. From Python,
``run``, ``train_models``, ``build_hybrid``, ``build_guide``, ``load_run`` and ``evaluate``
also take a ``prior`` (a :class:`models.Prior` or a function ``shape -> distribution``) and a
``guide_factory`` (a guide name, or a function ``model -> guide``) in place of the config's.
With ``likelihood="gaussian"``, ``run`` and ``evaluate`` hand over to
:mod:`pipelines.regression`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoLaplaceApproximation

from guides.autoguides import (
    check_meanfield_elbo,
    count_latent_params,
    laplace_from_state,
    laplace_posterior,
    laplace_state,
    make_guide,
)
from models import (
    BayesianLinearHead,
    CNNBackbone,
    DeterministicClassifier,
    HybridClassifier,
    Prior,
    freeze,
)
from pipelines import report as reporting
from pipelines.baselines import fit_temperature
from pipelines.config import ConfigError, RunConfig, RunFolderError
from pipelines.data import BatchIterator, DataBundle, load_dataset
from pipelines.io import atomic_torch_save, load_checkpoint
from pipelines.prediction import Predictions, predict_bayesian, predict_deterministic, sample_logits
from pipelines.training import (
    FeatureLoader,
    TrainingError,
    TrainResult,
    extract_features,
    recompute_batchnorm_statistics,
    seed_everything,
    select_device,
    train_deterministic,
    train_hybrid,
    train_svi,
)

logger = logging.getLogger(__name__)

PREDICT_BATCH_SIZE = 500
# Fewer validation images than this make the fitted temperature noisy. On digits after 3 epochs,
# 40 validation images gave 0.13 where 143 gave 0.89.
MIN_TEMPERATURE_IMAGES = 100

# A guide chosen from Python: a guide name (see guides.GUIDE_NAMES) or a function model -> guide.
GuideFactory = str | Callable


@dataclass
class TrainedModels:
    """Both trained models of a run with what is needed to predict with them.

    After a ``laplace`` guide, ``guide`` is its Laplace posterior (an AutoMultivariateNormal).
    """

    deterministic: DeterministicClassifier
    hybrid: HybridClassifier
    guide: object
    results: dict[str, TrainResult]


def build_backbone(config: RunConfig, in_channels: int) -> CNNBackbone:
    return CNNBackbone(in_channels, config.resolved_widths(), config.convs_per_block)


def build_head(config: RunConfig, in_features: int, out_features: int,
               prior: Prior | Callable | None = None) -> BayesianLinearHead:
    """Build the Bayesian head of a run: ``prior`` when given, else the config's prior and parameters."""
    likelihood = {"likelihood": config.likelihood, "noise_scale": config.fixed_noise_scale()}
    if prior is None:
        return BayesianLinearHead(in_features, out_features, config.prior, **likelihood, **config.prior_params())
    if not isinstance(prior, Prior) and not callable(prior):
        raise TypeError(f"prior must be a models.Prior or a function shape -> distribution, got {type(prior).__name__}")
    return BayesianLinearHead(in_features, out_features, prior, **likelihood)


def build_hybrid(config: RunConfig, in_channels: int, num_classes: int,
                 prior: Prior | Callable | None = None) -> HybridClassifier:
    """Build the CNN backbone with a Bayesian head; ``prior`` replaces the config's prior when given."""
    backbone = build_backbone(config, in_channels)
    return HybridClassifier(backbone, build_head(config, backbone.out_features, num_classes, prior))


def build_guide(config: RunConfig, hybrid: HybridClassifier, example_features: torch.Tensor,
                example_targets: torch.Tensor, init_loc=None, guide_factory: GuideFactory | None = None):
    """Make the guide over the head's sites and create its parameters with one call.

    The example targets are observed during that call, so ``obs`` enters the guide's trace as data.

    Parameters
    ----------
    guide_factory : str, callable or None
        ``None`` uses ``config.guide``; a guide name replaces it; a function ``model -> guide``
        builds the guide itself (``init_loc``, ``init_scale`` and ``guide_rank`` are then up to
        that function).

    Raises
    ------
    ConfigError
        For an unknown guide name, ``multivariate`` or ``laplace`` on a head above
        ``MAX_MULTIVARIATE_PARAMS`` parameters, or ``--elbo meanfield`` with a guide whose
        constrained sites would lose their log-Jacobian (see :func:`guides.check_meanfield_elbo`).
    """
    model = hybrid.head.model
    # NOTE: without init_loc the guide starts at the median of prior draws (weights of std about
    # 0.3 under N(0, 1)), larger than nn.Linear's start; very short SGD runs can overshoot from there.
    if callable(guide_factory):
        guide = guide_factory(model)
    else:
        num_params = count_latent_params(model, example_features, example_targets)
        try:
            guide = make_guide(
                model, guide_factory or config.guide, init_scale=config.init_scale, init_loc=init_loc,
                rank=config.guide_rank, num_params=num_params,
            )
        except ValueError as error:  # an unknown name, or a head too large for a full covariance
            raise ConfigError(str(error)) from None
    guide(example_features, example_targets)
    if config.elbo == "meanfield":
        try:
            check_meanfield_elbo(guide, example_features, example_targets)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return guide


def fit_laplace(guide, head_model, features: torch.Tensor, targets: torch.Tensor):
    """After training, replace a Laplace guide's MAP point by its Laplace posterior.

    ``features`` and ``targets`` are the whole training set, so the Hessian weighs each data
    point once. Any other guide is returned unchanged.

    Raises
    ------
    TrainingError
        When the Hessian at the MAP is not positive definite.
    """
    if not isinstance(guide, AutoLaplaceApproximation):
        return guide
    logger.info("Laplace approximation: Hessian over %d parameters on %d training points",
                guide.latent_dim, len(targets))
    try:
        return laplace_posterior(guide, features, targets, len(targets))
    except ValueError as error:
        raise TrainingError(f"{error}; the checkpoint keeps the MAP point") from None


def make_loaders(config: RunConfig, data: DataBundle, device: torch.device) -> dict[str, BatchIterator]:
    generator = torch.Generator().manual_seed(config.seed)
    common = {"mean": data.mean, "std": data.std, "device": device}
    return {
        "train": BatchIterator(data.train, config.batch_size, shuffle=True, augment=data.augment,
                               generator=generator, **common),
        "train_plain": BatchIterator(data.train, PREDICT_BATCH_SIZE, **common),
        "val": BatchIterator(data.val, PREDICT_BATCH_SIZE, **common),
        "test": BatchIterator(data.test, PREDICT_BATCH_SIZE, **common),
    }


def guide_param_state() -> dict[str, torch.Tensor]:
    """Unconstrained values of every param in the store except the backbone's.

    Unconstrained, so :func:`load_param_values` restores them bit for bit (a positive scale
    saved as its value would come back through ``softplus`` inverted and rounded).
    """
    store = pyro.get_param_store()
    return {
        name: value.detach().cpu().clone()
        for name, value in store.named_parameters()
        if not name.startswith("backbone.")
    }


def load_param_values(values: dict[str, torch.Tensor], device) -> None:
    """Copy saved unconstrained param values (from :func:`guide_param_state`) into the store.

    Every param must exist already: run the guide and the model once first. The copy is in
    place, because a guide that keeps a plain ``nn.Parameter`` (the ``loc`` of the
    AutoContinuous guides: diagonal, lowrank, multivariate, laplace) keeps using its own tensor
    and never rereads the store, so replacing the store's entry would leave it untouched.

    Raises
    ------
    ValueError
        For a saved param that this model and guide do not create, or one of another shape.
    """
    existing = dict(pyro.get_param_store().named_parameters())
    for name, value in values.items():
        if name not in existing:
            raise ValueError(
                f"the checkpoint contains param {name!r}, which this model and guide do not create "
                f"(they create {', '.join(sorted(existing))}); it belongs to another configuration"
            )
        if existing[name].shape != value.shape:
            raise ValueError(
                f"the checkpoint's param {name!r} has shape {tuple(value.shape)}, but this model "
                f"needs {tuple(existing[name].shape)}; it belongs to another configuration"
            )
        with torch.no_grad():
            existing[name].copy_(value.to(device))


def save_deterministic(path: Path, model: DeterministicClassifier, epoch: int) -> None:
    atomic_torch_save({"model": model.state_dict(), "epoch": epoch}, path)


def save_hybrid(path: Path, hybrid: HybridClassifier, epoch: int, laplace=None) -> None:
    """Save the backbone, the head's buffers, the guide's params, the temperature and any Laplace posterior."""
    state = {"backbone": hybrid.backbone.state_dict(), "head": hybrid.head.state_dict(),
             "params": guide_param_state(), "epoch": epoch, "temperature": float(hybrid.temperature)}
    if laplace is not None:
        state["laplace"] = laplace_state(laplace)
    atomic_torch_save(state, path)


def optimizer_options(config: RunConfig) -> dict:
    """Resolve the backbone's optimizer, peak learning rate and weight decay from the config."""
    return {"optimizer": config.resolved_optimizer(), "lr": config.resolved_lr(),
            "weight_decay": config.resolved_weight_decay()}


def svi_options(config: RunConfig) -> dict:
    """Keyword arguments of :func:`pipelines.training.train_svi` taken from the config."""
    return {"elbo": config.elbo, "num_particles": config.num_particles, "kl_weight": config.kl_weight,
            "kl_warmup_epochs": config.kl_warmup_epochs, "progress": config.progress}


def fit_head_two_stage(config: RunConfig, hybrid: HybridClassifier, deterministic: DeterministicClassifier,
                       plain_loader, *, on_epoch_end=None, guide_factory: GuideFactory | None = None):
    """Fit the hybrid's head by SVI on the trained CNN's frozen features (the two-stage scheme).

    Copies and freezes the CNN's backbone into ``hybrid``, caches its features of
    ``plain_loader`` (the training set, unshuffled and unaugmented) and starts the guide at the
    CNN's last layer. The Laplace step, if any, is left to the caller (:func:`fit_laplace`).

    Returns
    -------
    guide, TrainResult, features, labels
        The trained guide, the head's SVI losses and time, and the cached training features
        ``(N, in_features)`` with their labels ``(N,)``.
    """
    hybrid.backbone.load_state_dict(deterministic.backbone.state_dict())
    freeze(hybrid.backbone).eval()
    features, labels = extract_features(hybrid.backbone, plain_loader)
    init_loc = {"head.weight": deterministic.head.weight.detach(), "head.bias": deterministic.head.bias.detach()}
    guide = build_guide(config, hybrid, features[:2], labels[:2], init_loc=init_loc, guide_factory=guide_factory)
    feature_loader = FeatureLoader(features, labels, config.batch_size, torch.Generator().manual_seed(config.seed))
    result = train_svi(hybrid.head.model, guide, feature_loader, epochs=config.head_epochs, lr=config.guide_lr,
                       on_epoch_end=on_epoch_end, description="bayesian head", **svi_options(config))
    return guide, result, features, labels


def fit_head_temperature(config: RunConfig, hybrid: HybridClassifier, guide, loader) -> float | None:
    """Fit the temperature that divides every posterior draw's logits, on held-out images.

    The head's posterior is fitted to training features that the backbone has learnt to
    separate, so its predictive is as overconfident on new images as the CNN's. One scalar
    ``T``, chosen to maximise the Monte-Carlo predictive likelihood of ``loader`` (the
    validation split) with the same S draws that prediction uses, divides each draw's logits:
    ``p(y|x) = mean_s softmax(z_s / T)``. The predicted class changes only for inputs whose
    draws disagree. On CIFAR-10 (the study in ``docs/results.md``, seed 0) it brought the joint
    head's ECE from 0.032 to 0.008.

    Sets ``hybrid.temperature`` and returns it; returns ``None`` and leaves the hybrid as it was
    with ``config.temperature == "none"``, a Gaussian likelihood or an empty ``loader``.
    """
    if config.temperature == "none" or config.likelihood != "categorical":
        return None
    if getattr(loader, "num_data", None) == 0:
        logger.warning("the validation split is empty, so no temperature is fitted; the Bayesian head predicts "
                       "as trained (use more images or a larger --val-fraction)")
        return None
    logits, labels = sample_logits(hybrid, guide, loader, config.num_samples, seed=config.seed,
                                   local_reparameterization=config.local_reparameterization)
    hybrid.temperature = fit_temperature(logits, labels)
    logger.info("temperature of the Bayesian head, fitted on %d validation images: %.4f", len(labels),
                hybrid.temperature)
    if len(labels) < MIN_TEMPERATURE_IMAGES:
        logger.warning("the temperature %.4f was fitted on only %d validation images and can be far off; use more "
                       "images, a larger --val-fraction, or --temperature none", hybrid.temperature, len(labels))
    return hybrid.temperature


# Below this many optimizer steps a run without --recompute-bn-stats gets a warning: on digits,
# 11 steps left the CNN at chance in eval mode and 33 steps at 0.947 against 0.972 recomputed.
FEW_STEPS = 100


def _recompute_statistics(backbone, loader, name: str) -> float:
    """Recompute ``backbone``'s batch-norm statistics on ``loader``; return the seconds it took."""
    start = time.perf_counter()
    count = recompute_batchnorm_statistics(backbone, loader)
    logger.info("%s: recomputed the statistics of %d batch-norm layers on %d training images", name, count,
                loader.num_data)
    return time.perf_counter() - start


def train_models(config: RunConfig, data: DataBundle, loaders, device, out: Path | None = None, *,
                 prior: Prior | Callable | None = None,
                 guide_factory: GuideFactory | None = None) -> TrainedModels:
    """Train the deterministic model, then the hybrid (jointly or in two stages).

    ``prior`` and ``guide_factory`` replace the config's prior and guide (see
    :func:`build_head` and :func:`build_guide`). A Laplace guide is turned into its Laplace
    posterior on the training set after SVI; the time it takes counts as training time.
    """
    epochs = config.resolved_epochs()
    seed_everything(config.seed)
    deterministic = DeterministicClassifier(build_backbone(config, data.in_channels), data.num_classes).to(device)

    def save_det(epoch, loss):
        if out is not None:
            save_deterministic(out / "deterministic.pt", deterministic, epoch)

    det_result = train_deterministic(deterministic, loaders["train"], epochs=epochs, **optimizer_options(config),
                                     on_epoch_end=save_det, progress=config.progress)
    if config.recompute_bn_stats:
        det_result.seconds += _recompute_statistics(deterministic.backbone, loaders["train_plain"], "CNN")
        save_det(epochs - 1, None)
    elif epochs * len(loaders["train"]) < FEW_STEPS:
        logger.warning("the CNN took only %d optimizer steps, so batch norm's running statistics may not have "
                       "settled and its predictions can be near chance; add --recompute-bn-stats or train longer",
                       epochs * len(loaders["train"]))

    seed_everything(config.seed)
    pyro.clear_param_store()
    loaders["train"].generator.manual_seed(config.seed)
    hybrid = build_hybrid(config, data.in_channels, data.num_classes, prior).to(device)

    def save_hyb(epoch, loss):
        if out is not None:
            save_hybrid(out / "bayesian.pt", hybrid, epoch)

    if config.scheme == "joint":
        images, targets = next(iter(loaders["test"]))
        guide = build_guide(config, hybrid, hybrid.features(images[:2]), targets[:2],
                            guide_factory=guide_factory)
        hyb_result = train_hybrid(hybrid, guide, loaders["train"], epochs=epochs, **optimizer_options(config),
                                  guide_lr=config.guide_lr, on_epoch_end=save_hyb, **svi_options(config))
        if config.recompute_bn_stats:
            hyb_result.seconds += _recompute_statistics(hybrid.backbone, loaders["train_plain"], "hybrid")
            save_hyb(epochs - 1, None)
        features, labels = None, None
    else:
        guide, hyb_result, features, labels = fit_head_two_stage(
            config, hybrid, deterministic, loaders["train_plain"], on_epoch_end=save_hyb, guide_factory=guide_factory)
        hyb_result.seconds += det_result.seconds  # the head needs the trained backbone first

    laplace = None
    if isinstance(guide, AutoLaplaceApproximation):
        start = time.perf_counter()
        if features is None:
            features, labels = extract_features(hybrid.backbone, loaders["train_plain"])
        guide = laplace = fit_laplace(guide, hybrid.head.model, features, labels)
        hyb_result.seconds += time.perf_counter() - start
        if out is not None:
            save_hybrid(out / "bayesian.pt", hybrid, len(hyb_result.losses) - 1, laplace=guide)

    start = time.perf_counter()
    if fit_head_temperature(config, hybrid, guide, loaders["val"]) is not None:
        hyb_result.seconds += time.perf_counter() - start
        if out is not None:
            save_hybrid(out / "bayesian.pt", hybrid, len(hyb_result.losses) - 1, laplace=laplace)
    return TrainedModels(deterministic, hybrid, guide, {"deterministic": det_result, "bayesian": hyb_result})


def predict_both(config: RunConfig, models: TrainedModels, loader) -> dict[str, Predictions]:
    """Predict ``loader``'s images with both models (the Bayesian one with S posterior samples)."""
    logger.info("predicting %d images with both models (%d posterior samples)", loader.num_data, config.num_samples)
    return {
        "deterministic": predict_deterministic(models.deterministic, loader),
        "bayesian": predict_bayesian(models.hybrid, models.guide, loader, config.num_samples, seed=config.seed,
                                     local_reparameterization=config.local_reparameterization),
    }


def run(config: RunConfig, *, prior: Prior | Callable | None = None,
        guide_factory: GuideFactory | None = None) -> dict:
    """Train and evaluate both models; write checkpoints, ``report.json`` and ``report.md``.

    Parameters
    ----------
    config : RunConfig
        Every option of the run.
    prior : Prior, callable or None
        Replaces ``config.prior`` (a :class:`models.Prior`, or a function ``shape ->
        distribution`` wrapped as :class:`models.CallablePrior`).
    guide_factory : str, callable or None
        Replaces ``config.guide``: a guide name, or a function ``model -> guide``.

    Returns
    -------
    dict
        The report also written to ``report.json``. Its ``models["bayesian"]`` entry records
        the prior's ``describe()``, the guide's class name (``guide_class``) and whether the
        prior or guide came from Python (``custom_prior``, ``custom_guide``).
    """
    if isinstance(guide_factory, str):
        config = copy_config(config, guide=guide_factory)
        guide_factory = None
    config.validate()
    if config.likelihood == "gaussian":
        from pipelines.regression import run_regression

        return run_regression(config, prior=prior, guide_factory=guide_factory)
    device = select_device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_config_data(config, download=config.download, progress=config.progress)
    logger.info("%s: %d train, %d validation, %d test images, %d classes", data.name, len(data.train),
                len(data.val), len(data.test), data.num_classes)
    loaders = make_loaders(config, data, device)
    models = train_models(config, data, loaders, device, out, prior=prior, guide_factory=guide_factory)
    predictions = predict_both(config, models, loaders["test"])
    report = reporting.build_report(config, data, device, predictions,
                                    {k: r for k, r in models.results.items()}, models.hybrid, models.guide)
    record_components(report["models"]["bayesian"], models.guide, prior, guide_factory)
    if data.name == "brain-mri":
        from pipelines.clinical import write_clinical_outputs

        report["clinical"] = write_clinical_outputs(out, config, data, models, loaders, predictions)
    reporting.write_report(out, report, predictions, data.classes)
    return report


def record_components(entry: dict, guide, prior, guide_factory) -> None:
    """Add the guide's class and where the prior and guide came from to a report entry."""
    entry["guide_class"] = type(guide).__name__
    entry["custom_prior"] = prior is not None
    entry["custom_guide"] = guide_factory is not None


def check_components(stored_entry: dict, prior, guide_factory) -> None:
    """Require the Python prior and guide factory that a run was trained with, to rebuild it."""
    if stored_entry.get("custom_prior") and prior is None:
        raise ConfigError(
            f"this run was trained with a prior passed from Python ({stored_entry.get('prior')}); "
            "pass the same prior to evaluate(..., prior=...) to rebuild it"
        )
    if stored_entry.get("custom_guide") and guide_factory is None:
        raise ConfigError(
            f"this run was trained with a guide factory from Python ({stored_entry.get('guide_class')}); "
            "pass the same guide_factory to evaluate(..., guide_factory=...) to rebuild it"
        )


def restore_guide(config: RunConfig, hybrid: HybridClassifier, state: dict, checkpoint: Path,
                  example_features: torch.Tensor, example_targets: torch.Tensor,
                  guide_factory: GuideFactory | None = None):
    """Rebuild a trained guide from a checkpoint's params (and its Laplace posterior, if any)."""
    # Autoguides and the head's learned noise scale create their parameters lazily: run the
    # guide and the model once, then overwrite them.
    guide = build_guide(config, hybrid, example_features, example_targets, guide_factory=guide_factory)
    poutine.trace(hybrid.head.model).get_trace(example_features, example_targets)
    try:
        load_param_values(state["params"], example_features.device)
    except ValueError as error:
        raise ConfigError(f"{checkpoint}: {error}") from None
    if not isinstance(guide, AutoLaplaceApproximation):
        return guide
    if "laplace" not in state:
        raise TrainingError(
            f"{checkpoint} contains the Laplace guide's MAP point but no Laplace posterior: the run "
            "stopped before the Laplace step; run it again"
        )
    return laplace_from_state(hybrid.head.model, state["laplace"], example_features, example_targets)


def load_run(run_dir: Path, config: RunConfig, data: DataBundle, device, *,
             prior: Prior | Callable | None = None,
             guide_factory: GuideFactory | None = None) -> TrainedModels:
    """Rebuild both models of a finished run from its checkpoints.

    A run trained with a Python ``prior`` or ``guide_factory`` needs the same ones here.
    """
    check_checkpoints(run_dir)
    det_state = load_checkpoint(run_dir / "deterministic.pt", map_location=device)
    deterministic = DeterministicClassifier(build_backbone(config, data.in_channels), data.num_classes).to(device)
    deterministic.load_state_dict(det_state["model"])

    pyro.clear_param_store()
    hyb_state = load_checkpoint(run_dir / "bayesian.pt", map_location=device)
    hybrid = build_hybrid(config, data.in_channels, data.num_classes, prior).to(device)
    hybrid.backbone.load_state_dict(hyb_state["backbone"])
    hybrid.head.load_state_dict(hyb_state["head"])
    hybrid.temperature = float(hyb_state.get("temperature", 1.0))
    hybrid.eval()
    example = hybrid.features(data.test.images[:2].to(device).float())
    guide = restore_guide(config, hybrid, hyb_state, run_dir / "bayesian.pt", example,
                          data.test.labels[:2].to(device), guide_factory)
    if config.scheme == "two-stage":
        freeze(hybrid.backbone)
    return TrainedModels(deterministic, hybrid, guide, {})


def load_config_data(config: RunConfig, *, download: bool = False, progress: bool = False) -> DataBundle:
    """Load the data set a config names, with its subset, split, image size and leakage options."""
    return load_dataset(config.dataset, config.data_dir, subset=config.subset, seed=config.seed,
                        val_fraction=config.val_fraction, image_size=config.image_size, download=download,
                        drop_leaked=config.drop_leaked, progress=progress)


def stored_config(report: dict, data_dir: str | None = None, device: str | None = None) -> RunConfig:
    """Rebuild and validate a finished run's config from its ``report.json``, with optional new data folder and device."""
    try:
        config = RunConfig.from_report(report["config"])
        if data_dir is not None:
            config.data_dir = data_dir
        if device is not None:
            config.device = device
        config.progress = False
        return config.validate()
    except (TypeError, ValueError) as error:  # a hand-edited report, e.g. widths that are not integers
        raise RunFolderError(f"the run's report.json has an invalid config: {error}") from None


def read_run_report(run_dir: str | Path) -> dict:
    """Read ``report.json`` of a finished run.

    Raises
    ------
    FileNotFoundError
        When the folder or its ``report.json`` is missing.
    RunFolderError
        When ``report.json`` is not valid JSON or is missing the ``config``, ``normalization`` or
        ``models.bayesian`` entries that every report of ``bayeshead run`` has.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is a file, not a run folder: expected the output folder of 'bayeshead run'")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} not found: expected the output folder of 'bayeshead run'")
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"no report.json in {run_dir}: expected the output folder of 'bayeshead run'")
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{report_path} is not valid JSON ({error}); train the run again with its original "
                             f"options and --out {run_dir}") from None
    if not isinstance(report, dict):
        raise RunFolderError(f"{report_path} contains a JSON {type(report).__name__}, not the object that "
                             "'bayeshead run' writes")
    missing = [key for key in ("config", "normalization", "models") if key not in report]
    if missing:
        raise RunFolderError(f"{report_path} is missing {', '.join(missing)}: expected a report of 'bayeshead run'")
    for key in ("config", "normalization", "models"):
        if not isinstance(report[key], dict):
            raise RunFolderError(f"{report_path}: {key} is not a JSON object: expected a report of 'bayeshead run'")
    if not isinstance(report["models"].get("bayesian"), dict):
        raise RunFolderError(f"{report_path} is missing models.bayesian: expected a report of 'bayeshead run'")
    return report


def check_checkpoints(run_dir: str | Path) -> None:
    """Raise FileNotFoundError, naming the file, when a run lacks either model's checkpoint."""
    for name in ("deterministic.pt", "bayesian.pt"):
        if not (Path(run_dir) / name).is_file():
            raise FileNotFoundError(f"missing checkpoint {Path(run_dir) / name}; train the run again with its "
                                    f"original options and --out {run_dir}")


@dataclass
class ReloadedRun:
    """A finished classification run rebuilt from its folder, ready to predict."""

    config: RunConfig
    data: DataBundle
    device: torch.device
    loaders: dict[str, BatchIterator]
    models: TrainedModels


def reload_run(run_dir: str | Path, report: dict, config: RunConfig, *, prior: Prior | Callable | None = None,
               guide_factory: GuideFactory | None = None) -> ReloadedRun:
    """Load a classification run's data, normalised as in training, with its models and loaders.

    ``report`` is the run's ``report.json`` and ``config`` the config rebuilt from it (see
    :func:`stored_config`). A run trained with a Python ``prior`` or ``guide_factory`` needs
    the same ones here.

    Raises
    ------
    FileNotFoundError
        When either model's checkpoint is missing, checked before the data are loaded.
    """
    check_checkpoints(run_dir)
    torch_device = select_device(config.device)
    data = load_config_data(config)
    data.mean, data.std = report["normalization"]["mean"], report["normalization"]["std"]
    loaders = make_loaders(config, data, torch_device)
    models = load_run(Path(run_dir), config, data, torch_device, prior=prior, guide_factory=guide_factory)
    return ReloadedRun(config, data, torch_device, loaders, models)


def evaluate(run_dir: str | Path, data_dir: str | None = None, device: str | None = None, *,
             prior: Prior | Callable | None = None, guide_factory: GuideFactory | None = None) -> dict:
    """Reload a run's checkpoints, recompute the test metrics and write ``evaluation.json``.

    A run trained with a Python ``prior`` or ``guide_factory`` needs the same ones here.
    """
    run_dir = Path(run_dir)
    stored = read_run_report(run_dir)
    config = stored_config(stored, data_dir, device)
    check_components(stored["models"]["bayesian"], prior, guide_factory)
    if config.likelihood == "gaussian":
        from pipelines.regression import evaluate_regression

        return evaluate_regression(run_dir, stored, config, select_device(config.device), prior=prior,
                                   guide_factory=guide_factory)
    reloaded = reload_run(run_dir, stored, config, prior=prior, guide_factory=guide_factory)
    predictions = predict_both(config, reloaded.models, reloaded.loaders["test"])
    evaluation = reporting.metrics_table(predictions)
    reporting.write_evaluation(run_dir, stored, evaluation)
    return {"stored": stored["models"], "recomputed": evaluation}


def copy_config(config: RunConfig, **changes) -> RunConfig:
    new = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(new, key, value)
    return new
