"""Time Monte-Carlo prediction of the hybrid against one deterministic forward pass.

Prints, from one run on one machine:

- ``ratio bayesian S=20 / deterministic`` (and S=100, and both with local reparameterization):
  ``predict_bayesian`` over the CIFAR-10 test set divided by ``predict_deterministic`` over the
  same images. Targets: at most 1.15 for S=20 and 1.3 for S=100.
- ``ratio naive Predictive ... / ours S=20``: ``pyro.infer.Predictive`` over the whole hybrid
  model (backbone included) divided by ``predict_bayesian``, both on the same smaller subset,
  because the naive path with ``parallel=False`` recomputes the backbone for every sample.

Usage::

    python benchmarks/prediction_speed.py [--device cpu|cuda] [--data-dir DIR] [--quick]
"""

from __future__ import annotations

import math

import benchlib
import torch
from pyro.infer import Predictive

from pipelines.prediction import predict_bayesian, predict_deterministic

TEST_IMAGES, QUICK_TEST_IMAGES = 10_000, 200
NAIVE_IMAGES, QUICK_NAIVE_IMAGES = 1_000, 100
TARGETS = {20: 1.15, 100: 1.3}


@torch.no_grad()
def naive_predictive(hybrid, guide, loader, num_samples: int, parallel: bool) -> torch.Tensor:
    """Log predictive probabilities from ``Predictive`` run over the whole hybrid model."""
    predictive = Predictive(hybrid.model, guide=guide, num_samples=num_samples, parallel=parallel,
                            return_sites=["logits"])
    log_probs = []
    for images, _ in loader:
        logits = predictive(images)["logits"].reshape(num_samples, len(images), -1)
        per_sample = torch.log_softmax(logits.double(), dim=-1)
        log_probs.append(torch.logsumexp(per_sample, dim=0) - math.log(num_samples))
    return torch.cat(log_probs)


def time_against_deterministic(args, device, deterministic, hybrid, guide) -> None:
    count = benchlib.split_size(args, TEST_IMAGES, QUICK_TEST_IMAGES)
    test = benchlib.load_cifar10_split(args.data_dir, "test", count, args.seed)
    loader = benchlib.prediction_loader(test, benchlib.normalization(test), device)
    print(f"# MC prediction vs one deterministic pass: {len(test)} CIFAR-10 test images, "
          f"batches of {loader.batch_size}, median of {args.repeats} interleaved runs")

    tasks = {"deterministic": lambda: predict_deterministic(deterministic, loader)}
    for num_samples in TARGETS:
        tasks[f"bayesian S={num_samples}"] = (
            lambda s=num_samples: predict_bayesian(hybrid, guide, loader, num_samples=s))
        tasks[f"bayesian S={num_samples} local reparameterization"] = (
            lambda s=num_samples: predict_bayesian(hybrid, guide, loader, num_samples=s,
                                                   local_reparameterization=True))
    wall, cpu = benchlib.time_interleaved(tasks, args.repeats, device)
    benchlib.print_times(wall, cpu)
    for name in tasks:
        if name == "deterministic":
            continue
        num_samples = int(name.split("S=")[1].split()[0])
        benchlib.print_ratios(wall, cpu, name, "deterministic", f"{name} / deterministic", TARGETS[num_samples])


def time_against_naive(args, device, hybrid, guide) -> None:
    count = min(benchlib.split_size(args, NAIVE_IMAGES, QUICK_NAIVE_IMAGES), NAIVE_IMAGES)
    test = benchlib.load_cifar10_split(args.data_dir, "test", count, args.seed)
    loader = benchlib.prediction_loader(test, benchlib.normalization(test), device)
    num_samples = 20
    print(f"# naive full-model Predictive vs ours, S={num_samples}: {len(test)} CIFAR-10 test images "
          f"(a subset: the naive path costs about S forward passes), same images for both")

    tasks = {
        "ours": lambda: predict_bayesian(hybrid, guide, loader, num_samples=num_samples),
        "naive Predictive parallel=False": lambda: naive_predictive(hybrid, guide, loader, num_samples, False),
        "naive Predictive parallel=True": lambda: naive_predictive(hybrid, guide, loader, num_samples, True),
    }
    wall, cpu = benchlib.time_interleaved(tasks, args.repeats, device)
    benchlib.print_times(wall, cpu, suffix=f" S={num_samples}")
    for name in ("naive Predictive parallel=False", "naive Predictive parallel=True"):
        benchlib.print_ratios(wall, cpu, name, "ours", f"{name} S={num_samples} / ours S={num_samples}")


def main(argv=None) -> int:
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device = benchlib.setup(args)
    deterministic, hybrid, guide = benchlib.build_models(device, args.seed)
    time_against_deterministic(args, device, deterministic, hybrid, guide)
    time_against_naive(args, device, hybrid, guide)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
