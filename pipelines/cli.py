"""The ``bayeshead`` command line: a thin layer that fills a :class:`RunConfig` and calls the
pipeline functions that Python users call too."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from guides.autoguides import GUIDE_NAMES
from models.priors import HYPERPRIOR_NAMES, PRIOR_NAMES
from pipelines.config import (
    DEFAULT_EPOCHS,
    DEFAULT_WIDTHS,
    DEVICES,
    ELBOS,
    FALLBACK_WIDTHS,
    LIKELIHOOD_NAMES,
    OPTIMIZER_DEFAULTS,
    OPTIMIZERS,
    REGRESSION_DATASET_NAMES,
    SCHEMES,
    TEMPERATURES,
    ConfigError,
    RunConfig,
    RunFolderError,
    load_toml,
)
from pipelines.data import DATASET_NAMES, DataError
from pipelines.training import TrainingError

logger = logging.getLogger("bayeshead")

# Errors caused by what the user asked for: reported in one line, without a traceback.
USER_ERRORS = (ConfigError, DataError, RunFolderError, TrainingError, FileNotFoundError, NotADirectoryError, PermissionError)


# Modules that add sub-commands: each defines ``add_commands(subparsers)``, and every parser it
# adds sets ``handler=function(args) -> int`` with ``set_defaults``.
COMMAND_MODULES = ("pipelines.diagnostics", "pipelines.clinical")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _noise_scale(text: str) -> float | str:
    if text == "learned":
        return text
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'learned', got {text!r}") from None


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    d = RunConfig()
    add = parser.add_argument
    add("--config", metavar="FILE.toml", help="TOML file with any of the options below; flags override it")
    add("--dataset", choices=DATASET_NAMES + REGRESSION_DATASET_NAMES,
        help=f"dataset to train and test on; tabular is a CSV file for regression (default: {d.dataset})")
    add("--data-dir", metavar="DIR",
        help="folder holding the data (default: $BAYESHEAD_DATA, else ./data)")
    add("--out", metavar="DIR", help=f"output folder for checkpoints and reports (default: {d.out})")
    add("--epochs", type=positive_int, metavar="N",
        help="training epochs for both models (default: "
             + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items()) + ")")
    add("--batch-size", type=positive_int, metavar="B", help=f"images per training step (default: {d.batch_size})")
    add("--optimizer", choices=OPTIMIZERS,
        help="optimizer of the backbone for both models: sgd (Nesterov momentum 0.9) or adamw "
             "(default: adamw for digits and tabular, sgd for image sets)")
    add("--lr", type=_positive_float,
        help="peak learning rate of the backbone's one-cycle schedule (default: "
             + ", ".join(f"{k} {v['lr']}" for k, v in OPTIMIZER_DEFAULTS.items()) + ")")
    add("--weight-decay", type=float,
        help="weight decay on backbone kernels (default: "
             + ", ".join(f"{k} {v['weight_decay']}" for k, v in OPTIMIZER_DEFAULTS.items()) + ")")
    add("--guide-lr", type=_positive_float,
        help=f"peak Adam learning rate of the Bayesian head's variational parameters (default: {d.guide_lr})")
    add("--num-samples", type=positive_int, metavar="S",
        help=f"posterior samples of the head per prediction (default: {d.num_samples})")
    add("--local-reparameterization", action="store_true", default=None,
        help="predict by sampling each image's logits from their Gaussian marginal instead of sampling "
             "head weights (mean-field guides normal, diagonal and meanfield only)")
    add("--subset", type=positive_int, metavar="N",
        help="use a seeded random subset of at most N training and N test images (default: all)")
    add("--val-fraction", type=float, help=f"share of training images held out for validation (default: {d.val_fraction})")
    add("--image-size", type=positive_int, metavar="PIXELS",
        help="resize image-folder and brain-mri images to this square side in pixels "
             "(default: keep for image-folder, 96 for brain-mri)")
    add("--device", choices=DEVICES, help=f"where to train and predict (default: {d.device})")
    add("--seed", type=int, help=f"seed for torch, numpy and pyro (default: {d.seed})")
    add("--download", action="store_true", default=None, help="download the official CIFAR archive if missing")
    add("--drop-leaked", action="store_true", default=None,
        help="brain-mri: drop the test scans that are byte- or near-identical to a training scan")
    add("--widths", type=_widths, metavar="W1,W2,...",
        help="output channels of each convolutional block (default: "
             + "; ".join(f"{k}: {','.join(map(str, v))}" for k, v in DEFAULT_WIDTHS.items())
             + f"; other datasets: {','.join(map(str, FALLBACK_WIDTHS))})")
    add("--convs-per-block", type=positive_int, help=f"convolutions per block (default: {d.convs_per_block})")
    add("--recompute-bn-stats", action="store_true", default=None,
        help="after training, set batch norm's running statistics from one pass over the unaugmented "
             "training images; use it for runs of a few epochs or fewer (default: off)")

    bayes = parser.add_argument_group("Bayesian head")
    add = bayes.add_argument
    add("--prior", choices=PRIOR_NAMES, help=f"prior on the head's weights and biases (default: {d.prior})")
    add("--prior-scale", type=_positive_float,
        help=f"prior scale: standard deviation for normal, scale for laplace/student-t, hyperprior scale for hierarchical (default: {d.prior_scale})")
    add("--prior-df", type=_positive_float, help=f"degrees of freedom of the student-t prior (default: {d.prior_df})")
    add("--prior-pi", type=float, help=f"weight of the wide component of the scale mixture (default: {d.prior_pi})")
    add("--prior-sigma1", type=_positive_float, help=f"wide standard deviation of the scale mixture (default: {d.prior_sigma1})")
    add("--prior-sigma2", type=_positive_float, help=f"narrow standard deviation of the scale mixture (default: {d.prior_sigma2})")
    add("--hyperprior", choices=HYPERPRIOR_NAMES, help=f"hyperprior of the hierarchical prior's scales (default: {d.hyperprior})")
    add("--guide", choices=GUIDE_NAMES,
        help="variational family over the head: normal (pyro AutoNormal, one Gaussian per weight), "
             "diagonal (AutoDiagonalNormal, the same family stored as one vector), meanfield (the "
             "project's hand-written mean-field Gaussian guide), lowrank, multivariate (full "
             f"covariance), laplace, delta (a point estimate) (default: {d.guide})")
    add("--guide-rank", type=positive_int, help=f"covariance rank of the lowrank guide (default: {d.guide_rank})")
    add("--init-scale", type=_positive_float, help=f"initial standard deviation of the guide (default: {d.init_scale})")
    add("--elbo", choices=ELBOS, help=f"trace (Trace_ELBO) or meanfield (TraceMeanField_ELBO: the KL term in closed form where the guide and prior allow it) (default: {d.elbo})")
    add("--num-particles", type=positive_int, help=f"ELBO particles per step, vectorised (default: {d.num_particles})")
    add("--kl-weight", type=float, help=f"weight of the KL term in the ELBO (default: {d.kl_weight})")
    add("--kl-warmup-epochs", type=_non_negative_int,
        help=f"epochs over which the KL weight rises linearly from 0 (default: {d.kl_warmup_epochs})")
    add("--scheme", choices=SCHEMES,
        help="joint: backbone and head trained together by SVI; two-stage: head fitted by SVI on the "
             f"frozen, trained deterministic backbone (default: {d.scheme})")
    add("--temperature", choices=TEMPERATURES,
        help="validation: divide the Bayesian head's logits by one temperature fitted on the validation "
             "split after training, so its predictive is calibrated on held-out images; none: predict with "
             f"the head as trained; classification only, a Gaussian likelihood ignores it (default: {d.temperature})")
    add("--head-epochs", type=positive_int, help=f"SVI epochs of the head in the two-stage scheme (default: {d.head_epochs})")
    add("--likelihood", choices=LIKELIHOOD_NAMES,
        help="categorical for classification, gaussian for regression on --dataset tabular "
             f"(default: {d.likelihood})")
    add("--noise-scale", type=_noise_scale, metavar="SIGMA|learned",
        help="standard deviation of the Gaussian likelihood, in the target's units, or "
             f"'learned' to fit it as a point estimate (default: {d.noise_scale})")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayeshead",
        description="Train and evaluate a CNN and the same CNN with a Bayesian last layer, side by side.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="train and evaluate both models",
                              description="Train the deterministic CNN and the Bayesian-head CNN, "
                                          "evaluate both on the test split and write a report.")
    _add_run_options(run)

    evaluate = commands.add_parser("evaluate", help="reload a run and recompute its test metrics",
                                   description="Reload the checkpoints of RUN_DIR, recompute the test "
                                               "metrics and compare them with report.json.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="output folder of 'bayeshead run'")
    evaluate.add_argument("--data-dir", metavar="DIR", help="data folder, if it moved since the run")
    evaluate.add_argument("--device", choices=DEVICES, help="device to evaluate on (default: the run's)")

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(commands)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Merge the TOML file (if any) and the flags given; flags win."""
    options = load_toml(args.config) if args.config else {}
    ignored = {"config", "command", "verbose"}
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ignored}
    options.update(flags)
    return RunConfig.from_dict(options).validate()


def _print_table(models: dict) -> None:
    from pipelines.report import markdown_table

    if any("rmse" in row for row in models.values()):
        from pipelines.regression import markdown_table
    print(markdown_table(models))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "run":
            from pipelines.runner import run

            config = config_from_args(args)
            report = run(config)
            _print_table(report["models"])
            print(f"report: {config.out}/report.md")
        elif args.command == "evaluate":
            from pipelines.runner import evaluate

            result = evaluate(args.run_dir, data_dir=args.data_dir, device=args.device)
            _print_table(result["recomputed"])
            print(f"recomputed metrics: {args.run_dir}/evaluation.json")
        else:
            return args.handler(args)
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, (FileNotFoundError, PermissionError)) and error.args and isinstance(error.args[0], str) and not error.filename else error
        print(f"bayeshead: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bayeshead: interrupted; the last finished epoch's checkpoint is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
