"""Measure the peak memory of prediction and training, each in a fresh process.

``ru_maxrss`` is the peak resident set size of a process over its whole life, so each task
runs in its own child process. The child loads the data and builds the models, reads its peak
RSS (``setup``), runs the task once, and reads it again (``peak``). ``peak - setup`` is what the
task added above everything set up before it. On CUDA the child also reports
``torch.cuda.max_memory_allocated`` for the task alone.

Usage::

    python benchmarks/peak_memory.py [--device cpu|cuda] [--data-dir DIR] [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import benchlib
import torch

TEST_IMAGES, QUICK_TEST_IMAGES = 10_000, 200
NAIVE_IMAGES, QUICK_NAIVE_IMAGES = 1_000, 100
TRAIN_IMAGES, QUICK_TRAIN_IMAGES = 5_000, 256

TASKS = (
    "predict deterministic",
    "predict bayesian S=20",
    "predict bayesian S=100",
    "predict bayesian S=1000",
    "predict bayesian S=1000 local reparameterization",
    "naive Predictive parallel=False S=20",
    "train deterministic epoch",
    "train joint SVI epoch",
)


def run_task(args, task: str) -> dict:
    """Set up, run ``task`` once in this process and return its memory figures."""
    from pipelines.prediction import predict_bayesian, predict_deterministic
    from pipelines.training import train_deterministic, train_hybrid

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = benchlib.select_device(args.device)
    if task.startswith("train"):
        count = benchlib.split_size(args, TRAIN_IMAGES, QUICK_TRAIN_IMAGES)
        images = benchlib.load_cifar10_split(args.data_dir, "train", count, args.seed)
        loader = benchlib.training_loader(images, benchlib.normalization(images), device, args.seed)
    else:
        full, quick = (NAIVE_IMAGES, QUICK_NAIVE_IMAGES) if task.startswith("naive") else (TEST_IMAGES, QUICK_TEST_IMAGES)
        count = benchlib.split_size(args, full, quick)
        images = benchlib.load_cifar10_split(args.data_dir, "test", count, args.seed)
        loader = benchlib.prediction_loader(images, benchlib.normalization(images), device)
    deterministic, hybrid, guide = benchlib.build_models(device, args.seed)
    setup_mib = benchlib.peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    options = {"epochs": 1, "lr": 0.003, "weight_decay": 0.05, "progress": False}
    if task == "predict deterministic":
        result = predict_deterministic(deterministic, loader)
    elif task.startswith("predict bayesian"):
        num_samples = int(task.split("S=")[1].split()[0])
        result = predict_bayesian(hybrid, guide, loader, num_samples=num_samples,
                                  local_reparameterization=task.endswith("local reparameterization"))
    elif task.startswith("naive"):
        from prediction_speed import naive_predictive

        result = naive_predictive(hybrid, guide, loader, 20, parallel=False)
    elif task == "train deterministic epoch":
        result = train_deterministic(deterministic, loader, **options)
    else:
        result = train_hybrid(hybrid, guide, loader, **options)
    benchlib.synchronize(device)

    figures = {"task": task, "images": len(images), "setup_mib": setup_mib, "peak_mib": benchlib.peak_rss_mib()}
    if device.type == "cuda":
        figures["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if hasattr(result, "probs"):
        figures["rows_sum_to_one"] = benchlib.rows_sum_to_one(result.probs)
    return figures


def _child_options(args) -> list[str]:
    """Return the options a child process needs to load the same data on the same device."""
    options = ["--device", args.device, "--data-dir", str(args.data_dir), "--seed", str(args.seed)]
    if args.quick:
        options.append("--quick")
    if args.subset is not None:
        options += ["--subset", str(args.subset)]
    if args.threads is not None:
        options += ["--threads", str(args.threads)]
    return options


def main(argv=None) -> int:
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", choices=TASKS, action="append", metavar="TASK",
                        help="measure only this task (repeatable; default: all of them)")
    parser.add_argument("--task", choices=TASKS, help="run one task in this process (used by the parent run)")
    args = parser.parse_args(argv)
    if args.task is not None:
        print(json.dumps(run_task(args, args.task)))
        return 0

    benchlib.setup(args)
    print("# peak memory, one fresh process per task; RSS from getrusage(RUSAGE_SELF).ru_maxrss; "
          "'adds' = peak after the task minus peak after loading data and building models")
    passed = _child_options(args)
    failures = 0
    for task in args.only or TASKS:
        command = [sys.executable, str(Path(__file__).resolve()), "--task", task, *passed]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            failures += 1
            print(f"memory {task}: FAILED (exit {completed.returncode}): {completed.stderr.strip().splitlines()[-1:]}")
            continue
        figures = json.loads(completed.stdout.strip().splitlines()[-1])
        line = (f"memory {task} ({figures['images']} images): peak RSS {figures['peak_mib']:.0f} MiB, "
                f"after setup {figures['setup_mib']:.0f} MiB, adds {figures['peak_mib'] - figures['setup_mib']:.0f} MiB")
        if "cuda_peak_mib" in figures:
            line += f", CUDA peak allocated {figures['cuda_peak_mib']:.0f} MiB"
        if "rows_sum_to_one" in figures:
            line += f", rows sum to 1: {figures['rows_sum_to_one']}"
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
