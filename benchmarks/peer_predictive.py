"""Time the predictive of two peer libraries, TyXe and laplace-torch, against ours on one backbone.

Every model here has the project's default backbone (3 blocks of 2 convolutions, widths 32,
64, 128) and a 10-class linear last layer, untrained. Each peer uses its own predictive:

- TyXe (``tyxe.VariationalBNN`` with an ``IIDPrior`` that exposes only the last layer, a
  mean-field ``tyxe.guides.AutoNormal``): ``predict(x, num_predictions=20)``, which runs the
  whole network once per sample. Timed on a subset, against ours on the same subset.
- laplace-torch (last-layer Laplace, diagonal Hessian, fitted on a small training subset
  before timing): ``la(x, pred_type="nn", link_approx="mc", n_samples=20)``, which caches the
  features and samples the last layer, and ``la(x)`` with its default GLM predictive and probit
  approximation (no sampling). Timed on the whole test set, against ours on the same images.

A peer that is not installed or fails is reported as skipped. Install both with
``pip install -e ".[peers]"`` (laplace-torch and tyxe; neither changes the installed torch).

Usage::

    python benchmarks/peer_predictive.py [--device cpu|cuda] [--data-dir DIR] [--quick]
"""

from __future__ import annotations

import warnings
from functools import partial

import benchlib
import torch
from torch import nn

from models import CNNBackbone
from pipelines.prediction import predict_bayesian

TEST_IMAGES, QUICK_TEST_IMAGES = 10_000, 200
TYXE_IMAGES, QUICK_TYXE_IMAGES = 1_000, 100
FIT_IMAGES, QUICK_FIT_IMAGES = 1_000, 64
NUM_SAMPLES = 20


def plain_network(device) -> nn.Sequential:
    backbone = CNNBackbone(3, benchlib.WIDTHS, benchlib.CONVS_PER_BLOCK)
    return nn.Sequential(backbone, nn.Linear(backbone.out_features, benchlib.NUM_CLASSES)).to(device).eval()


def build_tyxe(device, num_data: int, example: torch.Tensor):
    """TyXe's predict over a last-layer BNN; returns ``(predict, guide_label)``.

    TyXe's own ``tyxe.guides.AutoNormal`` is tried first. With tyxe 0.0.2 and pyro 1.9.2 it
    fails, because it calls ``pyro.util.deep_getattr``, which Pyro no longer has. TyXe's
    ``VariationalBNN`` then gets Pyro's ``AutoNormal`` as its guide builder, which its API
    accepts, and the row's label names the guide used.
    """
    with warnings.catch_warnings():
        # tyxe 0.0.2 imports code decorated with torch.jit.script, which torch 2.14 deprecates.
        warnings.simplefilter("ignore", FutureWarning)
        import pyro
        import pyro.distributions as dist
        import tyxe
        from pyro.infer.autoguide import AutoNormal

    builders = {"tyxe.guides.AutoNormal": tyxe.guides.AutoNormal, "pyro AutoNormal": AutoNormal}
    for label, builder in builders.items():
        pyro.clear_param_store()
        net = plain_network(device)
        normal = dist.Normal(torch.tensor(0.0, device=device), torch.tensor(1.0, device=device))
        prior = tyxe.priors.IIDPrior(normal, expose_all=False, expose_modules=[net[1]])
        likelihood = tyxe.likelihoods.Categorical(num_data)
        bnn = tyxe.VariationalBNN(net, prior, likelihood, partial(builder, init_scale=0.01))
        try:
            with torch.no_grad():
                bnn.predict(example, num_predictions=1)  # creates the guide's parameters
        except AttributeError as error:
            print(f"note: TyXe with {label} failed ({error}); trying the next guide")
            continue
        net.eval()
        break
    else:
        raise RuntimeError("TyXe failed with every guide tried")

    @torch.no_grad()
    def predict(loader):
        return torch.cat([bnn.predict(images, num_predictions=NUM_SAMPLES).softmax(-1) for images, _ in loader])

    return predict, label


def build_laplace(device, fit_loader):
    with warnings.catch_warnings():
        # laplace-torch's dependencies use torch.jit.script, which torch 2.14 deprecates.
        warnings.simplefilter("ignore", FutureWarning)
        from laplace import Laplace

    net = plain_network(device)
    la = Laplace(net, "classification", subset_of_weights="last_layer", hessian_structure="diag")
    la.fit(fit_loader)

    @torch.no_grad()
    def predict_mc(loader):
        return torch.cat([la(images, pred_type="nn", link_approx="mc", n_samples=NUM_SAMPLES) for images, _ in loader])

    @torch.no_grad()
    def predict_glm(loader):
        return torch.cat([la(images) for images, _ in loader])

    return predict_mc, predict_glm


def torch_fit_loader(args, device):
    """Build a ``torch.utils.data.DataLoader`` over normalised training images for laplace-torch's ``fit``."""
    count = benchlib.split_size(args, FIT_IMAGES, QUICK_FIT_IMAGES)
    train = benchlib.load_cifar10_split(args.data_dir, "train", count, args.seed)
    batches = benchlib.prediction_loader(train, benchlib.normalization(train), device, batch_size=len(train))
    images, labels = next(iter(batches))
    dataset = torch.utils.data.TensorDataset(images, labels)
    return torch.utils.data.DataLoader(dataset, batch_size=benchlib.TRAIN_BATCH_SIZE)


def compare(args, device, label: str, peer_tasks: dict, loader, hybrid, guide, images: int) -> None:
    tasks = {"ours": lambda: predict_bayesian(hybrid, guide, loader, num_samples=NUM_SAMPLES), **peer_tasks}
    wall, cpu = benchlib.time_interleaved(tasks, args.repeats, device)
    print(f"# {label}: {images} CIFAR-10 test images, S={NUM_SAMPLES}, median of {args.repeats} interleaved runs")
    benchlib.print_times(wall, cpu)
    for name in peer_tasks:
        benchlib.print_ratios(wall, cpu, name, "ours", f"{name} / ours S={NUM_SAMPLES}")


def main(argv=None) -> int:
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device = benchlib.setup(args)
    _, hybrid, guide = benchlib.build_models(device, args.seed)

    count = min(benchlib.split_size(args, TYXE_IMAGES, QUICK_TYXE_IMAGES), TYXE_IMAGES)
    test = benchlib.load_cifar10_split(args.data_dir, "test", count, args.seed)
    loader = benchlib.prediction_loader(test, benchlib.normalization(test), device)
    try:
        predict, guide_label = build_tyxe(device, len(test), next(iter(loader))[0][:2])
    except Exception as error:  # an optional peer: report why it is skipped and go on
        print(f"skipped tyxe: {type(error).__name__}: {error}")
    else:
        compare(args, device, "TyXe VariationalBNN.predict (whole network per sample)",
                {f"tyxe predict S={NUM_SAMPLES} (guide: {guide_label})": lambda: predict(loader)}, loader, hybrid, guide, len(test))

    count = benchlib.split_size(args, TEST_IMAGES, QUICK_TEST_IMAGES)
    test = benchlib.load_cifar10_split(args.data_dir, "test", count, args.seed)
    loader = benchlib.prediction_loader(test, benchlib.normalization(test), device)
    try:
        predict_mc, predict_glm = build_laplace(device, torch_fit_loader(args, device))
    except Exception as error:  # an optional peer: report why it is skipped and go on
        print(f"skipped laplace-torch: {type(error).__name__}: {error}")
    else:
        compare(args, device, "laplace-torch last-layer Laplace (diagonal Hessian)",
                {f"laplace-torch nn mc S={NUM_SAMPLES}": lambda: predict_mc(loader),
                 "laplace-torch glm probit": lambda: predict_glm(loader)},
                loader, hybrid, guide, len(test))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
