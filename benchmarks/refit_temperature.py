"""Measure what the validation temperature changes on a run trained without one.

Runs made before ``--temperature`` existed (or with ``--temperature none``) predict with the
Bayesian head as trained. This script reloads such a run and fits the temperature on its
validation split exactly as ``bayeshead run`` now does (:func:`pipelines.runner.fit_head_temperature`).
It prints the Bayesian model's test metrics with and without the temperature. It also prints the
accuracy on the kept images when 5%, 10% and 20% are referred by predictive entropy. It never
changes the run folder, and the numbers go to ``--out`` as JSON.

Usage::

    python benchmarks/refit_temperature.py runs/brain-mri-96 --data-dir ../shared/data --out runs/brain-mri-96-temperature.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from pipelines.calibration import selective_risk_curve
from pipelines.io import atomic_write_json
from pipelines.prediction import predict_bayesian
from pipelines.report import METRICS, model_metrics
from pipelines.runner import (
    copy_config,
    fit_head_temperature,
    read_run_report,
    reload_run,
    stored_config,
)

REFERRED_FRACTIONS = (0.05, 0.1, 0.2)


def run_script_parser(description: str, run_help: str, device_help: str) -> argparse.ArgumentParser:
    """Build the options shared by the scripts that reload a finished run and print its metrics."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("run_dir", type=Path, help=run_help)
    parser.add_argument("--data-dir", default=None, help="data folder, if it moved since the run (default: the run's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help=device_help)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the numbers (default: print only)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = run_script_parser(__doc__.splitlines()[0], "output folder of a finished 'bayeshead run' (classification)",
                               "device to predict on (default: the run's)")
    return parser.parse_args(argv)


def metrics_row(predictions) -> dict:
    """Return the test metrics of ``predictions`` and their accuracy at each referred fraction."""
    curve = selective_risk_curve(predictions.probs, predictions.labels, predictions.predictive_entropy)
    row = model_metrics(predictions)
    row.update({f"accuracy_at_{round(f * 100)}pct_referred": curve.accuracy_at(f) for f in REFERRED_FRACTIONS})
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        report = read_run_report(args.run_dir)
        config = stored_config(report, args.data_dir, args.device)
        if config.likelihood != "categorical":
            raise ValueError("the run is a regression; the temperature applies to classification only")
        reloaded = reload_run(args.run_dir, report, config)
        if len(reloaded.data.val) == 0:
            raise ValueError("the run's validation split is empty, so there is nothing to fit the temperature on")
    except (ValueError, FileNotFoundError) as error:
        print(f"refit_temperature: error: {error}", file=sys.stderr)
        return 2
    data, models, loaders = reloaded.data, reloaded.models, reloaded.loaders

    rows = {}
    stored = models.hybrid.temperature
    rows["as stored"] = {"temperature": stored,
                         **metrics_row(predict_bayesian(models.hybrid, models.guide, loaders["test"], config.num_samples,
                                                 seed=config.seed))}
    start = time.perf_counter()
    fitted = fit_head_temperature(copy_config(config, temperature="validation"), models.hybrid, models.guide,
                                  loaders["val"])
    seconds = time.perf_counter() - start
    rows["validation temperature"] = {
        "temperature": fitted, "fit_seconds": seconds,
        **metrics_row(predict_bayesian(models.hybrid, models.guide, loaders["test"], config.num_samples, seed=config.seed)),
    }
    keys = (*METRICS, *(f"accuracy_at_{round(f * 100)}pct_referred" for f in REFERRED_FRACTIONS))
    print(f"{args.run_dir}: Bayesian model on {len(data.test)} test images, {config.num_samples} posterior samples; "
          f"temperature fitted on {len(data.val)} validation images in {seconds:.1f} s")
    print("| head | T | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | {row['temperature']:.4f} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    if args.out is not None:
        atomic_write_json(args.out, {"run_dir": str(args.run_dir.resolve()), "rows": rows,
                                     "num_val": len(data.val), "num_test": len(data.test),
                                     "machine": platform.platform(), "torch_threads": torch.get_num_threads()})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
