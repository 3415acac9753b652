"""Reproduce the reference study (CNN vs CNN with a Bayesian last layer) against baselines.

For each seed, with the same backbone and training budget, this script fits and evaluates:

1. ``deterministic``: the CNN trained with cross-entropy;
2. ``temperature``: the same CNN with temperature scaling fitted on the validation split;
3. ``joint``: the hybrid trained jointly by SVI (the study's method), predicting as trained;
4. ``joint-tempered``: the same hybrid with its logits divided by a temperature fitted on the
   validation split, as ``bayeshead run --temperature validation`` does;
5. ``two-stage``: a Bayesian head fitted by SVI on the frozen backbone's training features;
6. ``two-stage-tempered``: that head with the validation temperature (the default of
   ``bayeshead run``);
7. ``two-stage-val``: a Bayesian head fitted by SVI on the frozen backbone's validation
   features, with the prior scale chosen by the ELBO (the evidence lower bound) on a grid;
8. ``laplace``: last-layer Laplace through the ``laplace-torch`` package (if installed), with
   the prior precision fitted by the marginal likelihood and the probit predictive.

The CNN and the joint hybrid train with the recipe of ``bayeshead run`` (``RunConfig``'s
defaults for the dataset). The two-stage heads start at the CNN's last layer and take Adam at
``RunConfig.guide_lr`` (peak 0.003, one-cycle) for ``--head-epochs`` epochs (30). On 2,700
CIFAR-10 images, a tenfold guide lr or 100 head epochs widened the guide's scales but did not
lower ECE clearly below temperature scaling's, so these defaults stay (the numbers and the
command are in ``benchmarks/README.md``).

Every finished model (the CNN in ``deterministic.pt``, the joint hybrid in ``joint.pt``) and
every result row is saved under ``--out``, so an interrupted study resumes without retraining
what is done. ``--quick`` runs a CI-sized version.

``--reuse-run RUN_DIR`` takes the CNN (``deterministic.pt``) and the jointly trained hybrid
(``bayesian.pt``: backbone, head buffers and guide params) from a finished ``bayeshead run``
instead of training them, for the run's seed only; other seeds train as usual. The run's
``report.json`` config must equal the study's on every option in ``REUSED_RUN_KEYS`` and use the
joint scheme, or the study stops with one line that names each differing option with both
values. The two models' training times are the ones the report records. The joint rows predict
with Pyro seeded by the run's seed, as ``bayeshead run`` does. So the report's Bayesian metrics
equal the ``joint-tempered`` row for a run with ``--temperature validation``, and the ``joint``
row for a run without a temperature, exactly when ``--num-samples`` equals the run's
``num_samples`` (20 by default, against the study's 100) and both predict on the same kind of
device; otherwise they differ by Monte-Carlo noise. Temperature scaling, the two-stage heads
and Laplace then use the run's CNN. Each seed folder records in ``models.json`` where its
CNN came from, and the study rejects a folder whose results came from another CNN.

Usage::

    python benchmarks/study.py --dataset cifar10 --data-dir ../shared/data --out runs/study
    python benchmarks/study.py --dataset cifar10 --data-dir ../shared/data --reuse-run runs/cifar10-sgd20
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch

from models import BayesianLinearHead, DeterministicClassifier, HybridClassifier, freeze
from pipelines.baselines import fit_temperature
from pipelines.config import OPTIMIZERS, RunConfig, default_data_dir
from pipelines.data import load_dataset
from pipelines.io import atomic_save_figure, atomic_torch_save, atomic_write_json, atomic_write_text
from pipelines.prediction import Predictions, predict_bayesian, predict_deterministic
from pipelines.report import METRICS, model_metrics
from pipelines.runner import (
    build_backbone,
    build_guide,
    build_hybrid,
    copy_config,
    fit_head_temperature,
    load_run,
    make_loaders,
    optimizer_options,
    restore_guide,
    save_hybrid,
)
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

METHODS = ("deterministic", "temperature", "joint", "joint-tempered", "two-stage", "two-stage-tempered",
           "two-stage-val", "laplace")
PRIOR_SCALE_GRID = (0.1, 0.3, 1.0, 3.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("cifar10", "cifar100", "digits"), default="cifar10")
    parser.add_argument("--data-dir", default=default_data_dir(), help="data folder (default: $BAYESHEAD_DATA, else ./data)")
    parser.add_argument("--out", default="runs/study", help="results folder; finished parts are reused")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default: 0 1 2)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs of the CNN and the joint hybrid (default: the dataset's default of "
                             "'bayeshead run', 20 for CIFAR and 30 for digits)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="optimizer of the CNN and the joint hybrid's backbone (default: the dataset's recipe, "
                             "sgd for CIFAR and adamw for digits)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of that optimizer "
                        "(default: the optimizer's recipe, sgd 0.1 and adamw 0.003)")
    parser.add_argument("--weight-decay", type=float, default=None, help="weight decay of the convolution "
                        "kernels (default: the optimizer's recipe, sgd 5e-4 and adamw 0.05)")
    parser.add_argument("--guide-lr", type=float, default=RunConfig.guide_lr,
                        help="peak Adam learning rate of the guide's params, joint and two-stage (default: %(default)s)")
    parser.add_argument("--head-epochs", type=int, default=None, help="SVI epochs of the two-stage heads (default: 30)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="posterior samples per prediction (default: 100)")
    parser.add_argument("--subset", type=int, default=None, help="use at most this many training and test images")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--reuse-run", metavar="RUN_DIR", default=None,
                        help="output folder of a finished 'bayeshead run' (joint scheme) whose CNN and hybrid "
                             "replace the study's own training for the run's seed; its config must match the study's")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run: 1 seed, 1 epoch, 3 head epochs, 20 samples and subset 1000, "
                             "each unless given")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1] if args.seeds != [0, 1, 2] else [0]
        quick = {"epochs": 1, "head_epochs": 3, "num_samples": 20, "subset": 1000}
    else:
        quick = {"head_epochs": 30, "num_samples": 100}
    for name, value in quick.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def study_config(args, seed: int, folder: Path) -> RunConfig:
    """Build the run configuration that the study trains and predicts with for one seed."""
    return RunConfig(dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs, optimizer=args.optimizer,
                     lr=args.lr, weight_decay=args.weight_decay, guide_lr=args.guide_lr,
                     head_epochs=args.head_epochs, num_samples=args.num_samples, subset=args.subset, seed=seed,
                     device=args.device, progress=args.progress, out=str(folder)).validate()


# Options of RunConfig that define the trained models and their data. A reused run must match
# the study on every one of them, and on the joint scheme.
REUSED_RUN_KEYS = (
    "dataset", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "guide_lr", "widths",
    "convs_per_block", "prior", "prior_scale", "guide", "init_scale", "elbo", "num_particles", "kl_weight",
    "kl_warmup_epochs", "likelihood", "seed", "subset", "val_fraction", "image_size", "scheme",
)
# The study's option for each of those keys that has one.
STUDY_FLAGS = {"dataset": "--dataset", "epochs": "--epochs", "optimizer": "--optimizer", "lr": "--lr",
               "weight_decay": "--weight-decay", "guide_lr": "--guide-lr", "seed": "--seeds", "subset": "--subset"}


@dataclass
class ReusedRun:
    """A finished ``bayeshead run`` whose CNN and jointly trained hybrid the study takes over."""

    folder: Path
    report: dict
    config: RunConfig

    @property
    def seed(self) -> int:
        return self.config.seed

    def train_seconds(self, model: str) -> float:
        """Training time of ``"deterministic"`` or ``"bayesian"`` as the run's report records it."""
        return float(self.report["models"][model]["train_seconds"])

    def provenance(self) -> dict:
        return {"cnn": "reused", "run": str(self.folder.resolve()), "run_created": self.report.get("created")}


def load_reused_run(args) -> ReusedRun:
    """Read ``args.reuse_run`` and check that its models are the ones the study would train.

    Raises
    ------
    FileNotFoundError
        When the folder has no ``report.json`` or no checkpoint (the run has not finished).
    ValueError
        When the run's config differs from the study's on a key of :data:`REUSED_RUN_KEYS`, and
        the message then names every differing key with both values. Also when the run used a
        prior or guide passed from Python, when its seed is not among ``--seeds``, or when a
        checkpoint is newer than the report because the folder is being trained again.
    """
    folder = Path(args.reuse_run)
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(
            f"--reuse-run {folder}: report.json not found, so this is not the output folder of a finished "
            "'bayeshead run'; wait for the run to finish or pass another folder"
        )
    report = json.loads(report_path.read_text())
    stored = report["config"]
    seed = stored.get("seed")
    if seed not in args.seeds:
        raise ValueError(f"--reuse-run {folder}: the run's seed is {seed}, which is not among --seeds "
                         f"{' '.join(map(str, args.seeds))}; add it to --seeds")

    expected = study_config(args, seed, Path(args.out)).to_dict()
    expected["scheme"] = "joint"
    missing = object()
    differing = [key for key in REUSED_RUN_KEYS if stored.get(key, missing) != expected[key]]
    if differing:
        values = [f"{key} (run: {_describe(stored.get(key, missing), missing)}, study: {expected[key]!r})"
                  for key in differing]
        flags = [STUDY_FLAGS[key] for key in differing if key in STUDY_FLAGS]
        advice = f"set {', '.join(flags)} to the run's values or " if flags else ""
        raise ValueError(f"--reuse-run {folder}: the run's config differs from the study's on {'; '.join(values)}; "
                         f"{advice}reuse a run made with the study's settings")
    bayesian = report["models"]["bayesian"]
    if bayesian.get("custom_prior") or bayesian.get("custom_guide"):
        raise ValueError(f"--reuse-run {folder}: the run used a prior or guide passed from Python, "
                         "which the study cannot rebuild; reuse a run made with the CLI's options")

    for name in ("deterministic.pt", "bayesian.pt"):
        checkpoint = folder / name
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--reuse-run {folder}: missing checkpoint {checkpoint}")
        if checkpoint.stat().st_mtime > report_path.stat().st_mtime:
            raise ValueError(f"--reuse-run {folder}: {name} is newer than report.json, so a new run is "
                             "training in this folder; wait for it to finish")
    config = RunConfig.from_report(stored)
    config.data_dir, config.device, config.progress = args.data_dir, args.device, args.progress
    return ReusedRun(folder, report, config)


def _describe(value, missing) -> str:
    return "not recorded" if value is missing else repr(value)


class Study:
    """One dataset and seed: trains each model once and caches it on disk.

    With ``reused`` (for the run's seed only) the CNN and the joint hybrid come from that run's
    checkpoints instead of training.
    """

    def __init__(self, args, seed: int, reused: ReusedRun | None = None):
        self.args = args
        self.seed = seed
        self.reused = reused if reused is not None and reused.seed == seed else None
        self.device = select_device(args.device)
        self.folder = Path(args.out) / args.dataset / f"seed{seed}"
        self.config = study_config(args, seed, self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data = load_dataset(args.dataset, args.data_dir, subset=args.subset, seed=seed,
                                 val_fraction=self.config.val_fraction, image_size=self.config.image_size,
                                 progress=args.progress)
        if self.reused is not None:
            self._adopt_run_data()
        self._check_provenance()
        self.loaders = make_loaders(self.config, self.data, self.device)
        self._deterministic = None
        self._joint = None
        self._two_stage = None

    def _adopt_run_data(self) -> None:
        """Check that the data are the run's and normalise them with the run's statistics."""
        report = self.reused.report
        sizes = {"train": len(self.data.train), "val": len(self.data.val), "test": len(self.data.test)}
        if sizes != report["sizes"]:
            raise ValueError(f"--reuse-run {self.reused.folder}: the run had {report['sizes']} images, but the study "
                             f"loaded {sizes} from {self.args.data_dir}; pass the run's data folder as --data-dir")
        # The CNN was trained on inputs normalised with these statistics. They equal the study's own
        # unless the images under --data-dir changed since the run.
        self.data.mean = report["normalization"]["mean"]
        self.data.std = report["normalization"]["std"]

    def _check_provenance(self) -> None:
        """Keep the rows of one seed folder from mixing a reused CNN with a CNN the study trained.

        The folder's ``models.json`` records where its CNN came from. A folder with results but
        without that file comes from the study's own training, before the file was introduced.
        """
        path = self.folder / "models.json"
        expected = self.reused.provenance() if self.reused is not None else {"cnn": "trained"}
        if path.is_file():
            found = json.loads(path.read_text())
        elif any(self.folder.iterdir()):
            found = {"cnn": "trained"}
        else:
            atomic_write_json(path, expected)
            return
        if found != expected:
            raise ValueError(f"{self.folder} contains results of a CNN from {_source(found)}, but this study "
                             f"takes its CNN from {_source(expected)}; use another --out or delete that folder")

    # -- models -------------------------------------------------------------------------------

    def deterministic(self) -> DeterministicClassifier:
        """The trained CNN, loaded from disk when an earlier run finished it or it is reused."""
        if self._deterministic is not None:
            return self._deterministic
        model = DeterministicClassifier(build_backbone(self.config, self.data.in_channels), self.data.num_classes)
        model.to(self.device)
        path = self.folder / "deterministic.pt"
        if self.reused is not None:
            # The format of pipelines.runner.save_deterministic, read as load_run reads it.
            state = torch.load(self.reused.folder / "deterministic.pt", map_location=self.device, weights_only=True)
            model.load_state_dict(state["model"])
            seconds = self.reused.train_seconds("deterministic")
        elif path.is_file():
            model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True)["model"])
            seconds = json.loads((self.folder / "deterministic.time.json").read_text())["train_seconds"]
        else:
            seed_everything(self.seed)
            self.loaders["train"].generator.manual_seed(self.seed)
            result = train_deterministic(model, self.loaders["train"], epochs=self.config.resolved_epochs(),
                                         **optimizer_options(self.config), progress=self.args.progress)
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
        result = train_svi(hybrid.head.model, guide, loader, epochs=self.config.head_epochs, lr=self.config.guide_lr,
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

    def joint_hybrid(self):
        """Return the jointly trained hybrid and its guide, reused, loaded from ``joint.pt`` or trained.

        Returns ``(hybrid, guide, train_seconds, predict_seed)``; the hybrid is in eval mode.
        """
        if self._joint is not None:
            return self._joint
        if self.reused is not None:
            run = self.reused
            models = load_run(run.folder, run.config, self.data, self.device)
            self._joint = (models.hybrid, models.guide, run.train_seconds("bayesian"), run.seed)
            return self._joint
        pyro.clear_param_store()
        seed_everything(self.seed)
        self.loaders["train"].generator.manual_seed(self.seed)
        hybrid = build_hybrid(self.config, self.data.in_channels, self.data.num_classes).to(self.device)
        images, targets = next(iter(self.loaders["test"]))
        path = self.folder / "joint.pt"
        if path.is_file():
            state = torch.load(path, map_location=self.device, weights_only=True)
            hybrid.backbone.load_state_dict(state["backbone"])
            hybrid.head.load_state_dict(state["head"])
            hybrid.eval()
            guide = restore_guide(self.config, hybrid, state, path, hybrid.features(images[:2]), targets[:2])
            seconds = json.loads((self.folder / "joint.time.json").read_text())["train_seconds"]
        else:
            guide = build_guide(self.config, hybrid, hybrid.features(images[:2]), targets[:2])
            result = train_hybrid(hybrid, guide, self.loaders["train"], epochs=self.config.resolved_epochs(),
                                  **optimizer_options(self.config), guide_lr=self.config.guide_lr,
                                  progress=self.args.progress)
            save_hybrid(path, hybrid, len(result.losses) - 1)
            seconds = result.seconds
            atomic_write_json(self.folder / "joint.time.json", {"train_seconds": seconds})
        hybrid.eval()
        self._joint = (hybrid, guide, seconds, self.seed)
        return self._joint

    def run_joint(self):
        run = self.reused
        if run is not None and (self.config.num_samples != run.config.num_samples
                                or run.config.local_reparameterization):
            # The draws, and so the metrics, equal the run's report when --num-samples equals the
            # run's num_samples, the run predicted without local reparameterization and both
            # predict on the same kind of device (CPU or CUDA).
            logger.warning("seed %d: the joint row draws %d weight samples, but the run drew %d%s, so its metrics "
                           "differ from the run's report by Monte-Carlo noise", self.seed, self.config.num_samples,
                           run.config.num_samples,
                           " with local reparameterization" if run.config.local_reparameterization else "")
        hybrid, guide, seconds, predict_seed = self.joint_hybrid()
        predictions = predict_bayesian(hybrid, guide, self.loaders["test"], self.config.num_samples,
                                       seed=predict_seed, temperature=1.0)
        return predictions, seconds, {}

    def _tempered(self, method: str, hybrid, guide, seconds: float, predict_seed: int):
        """Fit the head's temperature on the validation split as ``bayeshead run`` does, then predict."""
        self._require_validation(method)
        start = time.perf_counter()
        config = copy_config(self.config, seed=predict_seed)
        temperature = fit_head_temperature(config, hybrid, guide, self.loaders["val"])
        seconds += time.perf_counter() - start
        predictions = predict_bayesian(hybrid, guide, self.loaders["test"], self.config.num_samples,
                                       seed=predict_seed, temperature=temperature)
        return predictions, seconds, {"temperature": temperature}

    def run_joint_tempered(self):
        return self._tempered("joint-tempered", *self.joint_hybrid())

    def two_stage_hybrid(self):
        """Return the head fitted by SVI on the frozen CNN's training features, with its guide (cached)."""
        if self._two_stage is None:
            pyro.clear_param_store()
            seed_everything(self.seed)
            hybrid = self.frozen_hybrid(self.config.prior_scale)
            guide, seconds, evidence = self.fit_head(hybrid, "train_plain")
            self._two_stage = (hybrid, guide, self.deterministic().train_seconds + seconds, evidence)
        return self._two_stage

    def run_two_stage(self):
        hybrid, guide, seconds, evidence = self.two_stage_hybrid()
        predictions = predict_bayesian(hybrid, guide, self.loaders["test"], self.config.num_samples, seed=self.seed,
                                       temperature=1.0)
        return predictions, seconds, {"elbo": evidence}

    def run_two_stage_tempered(self):
        hybrid, guide, seconds, _ = self.two_stage_hybrid()
        return self._tempered("two-stage-tempered", hybrid, guide, seconds, self.seed)

    def run_two_stage_val(self):
        # NOTE: on a few hundred validation images each head gets a few SVI steps per epoch and the
        # KL term dominates the ELBO, so on 300 images the grid chose its smallest scale every time.
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
        if self.reused is not None:
            row["reused_run"] = str(self.reused.folder)
        np.savez_compressed(self.folder / f"{method}.probs.npz", probs=predictions.probs, labels=predictions.labels)
        atomic_write_json(row_path, row)
        return row


def _source(provenance: dict) -> str:
    if provenance.get("cnn") == "reused":
        return f"the run {provenance.get('run')} (created {provenance.get('run_created')})"
    return "the study's own training"


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
        reused = load_reused_run(args) if args.reuse_run else None
        for seed in args.seeds:
            study = Study(args, seed, reused)
            # In METHODS order, so each cached model (the joint hybrid, the two-stage head) serves
            # its rows before another method clears Pyro's param store.
            for method in sorted(set(args.methods), key=METHODS.index):
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
