"""Add the input check to a brain-MRI run made before it existed, and measure it.

``bayeshead run --dataset brain-mri`` now fits an input check: the squared Mahalanobis
distance of a scan's backbone features to the nearest class mean, with the threshold at the
99% quantile of the validation scans (see :func:`pipelines.clinical.fit_input_check`). This
script fits the same check for an older run, saves ``input_check.pt`` into the run folder
(so ``bayeshead predict`` applies it), and prints how many MRI test scans and CIFAR-10
photographs it refers, with the AUROC between the two.

Usage::

    python benchmarks/fit_input_check.py runs/brain-mri-96 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipelines import clinical
from pipelines.runner import read_run_report, reload_run, stored_config
from pipelines.training import extract_features


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="output folder of a finished 'bayeshead run --dataset brain-mri'")
    parser.add_argument("--data-dir", default=None, help="data folder, if it moved since the run (default: the run's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        report = read_run_report(args.run_dir)
        config = stored_config(report, args.data_dir)
        if config.dataset != "brain-mri":
            raise ValueError(f"{args.run_dir} is a {config.dataset} run; the input check is for brain-mri")
        reloaded = reload_run(args.run_dir, report, config)
    except (ValueError, FileNotFoundError) as error:
        print(f"fit_input_check: error: {error}", file=sys.stderr)
        return 2
    data, models, loaders, device = reloaded.data, reloaded.models, reloaded.loaders, reloaded.device

    check, summary, test_distance = clinical.fit_run_input_check(args.run_dir, models, loaders)
    if check is None:
        print(f"fit_input_check: error: {summary['skipped']}", file=sys.stderr)
        return 2
    print(f"{args.run_dir}: threshold {check['threshold']:.2f} (the {check['quantile']:.0%} quantile on "
          f"{len(data.val)} validation scans); refers {summary['test_referred_fraction']:.1%} of "
          f"{len(data.test)} MRI test scans; saved {args.run_dir / clinical.INPUT_CHECK_FILE}")
    found = clinical.predict_photographs(config, data, models, device)
    if "skipped" in found:
        print(f"photographs: skipped ({found['skipped']})")
        return 0
    distance = clinical.input_distance(check, extract_features(models.hybrid.backbone, found["loader"])[0])
    auroc = clinical.ood_auroc({"d": test_distance}, {"d": distance})["d"]
    print(f"{found['num_images']} CIFAR-10 photographs: refers {(distance > check['threshold']).mean():.1%}; "
          f"AUROC against the MRI test scans {auroc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
