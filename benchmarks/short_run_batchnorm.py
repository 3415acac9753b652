"""Show why very short runs can predict at chance: batch norm's running statistics.

Trains the CNN of ``bayeshead run --dataset digits`` for a few epochs and prints its test
accuracy three times: in eval mode, which uses the running statistics that prediction uses;
with the statistics of each test batch; and in eval mode again after
``pipelines.training.recompute_batchnorm_statistics`` has replaced the running statistics by
those of one pass over the unaugmented training images. When the first two differ widely, the
running statistics (momentum 0.1) have not settled in the few optimizer steps taken.

Usage::

    python benchmarks/short_run_batchnorm.py --epochs 1 3
"""

from __future__ import annotations

import argparse
import sys

import torch

from models import DeterministicClassifier
from pipelines.config import RunConfig
from pipelines.runner import build_backbone, load_config_data, make_loaders, optimizer_options
from pipelines.training import recompute_batchnorm_statistics, seed_everything, train_deterministic


@torch.no_grad()
def accuracy_on(model: torch.nn.Module, loader, batch_statistics: bool) -> float:
    """Return the accuracy on ``loader``, with batch norm in train mode when ``batch_statistics``."""
    model.train(batch_statistics)
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(1) == labels).sum())
        total += len(labels)
    return correct / total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3], help="epoch counts to try (default: 1 3)")
    args = parser.parse_args(argv)
    print("| epochs | optimizer steps | accuracy, running statistics | accuracy, batch statistics "
          "| accuracy, recomputed statistics |")
    print("|---|---|---|---|---|")
    for epochs in args.epochs:
        config = RunConfig(dataset="digits", epochs=epochs, progress=False).validate()
        data = load_config_data(config)
        loaders = make_loaders(config, data, torch.device("cpu"))
        seed_everything(config.seed)
        model = DeterministicClassifier(build_backbone(config, data.in_channels), data.num_classes)
        train_deterministic(model, loaders["train"], epochs=epochs, **optimizer_options(config), progress=False)
        steps = epochs * -(-len(data.train) // config.batch_size)
        running = accuracy_on(model, loaders["test"], False)
        batch = accuracy_on(model, loaders["test"], True)
        recompute_batchnorm_statistics(model.backbone, loaders["train_plain"])
        recomputed = accuracy_on(model, loaders["test"], False)
        print(f"| {epochs} | {steps} | {running:.3f} | {batch:.3f} | {recomputed:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
