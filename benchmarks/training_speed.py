"""Time one epoch of joint SVI training of the hybrid against one epoch of deterministic training.

Prints, from one run on one machine:

- ``ratio joint SVI epoch / deterministic epoch``: ``train_hybrid`` (backbone and Bayesian head
  trained together on the ELBO, one particle) divided by ``train_deterministic`` (cross-entropy)
  on the same CIFAR-10 training subset, batch size, augmentation and optimizer. Target: at most
  1.10.
- ``ratio joint SVI epoch, 4 vectorised particles / deterministic epoch``, for reference.
- the cost of the ``pyro.plate`` subsample draw per step, a ``torch.randperm`` over the whole
  training set, as a share of one SVI step.
- the work of Pyro's ELBO alone (tracing, guide, log densities, backward) on cached features,
  against a cross-entropy step on the same features, as a share of one SVI step.

Usage::

    python benchmarks/training_speed.py [--device cpu|cuda] [--data-dir DIR] [--quick]
"""

from __future__ import annotations

import time

import benchlib
import torch

from pipelines.training import make_elbo, train_deterministic, train_hybrid

TRAIN_IMAGES, QUICK_TRAIN_IMAGES = 5_000, 256
# The plate in models.heads.data_plate has size num_data: 45,000 for the full CIFAR-10 run.
FULL_TRAIN_SIZE = 45_000
TARGET = 1.10
OPTIONS = {"epochs": 1, "lr": 0.003, "weight_decay": 0.05, "progress": False}


def time_subsample_draw(size: int, device: torch.device, repeats: int = 200) -> float:
    """Seconds of one ``torch.randperm(size)`` on the device Pyro's plate uses by default (CPU)."""
    torch.randperm(size)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.randperm(size)
    return (time.perf_counter() - start) / repeats


def time_head_step(hybrid, guide, features: torch.Tensor, labels: torch.Tensor, num_data: int,
                   repeats: int = 50) -> tuple[float, float]:
    """Seconds of one head-only step: Pyro's ELBO with backward, and cross-entropy with backward.

    Both run on the same cached features, so the difference is the work of Pyro's tracing,
    the guide and the log densities, without the backbone.
    """
    objective = make_elbo("trace")
    weight = torch.nn.Parameter(torch.zeros(benchlib.NUM_CLASSES, features.shape[1], device=features.device))

    def elbo_step():
        loss = objective.differentiable_loss(hybrid.head.model, guide, features, labels, num_data) / num_data
        loss.backward()

    def cross_entropy_step():
        loss = torch.nn.functional.cross_entropy(features @ weight.T, labels)
        loss.backward()

    results = []
    for step in (elbo_step, cross_entropy_step):
        step()
        benchlib.synchronize(features.device)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        benchlib.synchronize(features.device)
        results.append((time.perf_counter() - start) / repeats)
    return results[0], results[1]


def main(argv=None) -> int:
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device = benchlib.setup(args)
    count = benchlib.split_size(args, TRAIN_IMAGES, QUICK_TRAIN_IMAGES)
    train = benchlib.load_cifar10_split(args.data_dir, "train", count, args.seed)
    stats = benchlib.normalization(train)
    deterministic, hybrid, guide = benchlib.build_models(device, args.seed)
    loader = benchlib.training_loader(train, stats, device, args.seed)
    print(f"# one training epoch: {len(train)} CIFAR-10 training images, batches of {loader.batch_size} "
          f"({len(loader)} steps), crop-flip augmentation, AdamW, median of {args.repeats} interleaved runs")

    tasks = {
        "deterministic epoch": lambda: train_deterministic(deterministic, loader, **OPTIONS),
        "joint SVI epoch": lambda: train_hybrid(hybrid, guide, loader, **OPTIONS),
        "joint SVI epoch, 4 vectorised particles": lambda: train_hybrid(hybrid, guide, loader, num_particles=4,
                                                                         **OPTIONS),
    }
    wall, cpu = benchlib.time_interleaved(tasks, args.repeats, device)
    benchlib.print_times(wall, cpu)
    benchlib.print_ratios(wall, cpu, "joint SVI epoch", "deterministic epoch", "joint SVI epoch / deterministic epoch",
                          TARGET)
    particles = "joint SVI epoch, 4 vectorised particles"
    benchlib.print_ratios(wall, cpu, particles, "deterministic epoch", f"{particles} / deterministic epoch")

    step = benchlib.median(wall["joint SVI epoch"]) / len(loader)
    images, labels = next(iter(loader))
    elbo_seconds, cross_entropy_seconds = time_head_step(hybrid, guide, hybrid.features(images), labels,
                                                         loader.num_data)
    print(f"head-only step on cached features (batch of {len(labels)}): Pyro Trace_ELBO {elbo_seconds * 1e3:.2f} ms, "
          f"cross-entropy {cross_entropy_seconds * 1e3:.2f} ms; the difference is "
          f"{100 * (elbo_seconds - cross_entropy_seconds) / step:.2f}% of one SVI step")
    draw = time_subsample_draw(FULL_TRAIN_SIZE, device)
    print(f"plate subsample draw (randperm of {FULL_TRAIN_SIZE}): {draw * 1e3:.3f} ms per step, "
          f"{100 * draw / step:.2f}% of one SVI step ({step * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
