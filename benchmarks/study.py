"""Reproduce the reference study (CNN vs CNN with a Bayesian last layer) against baselines.

For each seed, with the same backbone and training budget, this script fits and evaluates:

1. ``deterministic``: the CNN trained with cross-entropy;
2. ``temperature``: the same CNN with temperature scaling fitted on the validation split;
3. ``joint``: the hybrid trained jointly by SVI (the study's method);
4. ``two-stage``: a Bayesian head fitted by SVI on the frozen backbone's training features;
5. ``two-stage-val``: a Bayesian head fitted by SVI on the frozen backbone's validation
   features, with the prior scale chosen by the ELBO (the evidence lower bound) on a grid;
6. ``laplace``: last-layer Laplace through the ``laplace-torch`` package (if installed), with
   the prior precision fitted by the marginal likelihood and the probit predictive.

Every finished model and every result row is saved under ``--out``, so an interrupted study
resumes without retraining what is done. ``--quick`` runs a CI-sized version.

Usage::

    python benchmarks/study.py --dataset cifar10 --data-dir ../shared/data --out runs/study
    python benchmarks/study.py --quick --subset 1000 --out runs/study-quick
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch

from models import BayesianLinearHead, DeterministicClassifier, HybridClassifier, freeze
from pipelines.baselines import fit_temperature
from pipelines.config import RunConfig, default_data_dir
from pipelines.data import load_dataset
from pipelines.io import atomic_save_figure, atomic_torch_save, atomic_write_json, atomic_write_text
from pipelines.prediction import Predictions, predict_bayesian, predict_deterministic
from pipelines.report import METRICS, model_metrics
from pipelines.runner import build_backbone, build_guide, build_hybrid, make_loaders
from pipelines.training import (
    FeatureLoader,
    extract_features,
    make_elbo,
    seed_everything,
    select_device,
    train_deterministic,
    train_hybrid,
    train_svi,
)

logger = logging.getLogger("study")

METHODS = ("deterministic", "temperature", "joint", "two-stage", "two-stage-val", "laplace")
PRIOR_SCALE_GRID = (0.1, 0.3, 1.0, 3.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("cifar10", "cifar100", "digits"), default="cifar10")
    parser.add_argument("--data-dir", default=default_data_dir(), help="data folder (default: $BAYESHEAD_DATA, else ./data)")
    parser.add_argument("--out", default="runs/study", help="results folder; finished parts are reused")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default: 0 1 2)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the CNN and the joint hybrid")
    parser.add_argument("--head-epochs", type=int, default=30, help="SVI epochs of the two-stage heads")
    parser.add_argument("--num-samples", type=int, default=100, help="posterior samples per prediction")
    parser.add_argument("--subset", type=int, default=None, help="use at most this many training and test images")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run: 1 seed, 1 epoch, 3 head epochs, 20 samples, subset 1000 unless given")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1] if args.seeds != [0, 1, 2] else [0]
        args.epochs, args.head_epochs, args.num_samples = 1, 3, 20
        args.subset = args.subset or 1000
    return args


class Study:
    """One dataset and seed: trains each model once and caches it on disk."""

    def __init__(self, args, seed: int):
        self.args = args
        self.seed = seed
        self.device = select_device(args.device)
        self.folder = Path(args.out) / args.dataset / f"seed{seed}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = RunConfig(dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                                head_epochs=args.head_epochs, num_samples=args.num_samples, subset=args.subset,
                                seed=seed, device=args.device, progress=args.progress, out=str(self.folder))
        self.data = load_dataset(args.dataset, args.data_dir, subset=args.subset, seed=seed,
                                 val_fraction=0.1, progress=args.progress)
        self.loaders = make_loaders(self.config, self.data, self.device)
        self._deterministic = None

    # -- models -------------------------------------------------------------------------------

    def deterministic(self) -> DeterministicClassifier:
        """The trained CNN, loaded from disk when an earlier run finished it."""
        if self._deterministic is not None:
            return self._deterministic
        model = DeterministicClassifier(build_backbone(self.config, self.data.in_channels), self.data.num_classes)
        model.to(self.device)
        path = self.folder / "deterministic.pt"
        if path.is_file():
            model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True)["model"])
            seconds = json.loads((self.folder / "deterministic.time.json").read_text())["train_seconds"]
        else:
            seed_everything(self.seed)
            self.loaders["train"].generator.manual_seed(self.seed)
            result = train_deterministic(model, self.loaders["train"], epochs=self.config.resolved_epochs(),
                                         lr=self.config.lr, weight_decay=self.config.weight_decay,
                                         progress=self.args.progress)
            atomic_torch_save({"model": model.state_dict()}, path)
            seconds = result.seconds
            atomic_write_json(self.folder / "deterministic.time.json", {"train_seconds": seconds})
        model.eval()
        model.train_seconds = seconds
        self._deterministic = model
        return model

    def frozen_hybrid(self, prior_scale: float) -> HybridClassifier:
        """A hybrid whose backbone is a frozen copy of the trained CNN's."""
        backbone = freeze(copy.deepcopy(self.deterministic().backbone)).eval()
        head = BayesianLinearHead(backbone.out_features, self.data.num_classes, "normal", scale=prior_scale)
        return HybridClassifier(backbone, head).to(self.device)

    def fit_head(self, hybrid: HybridClassifier, loader_name: str):
        """Fit the head by SVI on cached features; returns the guide, seconds and final ELBO."""
        deterministic = self.deterministic()
        features, labels = extract_features(hybrid.backbone, self.loaders[loader_name])
        init_loc = {"head.weight": deterministic.head.weight.detach(), "head.bias": deterministic.head.bias.detach()}
        guide = build_guide(self.config, hybrid, features[:2], labels[:2], init_loc=init_loc)
        loader = FeatureLoader(features, labels, self.config.batch_size, torch.Generator().manual_seed(self.seed))
        result = train_svi(hybrid.head.model, guide, loader, epochs=self.config.head_epochs, lr=self.config.lr,
                           progress=self.args.progress, description="bayesian head")
        elbo = make_elbo("trace", num_particles=64)
        with torch.no_grad():
            evidence = -float(elbo.loss(hybrid.head.model, guide, features, labels, len(labels)))
        return guide, result.seconds, evidence

    # -- methods ------------------------------------------------------------------------------

    def run_deterministic(self):
        model = self.deterministic()
        return predict_deterministic(model, self.loaders["test"]), model.train_seconds, {}

    def _require_validation(self, method: str) -> None:
        if len(self.data.val) == 0:
            raise ValueError(
                f"{method} needs a validation split, but it is empty ({len(self.data.train)} training images, "
                "10% per class rounds to 0); use more images (--subset) or fewer classes"
            )

    def run_temperature(self):
        self._require_validation("temperature scaling")
        model = self.deterministic()
        start = time.perf_counter()
        val = predict_deterministic(model, self.loaders["val"])
        temperature = fit_temperature(val.log_probs, val.labels)
        test = predict_deterministic(model, self.loaders["test"])
        log_probs = torch.log_softmax(torch.as_tensor(test.log_probs) / temperature, -1).numpy()
        scaled = Predictions(np.exp(log_probs), log_probs, test.labels, test.expected_entropy, test.seconds)
        return scaled, model.train_seconds + time.perf_counter() - start, {"temperature": temperature}

    def run_joint(self):
        pyro.clear_param_store()
        seed_everything(self.seed)
        self.loaders["train"].generator.manual_seed(self.seed)
        hybrid = build_hybrid(self.config, self.data.in_channels, self.data.num_classes).to(self.device)
        images, targets = next(iter(self.loaders["test"]))
        guide = build_guide(self.config, hybrid, hybrid.features(images[:2]), targets[:2])
        result = train_hybrid(hybrid, guide, self.loaders["train"], epochs=self.config.resolved_epochs(),
                              lr=self.config.lr, weight_decay=self.config.weight_decay, progress=self.args.progress)
        predictions = predict_bayesian(hybrid, guide, self.loaders["test"], self.config.num_samples, seed=self.seed)
        return predictions, result.seconds, {}

    def run_two_stage(self):
        pyro.clear_param_store()
        seed_everything(self.seed)
        hybrid = self.frozen_hybrid(self.config.prior_scale)
        guide, seconds, evidence = self.fit_head(hybrid, "train_plain")
        predictions = predict_bayesian(hybrid, guide, self.loaders["test"], self.config.num_samples, seed=self.seed)
        return predictions, self.deterministic().train_seconds + seconds, {"elbo": evidence}

    def run_two_stage_val(self):
        self._require_validation("two-stage-val")
        best = None
        total_seconds = 0.0
        for scale in PRIOR_SCALE_GRID:
            pyro.clear_param_store()
            seed_everything(self.seed)
            hybrid = self.frozen_hybrid(scale)
            guide, seconds, evidence = self.fit_head(hybrid, "val")
            total_seconds += seconds
            logger.info("two-stage-val: prior scale %g, ELBO %.2f", scale, evidence)
            if best is None or evidence > best[0]:
                best = (evidence, scale, pyro.get_param_store().get_state())
        evidence, scale, state = best
        pyro.clear_param_store()
        hybrid = self.frozen_hybrid(scale)
        features, labels = extract_features(hybrid.backbone, self.loaders["val"])
        guide = build_guide(self.config, hybrid, features[:2], labels[:2])
        pyro.get_param_store().set_state(state)
        predictions = predict_bayesian(hybrid, guide, self.loaders["test"], self.config.num_samples, seed=self.seed)
        extra = {"prior_scale": scale, "elbo": evidence, "grid": list(PRIOR_SCALE_GRID)}
        return predictions, self.deterministic().train_seconds + total_seconds, extra

    def run_laplace(self):
        with warnings.catch_warnings():
            # laplace-torch's dependencies call torch.jit.script (deprecated in recent torch), and
            # it warns that the probit link is its default; the probit link is what is wanted.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*link_approx.*", category=UserWarning)
            return self._laplace()

    def _laplace(self):
        try:
            from laplace import Laplace
        except ImportError:
            return None, 0.0, {"skipped": "laplace-torch is not installed (pip install -e '.[bench]')"}
        model = self.deterministic()
        start = time.perf_counter()
        train_images, train_labels = _materialise(self.loaders["train_plain"])
        dataset = torch.utils.data.TensorDataset(train_images, train_labels)
        laplace = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="full")
        laplace.fit(torch.utils.data.DataLoader(dataset, batch_size=500))
        laplace.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        probs, labels = [], []
        for images, targets in self.loaders["test"]:
            probs.append(laplace(images, pred_type="glm", link_approx="probit").detach().double())
            labels.append(targets)
        probs = torch.cat(probs)
        probs = probs / probs.sum(-1, keepdim=True)
        predictions = Predictions(probs.numpy(), probs.clamp_min(1e-300).log().numpy(), torch.cat(labels).numpy(),
                                  np.zeros(len(probs)), time.perf_counter() - start)
        precision = float(np.mean(np.asarray(laplace.prior_precision.detach().cpu())))
        return predictions, model.train_seconds + seconds, {"prior_precision": precision}

    def run(self, method: str) -> dict:
        """Fit and evaluate ``method``, or return its saved row; the row is saved when done."""
        row_path = self.folder / f"{method}.json"
        if row_path.is_file():
            return json.loads(row_path.read_text())
        logger.info("seed %d: %s", self.seed, method)
        predictions, seconds, extra = getattr(self, "run_" + method.replace("-", "_"))()
        if predictions is None:
            return {"method": method, "seed": self.seed, **extra}
        row = {"method": method, "seed": self.seed, **model_metrics(predictions), "train_seconds": seconds,
               "predict_seconds": predictions.seconds, **extra}
        np.savez_compressed(self.folder / f"{method}.probs.npz", probs=predictions.probs, labels=predictions.labels)
        atomic_write_json(row_path, row)
        return row


def _materialise(loader):
    images, labels = [], []
    for batch, targets in loader:
        images.append(batch)
        labels.append(targets)
    return torch.cat(images), torch.cat(labels)


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Mean and standard deviation (ddof=1 when there are several seeds) per method and metric."""
    summary = {}
    for method in METHODS:
        found = [r for r in rows if r["method"] == method and "accuracy" in r]
        if not found:
            continue
        summary[method] = {"seeds": len(found)}
        for key in (*METRICS, "train_seconds"):
            values = np.array([r[key] for r in found], dtype=float)
            summary[method][key] = float(values.mean())
            summary[method][key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return summary


def markdown(summary: dict, args) -> str:
    lines = [f"| method ({args.dataset}) | seeds | accuracy | ECE | MCE | NLL | Brier | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for method, row in summary.items():
        cells = [f"{row[k]:.4f} ± {row[k + '_std']:.4f}" for k in METRICS]
        lines.append(f"| {method} | {row['seeds']} | " + " | ".join(cells) + f" | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def reliability_grid(args, seed: int, methods) -> Path | None:
    """One reliability diagram per method for one seed, in one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from pipelines.calibration import reliability_diagram

    folder = Path(args.out) / args.dataset / f"seed{seed}"
    found = [m for m in methods if (folder / f"{m}.probs.npz").is_file()]
    if not found:
        return None
    columns = min(3, len(found))
    rows = (len(found) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.2 * rows), squeeze=False)
    for ax, method in zip(axes.flat, found, strict=False):
        saved = np.load(folder / f"{method}.probs.npz")
        reliability_diagram(saved["probs"], saved["labels"], n_bins=15, ax=ax, title=method)
    for ax in list(axes.flat)[len(found):]:
        ax.axis("off")
    figure.tight_layout()
    path = Path(args.out) / f"reliability_{args.dataset}.png"
    atomic_save_figure(figure, path, dpi=100)
    plt.close(figure)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    start = time.perf_counter()
    rows = []
    try:
        for seed in args.seeds:
            study = Study(args, seed)
            for method in args.methods:
                rows.append(study.run(method))
    except (ValueError, FileNotFoundError) as error:
        print(f"study: error: {error}", file=sys.stderr)
        return 2
    summary = summarise(rows)
    table = markdown(summary, args)
    grid = reliability_grid(args, args.seeds[0], args.methods)
    result = {"dataset": args.dataset, "args": vars(args), "rows": rows, "summary": summary,
              "wall_seconds": time.perf_counter() - start, "machine": platform.platform(),
              "torch_threads": torch.get_num_threads()}
    atomic_write_json(Path(args.out) / f"study_{args.dataset}.json", result)
    atomic_write_text(Path(args.out) / f"study_{args.dataset}.md",
                      table + (f"\n\n![reliability diagrams]({grid.name})\n" if grid else "\n"))
    print(table)
    skipped = [r for r in rows if "skipped" in r]
    for row in skipped:
        print(f"{row['method']}: skipped ({row['skipped']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
