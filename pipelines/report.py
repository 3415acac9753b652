"""Run reports: ``report.json`` (machine-readable), ``report.md`` and reliability diagrams."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import numpy as np

from pipelines import calibration
from pipelines.io import atomic_save_figure, atomic_write_json, atomic_write_text

METRICS = ("accuracy", "ece", "mce", "nll", "brier")
MODEL_TITLES = {"deterministic": "CNN (cross-entropy)", "bayesian": "CNN + Bayesian head (SVI)"}


def versions() -> dict[str, str]:
    """Installed versions of Python and the packages that shape the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "pyro-ppl", "arviz", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def model_metrics(predictions) -> dict[str, float]:
    """Accuracy, ECE, MCE (15 equal-width bins), NLL and Brier score of one model's predictions.

    NLL is taken from the stably computed log-probabilities, so a true-class probability that
    underflows to 0 in float64 does not turn it into infinity.
    """
    summary = calibration.calibration_summary(predictions.probs, predictions.labels, n_bins=15)
    true_log_probs = predictions.log_probs[np.arange(len(predictions.labels)), predictions.labels]
    summary["nll"] = float(-true_log_probs.mean())
    return {key: float(summary[key]) for key in METRICS}


def metrics_table(predictions: dict) -> dict[str, dict]:
    return {name: {**model_metrics(p), "predict_seconds": p.seconds} for name, p in predictions.items()}


def build_report(config, data, device, predictions: dict, results: dict, hybrid=None, guide=None) -> dict:
    """Assemble the report dict: dataset, config, seed, versions and per-model metrics."""
    models = metrics_table(predictions)
    for name, result in results.items():
        models[name]["train_seconds"] = result.seconds
        models[name]["train_losses"] = result.losses
    if hybrid is not None:
        models["bayesian"].update({
            "prior": hybrid.head.prior.describe(),
            "guide": config.guide,
            "elbo": config.elbo,
            "num_particles": config.num_particles,
            "kl_weight": config.kl_weight,
            "kl_warmup_epochs": config.kl_warmup_epochs,
            "scheme": config.scheme,
            "num_samples": config.num_samples,
            "temperature": float(getattr(hybrid, "temperature", 1.0)),
        })
    return {
        "dataset": data.name,
        "classes": list(data.classes),
        "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "data_source": data.info,
        "config": config.to_dict(),
        "seed": config.seed,
        "device": str(device),
        "versions": versions(),
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "models": models,
    }


def markdown_table(models: dict) -> str:
    header = "| model | accuracy | ECE | MCE | NLL | Brier | train s | predict s |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for name, row in models.items():
        title = MODEL_TITLES.get(name, name)
        cells = [f"{row[key]:.4f}" for key in METRICS]
        train_seconds = row.get("train_seconds")
        cells += ["-" if train_seconds is None else f"{train_seconds:.1f}", f"{row['predict_seconds']:.2f}"]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_diagrams(out: Path, predictions: dict) -> dict[str, str]:
    """Save one reliability diagram PNG per model; returns the file names."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    files = {}
    for name, prediction in predictions.items():
        figure = calibration.reliability_diagram(prediction.probs, prediction.labels, n_bins=15,
                                                 title=MODEL_TITLES.get(name, name))
        files[name] = f"reliability_{name}.png"
        atomic_save_figure(figure, out / files[name], dpi=110, bbox_inches="tight")
        plt.close(figure)
    return files


def _backbone_note(report: dict) -> str:
    """Return the report.md sentence on the CNN's widths, image size and batch-norm statistics."""
    config = report["config"]
    note = f"CNN widths {', '.join(map(str, config['widths']))}"
    image_size = (report.get("data_source") or {}).get("image_size")
    if image_size:
        note += f", images resized to {image_size} pixels"
    if config.get("recompute_bn_stats"):
        return note + "; batch-norm statistics recomputed on the training images after training."
    return note + "; batch-norm statistics as trained (running averages)."


def _temperature_note(config: dict, bayesian: dict) -> str:
    if "temperature" not in bayesian:  # a report from before the temperature option
        return ""
    temperature = bayesian["temperature"]
    if config.get("temperature", "none") == "none":
        return ", no temperature (--temperature none)"
    if temperature == 1.0:
        return ", no temperature (the validation split is empty)"
    return f", logits divided by a temperature of {temperature:.4f} fitted on the validation split"


def write_report(out: Path, report: dict, predictions: dict, classes) -> None:
    """Write ``report.json``, the diagrams and ``report.md`` into ``out``."""
    out = Path(out)
    diagrams = write_diagrams(out, predictions)
    report["files"] = {"diagrams": diagrams, "checkpoints": ["deterministic.pt", "bayesian.pt"]}
    atomic_write_json(out / "report.json", report)
    config = report["config"]
    sizes = report["sizes"]
    lines = [
        f"# bayeshead run: {report['dataset']}",
        "",
        f"{sizes['train']} training, {sizes['val']} validation and {sizes['test']} test images, "
        f"{len(classes)} classes; {config['epochs']} epoch{'' if config['epochs'] == 1 else 's'}, "
        f"batch size {config['batch_size']}, "
        f"seed {report['seed']}, device {report['device']}, {report['created']}.",
        f"Bayesian head: prior {report['models']['bayesian']['prior']}, guide {config['guide']} "
        f"({report['models']['bayesian'].get('guide_class', 'class not recorded')}), "
        f"ELBO {config['elbo']}, scheme {config['scheme']}, {config['num_samples']} posterior samples"
        f"{_temperature_note(config, report['models']['bayesian'])}.",
        f"Backbone optimizer {config.get('optimizer', 'adamw')} (peak learning rate {config['lr']}, weight decay "
        f"{config['weight_decay']}); guide optimizer Adam (peak learning rate {config.get('guide_lr', config['lr'])}).",
        _backbone_note(report),
        "ECE and MCE use 15 equal-width bins on top-label confidence; NLL is in nats.",
        "",
        markdown_table(report["models"]),
        "",
    ]
    for name, file in diagrams.items():
        lines += [f"## {MODEL_TITLES.get(name, name)}", "", f"![reliability diagram]({file})", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def write_evaluation(run_dir: Path, stored: dict, recomputed: dict) -> None:
    """Write ``evaluation.json`` with the recomputed metrics and their differences to the report."""
    differences = {
        name: {key: abs(recomputed[name][key] - stored["models"][name][key]) for key in METRICS}
        for name in recomputed
    }
    atomic_write_json(Path(run_dir) / "evaluation.json", {"models": recomputed, "abs_difference": differences})
