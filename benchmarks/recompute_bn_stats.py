"""Measure what ``--recompute-bn-stats`` changes on a finished two-stage run.

Reloads the run, predicts the test split with both models as stored, then replaces the CNN's
batch-norm running statistics with those of one pass over the unaugmented training images
(:func:`pipelines.training.recompute_batchnorm_statistics`). With the new statistics it
predicts with the CNN again, refits the two-stage Bayesian head and its validation
temperature as ``bayeshead run --recompute-bn-stats`` does, and predicts with it. It prints
each model's test metrics and the accuracy on the kept images when 5%, 10% and 20% are
referred by predictive entropy. The run folder is never changed; ``--out`` writes the numbers
as JSON.

Usage::

    python benchmarks/recompute_bn_stats.py runs/brain-mri --data-dir ../shared/data --out runs/brain-mri-bn.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time

import pyro
import torch
from refit_temperature import (  # the benchmarks folder is on sys.path
    REFERRED_FRACTIONS,
    metrics_row,
    run_script_parser,
)

from pipelines.io import atomic_write_json
from pipelines.prediction import predict_bayesian, predict_deterministic
from pipelines.report import METRICS
from pipelines.runner import (
    build_hybrid,
    copy_config,
    fit_head_temperature,
    fit_head_two_stage,
    read_run_report,
    reload_run,
    stored_config,
)
from pipelines.training import recompute_batchnorm_statistics, seed_everything


def parse_args(argv=None) -> argparse.Namespace:
    parser = run_script_parser(__doc__.splitlines()[0],
                               "output folder of a finished 'bayeshead run' with --scheme two-stage",
                               "device to predict and refit on (default: the run's)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        report = read_run_report(args.run_dir)
        config = stored_config(report, args.data_dir, args.device)
        if config.likelihood != "categorical" or config.scheme != "two-stage":
            raise ValueError("the script refits a two-stage classification head; this run has "
                             f"--scheme {config.scheme} and --likelihood {config.likelihood}")
        if config.recompute_bn_stats:
            raise ValueError("this run already recomputed its batch-norm statistics")
        reloaded = reload_run(args.run_dir, report, config)
    except (ValueError, FileNotFoundError) as error:
        print(f"recompute_bn_stats: error: {error}", file=sys.stderr)
        return 2
    data, models, loaders = reloaded.data, reloaded.models, reloaded.loaders
    config = copy_config(config, progress=False)

    def bayesian_row(hybrid, guide):
        prediction = predict_bayesian(hybrid, guide, loaders["test"], config.num_samples, seed=config.seed)
        return {"temperature": float(hybrid.temperature), **metrics_row(prediction)}

    rows = {
        "CNN, running statistics": metrics_row(predict_deterministic(models.deterministic, loaders["test"])),
        "Bayesian head, running statistics": bayesian_row(models.hybrid, models.guide),
    }

    start = time.perf_counter()
    layers = recompute_batchnorm_statistics(models.deterministic.backbone, loaders["train_plain"])
    recompute_seconds = time.perf_counter() - start
    rows["CNN, recomputed statistics"] = metrics_row(predict_deterministic(models.deterministic, loaders["test"]))

    start = time.perf_counter()
    seed_everything(config.seed)
    pyro.clear_param_store()
    hybrid = build_hybrid(config, data.in_channels, data.num_classes).to(reloaded.device)
    guide, _, _, _ = fit_head_two_stage(config, hybrid, models.deterministic, loaders["train_plain"])
    fit_head_temperature(config, hybrid, guide, loaders["val"])
    head_seconds = time.perf_counter() - start
    rows["Bayesian head, recomputed statistics"] = bayesian_row(hybrid, guide)

    keys = (*METRICS, *(f"accuracy_at_{round(f * 100)}pct_referred" for f in REFERRED_FRACTIONS))
    print(f"{args.run_dir}: {len(data.test)} test images; statistics of {layers} batch-norm layers recomputed on "
          f"{len(data.train)} training images in {recompute_seconds:.1f} s; head and temperature refitted in "
          f"{head_seconds:.1f} s")
    print("| model | T | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, row in rows.items():
        temperature = f"{row['temperature']:.4f}" if "temperature" in row else "-"
        print(f"| {name} | {temperature} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    if args.out is not None:
        atomic_write_json(args.out, {"run_dir": str(args.run_dir.resolve()), "rows": rows,
                                     "recompute_seconds": recompute_seconds, "head_seconds": head_seconds,
                                     "num_train": len(data.train), "num_test": len(data.test),
                                     "machine": platform.platform(), "torch_threads": torch.get_num_threads()})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
