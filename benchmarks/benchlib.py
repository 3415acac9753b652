"""Shared setup of the benchmark scripts: options, CIFAR-10 splits, models, timing and memory.

The scripts time the project's own code paths against each other in one process, on the same
data and machine, and print ratios. They are not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyro
import torch

from guides import make_guide
from models import BayesianLinearHead, CNNBackbone, DeterministicClassifier, HybridClassifier
from pipelines.data import (
    CIFAR10_CLASSES,
    BatchIterator,
    DataError,
    ImageSet,
    channel_stats,
    find_split,
    list_image_folder,
    load_cifar_pickles,
    load_images_cached,
    subset_indices,
)
from pipelines.training import select_device

REPO_ROOT = Path(__file__).resolve().parents[1]

# The project's defaults: 3 blocks of 2 convolutions, prediction in batches of 500 images
# (pipelines.runner.PREDICT_BATCH_SIZE) and training batches of 128 (RunConfig.batch_size).
WIDTHS = (32, 64, 128)
CONVS_PER_BLOCK = 2
PREDICT_BATCH_SIZE = 500
TRAIN_BATCH_SIZE = 128
NUM_CLASSES = 10


def default_data_dir() -> str:
    return os.environ.get("BAYESHEAD_DATA", str(REPO_ROOT.parent / "shared" / "data"))


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every benchmark script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to time on (default: cpu)")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="folder holding cifar10-jpeg/ or cifar-10-batches-py/ "
                             "(default: $BAYESHEAD_DATA, else ../shared/data)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: few images, one repeat; the ratios are not meaningful")
    parser.add_argument("--subset", type=int, metavar="N",
                        help="use at most N images of each split (default: the sizes stated by each script)")
    parser.add_argument("--repeats", type=int, metavar="R",
                        help="timed repeats of each measurement, interleaved; the median is reported "
                             "(default: 3, or 1 with --quick)")
    parser.add_argument("--threads", type=int, metavar="T",
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsets and the models (default: 0)")
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply the common options and print the machine line; returns the device."""
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if args.subset is not None and args.subset < 1:
        raise SystemExit(f"--subset must be at least 1, got {args.subset}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    pyro.set_rng_seed(args.seed)
    print(describe_machine(device))
    return device


def describe_machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return (
        f"# {datetime.date.today().isoformat()} | device {device} ({name}) | {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()} | torch {torch.__version__}, pyro {pyro.__version__}, "
        f"python {platform.python_version()}"
    )


def split_size(args: argparse.Namespace, full: int, quick: int) -> int:
    """Images to use: ``--subset`` if given, else ``quick`` with ``--quick``, else ``full``."""
    if args.subset is not None:
        return args.subset
    return quick if args.quick else full


def load_cifar10_split(data_dir: str | Path, split: str, limit: int | None, seed: int = 0) -> ImageSet:
    """Load a seeded subset of one CIFAR-10 split (``train`` or ``test``) from JPEG folders or pickles."""
    root = Path(data_dir).expanduser()
    jpeg_root = root / "cifar10-jpeg"
    if jpeg_root.is_dir():
        split_dir = find_split(jpeg_root, (split,))
        if split_dir is None:
            raise DataError(f"missing {jpeg_root / split}; expected {jpeg_root}/{{train,test}}/<class>/*.jpg")
        paths, labels, _ = list_image_folder(split_dir, CIFAR10_CLASSES)
        keep = subset_indices(len(paths), limit, seed)
        images = load_images_cached([paths[i] for i in keep], "RGB", None)
        return ImageSet(images, torch.tensor([labels[i] for i in keep]))
    if (root / "cifar-10-batches-py").is_dir():
        train, test, _ = load_cifar_pickles(root, "cifar10")
        images = train if split == "train" else test
        return images.take(subset_indices(len(images), limit, seed))
    raise DataError(
        f"no CIFAR-10 data under {root}: expected {jpeg_root}/{{train,test}}/ or {root}/cifar-10-batches-py/; "
        "pass --data-dir or set BAYESHEAD_DATA"
    )


def normalization(images: ImageSet) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation from at most the first 1,000 images.

    ``channel_stats`` converts its input to float64; on 10,000 images that transient (about
    250 MB) would raise the peak RSS that ``peak_memory.py`` reads before a task even starts.
    """
    return channel_stats(images.images[:1000])


def prediction_loader(images: ImageSet, stats, device, batch_size: int = PREDICT_BATCH_SIZE) -> BatchIterator:
    mean, std = stats
    return BatchIterator(images, batch_size, mean, std, device=device)


def training_loader(images: ImageSet, stats, device, seed: int) -> BatchIterator:
    mean, std = stats
    return BatchIterator(images, TRAIN_BATCH_SIZE, mean, std, device=device, shuffle=True, augment="crop-flip",
                         generator=torch.Generator().manual_seed(seed))


def build_models(device, seed: int = 0, guide_kind: str = "normal"):
    """Build an untrained deterministic CNN, the hybrid with the same layout and a guide over its head.

    Timings do not depend on the weights, so nothing is trained. The guide is built as
    ``pipelines.runner.build_guide`` builds it (initial scale 0.01) and has run once.
    """
    torch.manual_seed(seed)
    pyro.clear_param_store()
    deterministic = DeterministicClassifier(CNNBackbone(3, WIDTHS, CONVS_PER_BLOCK), NUM_CLASSES).to(device)
    backbone = CNNBackbone(3, WIDTHS, CONVS_PER_BLOCK)
    hybrid = HybridClassifier(backbone, BayesianLinearHead(backbone.out_features, NUM_CLASSES)).to(device)
    example = torch.randn(2, 3, 32, 32, device=device)
    features = hybrid.features(example)
    targets = torch.zeros(2, dtype=torch.long, device=device)
    guide = make_guide(hybrid.head.model, guide_kind, init_scale=0.01)
    guide(features, targets)
    deterministic.eval()
    hybrid.eval()
    return deterministic, hybrid, guide


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(tasks: dict[str, Callable[[], object]], repeats: int,
                     device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds of each task, run ``repeats`` times in turn after one warm-up.

    The tasks run as A B C A B C ..., which spreads slow drifts of the machine (frequency,
    other load) over all tasks alike. Process CPU time (all threads of this process) counts
    the work done and varies less than wall time when other jobs share the CPUs. Waiting
    threads may still spin and add to it. On CUDA, CPU time misses the GPU's work, so only
    wall time is meaningful there.
    """
    for task in tasks.values():
        task()
    synchronize(device)
    wall = {name: [] for name in tasks}
    cpu = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            synchronize(device)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            task()
            synchronize(device)
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def print_times(wall: dict[str, list[float]], cpu: dict[str, list[float]], suffix: str = "") -> None:
    for name in wall:
        print(f"time {name}{suffix}: wall {format_seconds(wall[name])}; CPU {format_seconds(cpu[name])}")


def print_ratios(wall: dict[str, list[float]], cpu: dict[str, list[float]], numerator: str, denominator: str,
                 label: str, target: float | None = None) -> None:
    """Print the wall-time ratio of two tasks' medians and, tagged ``[CPU time]``, their CPU-time ratio."""
    print_ratio(label, median(wall[numerator]) / median(wall[denominator]), target)
    print_ratio(f"{label} [CPU time]", median(cpu[numerator]) / median(cpu[denominator]), target)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def format_seconds(values: list[float]) -> str:
    return f"median {median(values):.3f} s (runs {', '.join(f'{v:.3f}' for v in values)})"


def print_ratio(label: str, value: float, target: float | None = None) -> None:
    """Print one result line, ``ratio <label>: <value>``, which tests parse."""
    verdict = ""
    if target is not None:
        verdict = f"  (target <= {target:.2f}: {'met' if value <= target else 'MISSED'})"
    print(f"ratio {label}: {value:.3f}{verdict}")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rows_sum_to_one(probs: np.ndarray) -> bool:
    return bool(np.allclose(probs.sum(axis=1), 1.0, atol=1e-9))
