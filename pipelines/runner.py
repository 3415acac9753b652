"""The main job as Python functions: build, train, predict, evaluate and report both models.

``run(config)`` is what ``bayeshead run`` calls and ``evaluate(run_dir)`` what
``bayeshead evaluate`` calls, so a notebook gets exactly the CLI's behaviour.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from guides.autoguides import count_latent_params, make_guide
from models import (
    BayesianLinearHead,
    CNNBackbone,
    DeterministicClassifier,
    HybridClassifier,
    freeze,
)
from pipelines import report as reporting
from pipelines.config import RunConfig
from pipelines.data import BatchIterator, DataBundle, load_dataset
from pipelines.io import atomic_torch_save
from pipelines.prediction import Predictions, predict_bayesian, predict_deterministic
from pipelines.training import (
    FeatureLoader,
    TrainResult,
    extract_features,
    seed_everything,
    select_device,
    train_deterministic,
    train_hybrid,
    train_svi,
)

logger = logging.getLogger(__name__)

PREDICT_BATCH_SIZE = 500


@dataclass
class TrainedModels:
    """Both trained models of a run with what is needed to predict with them."""

    deterministic: DeterministicClassifier
    hybrid: HybridClassifier
    guide: object
    results: dict[str, TrainResult]


def build_backbone(config: RunConfig, in_channels: int) -> CNNBackbone:
    return CNNBackbone(in_channels, config.widths, config.convs_per_block)


def build_hybrid(config: RunConfig, in_channels: int, num_classes: int) -> HybridClassifier:
    backbone = build_backbone(config, in_channels)
    head = BayesianLinearHead(backbone.out_features, num_classes, config.prior, **config.prior_params())
    return HybridClassifier(backbone, head)


def build_guide(config: RunConfig, hybrid: HybridClassifier, example_features: torch.Tensor,
                example_targets: torch.Tensor, init_loc=None):
    """Make the guide over the head's sites and create its parameters with one call.

    The example targets are observed during that call, so the guide sees ``obs`` as data.
    """
    num_params = count_latent_params(hybrid.head.model, example_features, example_targets)
    guide = make_guide(
        hybrid.head.model, config.guide, init_scale=config.init_scale, init_loc=init_loc,
        rank=config.guide_rank, num_params=num_params,
    )
    guide(example_features, example_targets)
    return guide


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
    """Constrained values of every param in the store except the backbone's."""
    store = pyro.get_param_store()
    return {name: store[name].detach().cpu().clone() for name in store.keys() if not name.startswith("backbone.")}


def save_deterministic(path: Path, model: DeterministicClassifier, epoch: int) -> None:
    atomic_torch_save({"model": model.state_dict(), "epoch": epoch}, path)


def save_hybrid(path: Path, hybrid: HybridClassifier, epoch: int) -> None:
    state = {"backbone": hybrid.backbone.state_dict(), "head": hybrid.head.state_dict(),
             "params": guide_param_state(), "epoch": epoch}
    atomic_torch_save(state, path)


def train_models(config: RunConfig, data: DataBundle, loaders, device, out: Path | None = None) -> TrainedModels:
    """Train the deterministic model, then the hybrid (jointly or in two stages)."""
    epochs = config.resolved_epochs()
    seed_everything(config.seed)
    deterministic = DeterministicClassifier(build_backbone(config, data.in_channels), data.num_classes).to(device)

    def save_det(epoch, loss):
        if out is not None:
            save_deterministic(out / "deterministic.pt", deterministic, epoch)

    det_result = train_deterministic(deterministic, loaders["train"], epochs=epochs, lr=config.lr,
                                     weight_decay=config.weight_decay, on_epoch_end=save_det,
                                     progress=config.progress)

    seed_everything(config.seed)
    pyro.clear_param_store()
    loaders["train"].generator.manual_seed(config.seed)
    hybrid = build_hybrid(config, data.in_channels, data.num_classes).to(device)
    svi_options = {"elbo": config.elbo, "num_particles": config.num_particles, "kl_weight": config.kl_weight,
                   "kl_warmup_epochs": config.kl_warmup_epochs, "progress": config.progress}

    def save_hyb(epoch, loss):
        if out is not None:
            save_hybrid(out / "bayesian.pt", hybrid, epoch)

    if config.scheme == "joint":
        images, targets = next(iter(loaders["test"]))
        guide = build_guide(config, hybrid, hybrid.features(images[:2]), targets[:2])
        hyb_result = train_hybrid(hybrid, guide, loaders["train"], epochs=epochs, lr=config.lr,
                                  weight_decay=config.weight_decay, on_epoch_end=save_hyb, **svi_options)
    else:
        hybrid.backbone.load_state_dict(deterministic.backbone.state_dict())
        freeze(hybrid.backbone).eval()
        features, labels = extract_features(hybrid.backbone, loaders["train_plain"])
        init_loc = {"head.weight": deterministic.head.weight.detach(), "head.bias": deterministic.head.bias.detach()}
        guide = build_guide(config, hybrid, features[:2], labels[:2], init_loc=init_loc)
        feature_loader = FeatureLoader(features, labels, config.batch_size,
                                       torch.Generator().manual_seed(config.seed))
        hyb_result = train_svi(hybrid.head.model, guide, feature_loader, epochs=config.head_epochs,
                               lr=config.lr, on_epoch_end=save_hyb, description="bayesian head", **svi_options)
        hyb_result.seconds += det_result.seconds  # the head needs the trained backbone first
    return TrainedModels(deterministic, hybrid, guide, {"deterministic": det_result, "bayesian": hyb_result})


def predict_both(config: RunConfig, models: TrainedModels, loader) -> dict[str, Predictions]:
    return {
        "deterministic": predict_deterministic(models.deterministic, loader),
        "bayesian": predict_bayesian(models.hybrid, models.guide, loader, config.num_samples, seed=config.seed),
    }


def run(config: RunConfig) -> dict:
    """Train and evaluate both models; write checkpoints, ``report.json`` and ``report.md``."""
    config.validate()
    device = select_device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(config.dataset, config.data_dir, subset=config.subset, seed=config.seed,
                        val_fraction=config.val_fraction, image_size=config.image_size,
                        download=config.download, progress=config.progress)
    logger.info("%s: %d train, %d validation, %d test images, %d classes", data.name, len(data.train),
                len(data.val), len(data.test), data.num_classes)
    loaders = make_loaders(config, data, device)
    models = train_models(config, data, loaders, device, out)
    predictions = predict_both(config, models, loaders["test"])
    report = reporting.build_report(config, data, device, predictions,
                                    {k: r for k, r in models.results.items()}, models.hybrid, models.guide)
    if data.name == "brain-mri":
        from pipelines.clinical import write_clinical_outputs

        report["clinical"] = write_clinical_outputs(out, config, data, models, loaders, predictions)
    reporting.write_report(out, report, predictions, data.classes)
    return report


def load_run(run_dir: Path, config: RunConfig, data: DataBundle, device) -> TrainedModels:
    """Rebuild both models of a finished run from its checkpoints."""
    for name in ("deterministic.pt", "bayesian.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"missing checkpoint {run_dir / name}; run 'bayeshead run --out {run_dir}' first")
    det_state = torch.load(run_dir / "deterministic.pt", map_location=device, weights_only=True)
    deterministic = DeterministicClassifier(build_backbone(config, data.in_channels), data.num_classes).to(device)
    deterministic.load_state_dict(det_state["model"])

    pyro.clear_param_store()
    hyb_state = torch.load(run_dir / "bayesian.pt", map_location=device, weights_only=True)
    hybrid = build_hybrid(config, data.in_channels, data.num_classes).to(device)
    hybrid.backbone.load_state_dict(hyb_state["backbone"])
    hybrid.head.load_state_dict(hyb_state["head"])
    hybrid.eval()
    example = hybrid.features(data.test.images[:2].to(device).float())
    # Autoguides create their parameters lazily: run the guide once, then overwrite them.
    guide = build_guide(config, hybrid, example, data.test.labels[:2].to(device))
    store = pyro.get_param_store()
    for name, value in hyb_state["params"].items():
        store[name] = value.to(device)
    if config.scheme == "two-stage":
        freeze(hybrid.backbone)
    return TrainedModels(deterministic, hybrid, guide, {})


def evaluate(run_dir: str | Path, data_dir: str | None = None, device: str | None = None) -> dict:
    """Reload a run's checkpoints, recompute the test metrics and write ``evaluation.json``."""
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"no report.json in {run_dir}: expected the output folder of 'bayeshead run'")
    stored = json.loads(report_path.read_text())
    config = RunConfig.from_dict({k: v for k, v in stored["config"].items()})
    if data_dir is not None:
        config.data_dir = data_dir
    if device is not None:
        config.device = device
    config.progress = False
    config.validate()
    torch_device = select_device(config.device)
    data = load_dataset(config.dataset, config.data_dir, subset=config.subset, seed=config.seed,
                        val_fraction=config.val_fraction, image_size=config.image_size)
    data.mean, data.std = stored["normalization"]["mean"], stored["normalization"]["std"]
    loaders = make_loaders(config, data, torch_device)
    models = load_run(run_dir, config, data, torch_device)
    predictions = predict_both(config, models, loaders["test"])
    evaluation = reporting.metrics_table(predictions)
    reporting.write_evaluation(run_dir, stored, evaluation)
    return {"stored": stored["models"], "recomputed": evaluation}


def copy_config(config: RunConfig, **changes) -> RunConfig:
    new = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(new, key, value)
    return new
