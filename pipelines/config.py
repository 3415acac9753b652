"""The one configuration object that the CLI, TOML files and Python callers fill."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from guides.autoguides import GUIDE_NAMES
from models.priors import HYPERPRIOR_NAMES, PRIOR_NAMES
from pipelines.data import DATASET_NAMES

DEVICES = ("auto", "cpu", "cuda")
ELBOS = ("trace", "meanfield")
SCHEMES = ("joint", "two-stage")
# Choices of --temperature. "validation" fits one temperature of the Bayesian head's logits on the
# validation split (pipelines.runner.fit_head_temperature), and "none" keeps the head as trained.
TEMPERATURES = ("validation", "none")
LIKELIHOOD_NAMES = ("categorical", "gaussian")
# Datasets of the regression pipeline (pipelines/regression.py), used with --likelihood gaussian.
REGRESSION_DATASET_NAMES = ("tabular",)
# Guides whose posterior over the head is a diagonal Gaussian, the one local reparameterization samples.
LOCAL_REPARAMETERIZATION_GUIDE_NAMES = ("normal", "diagonal", "meanfield")

# Epochs when --epochs is not given: enough for the default recipe to converge on each preset.
DEFAULT_EPOCHS = {"digits": 30, "cifar10": 20, "cifar100": 20, "image-folder": 15, "brain-mri": 22,
                  "tabular": 50}
# The backbone's optimizer when --optimizer is not given. SGD with Nesterov momentum generalises
# better on images: on CIFAR-10 the AdamW recipe stopped at 0.837 test accuracy. AdamW is the
# robust choice for the small bundled and tabular sets.
OPTIMIZERS = ("sgd", "adamw")
# Output channels of the CNN's blocks when --widths is not given. Brain MRI scans are larger than
# CIFAR's 32 pixels: five blocks that start narrow see more of the scan per feature and cost less
# than three wide blocks at that size (docs/medical.md).
FALLBACK_WIDTHS = (32, 64, 128)
DEFAULT_WIDTHS = {"brain-mri": (16, 32, 64, 128, 256)}
DEFAULT_OPTIMIZER = {"digits": "adamw", "tabular": "adamw"}
# Peak learning rate and weight decay (on kernels) of each optimizer's recipe.
OPTIMIZER_DEFAULTS = {"sgd": {"lr": 0.1, "weight_decay": 5e-4}, "adamw": {"lr": 0.003, "weight_decay": 0.05}}


class ConfigError(ValueError):
    """An option has an invalid value; the message names the option and the valid values."""


class RunFolderError(ValueError):
    """A run folder's ``report.json`` is not a readable report of ``bayeshead run``."""


def default_data_dir() -> str:
    return os.environ.get("BAYESHEAD_DATA", "data")


@dataclass
class RunConfig:
    """Every option of a run. Field names are the CLI flags with ``-`` replaced by ``_``."""

    dataset: str = "digits"
    data_dir: str = field(default_factory=default_data_dir)
    out: str = "runs/latest"
    epochs: int | None = None
    batch_size: int = 128
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    guide_lr: float = 0.003
    num_samples: int = 20
    local_reparameterization: bool = False
    subset: int | None = None
    val_fraction: float = 0.1
    image_size: int | None = None
    device: str = "auto"
    seed: int = 0
    download: bool = False
    drop_leaked: bool = False
    widths: tuple[int, ...] | None = None
    convs_per_block: int = 2
    # Bayesian head
    prior: str = "normal"
    prior_scale: float = 1.0
    prior_df: float = 3.0
    prior_pi: float = 0.5
    prior_sigma1: float = 1.0
    prior_sigma2: float = 0.0025
    hyperprior: str = "half-cauchy"
    guide: str = "normal"
    guide_rank: int = 10
    init_scale: float = 0.01
    elbo: str = "trace"
    num_particles: int = 1
    kl_weight: float = 1.0
    kl_warmup_epochs: int = 0
    # two-stage: the Bayesian head is fitted on the trained CNN's frozen features. With the
    # temperature below, it beat the joint hybrid on CIFAR-10 (docs/results.md) at half the cost.
    scheme: str = "two-stage"
    head_epochs: int = 30
    temperature: str = "validation"
    # After training, replace batch norm's running statistics with those of one pass over the
    # unaugmented training images (pipelines.training.recompute_batchnorm_statistics). Off by
    # default so that runs stay comparable with the measured ones; it rescues very short runs.
    recompute_bn_stats: bool = False
    # Likelihood of the head: categorical (classification) or gaussian (regression). The
    # Gaussian noise scale is a positive number, fixed, or "learned" as a point estimate.
    likelihood: str = "categorical"
    noise_scale: float | str = "learned"
    progress: bool = True

    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.dataset]

    def resolved_widths(self) -> tuple[int, ...]:
        if self.widths is not None:
            return tuple(self.widths)
        return DEFAULT_WIDTHS.get(self.dataset, FALLBACK_WIDTHS)

    def resolved_optimizer(self) -> str:
        return self.optimizer or DEFAULT_OPTIMIZER.get(self.dataset, "sgd")

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else OPTIMIZER_DEFAULTS[self.resolved_optimizer()]["lr"]

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return OPTIMIZER_DEFAULTS[self.resolved_optimizer()]["weight_decay"]

    def prior_params(self) -> dict:
        """Keyword arguments of :func:`models.priors.make_prior` for the chosen prior."""
        if self.prior in ("normal", "laplace"):
            return {"scale": self.prior_scale}
        if self.prior == "student-t":
            return {"df": self.prior_df, "scale": self.prior_scale}
        if self.prior == "scale-mixture":
            return {"pi": self.prior_pi, "sigma1": self.prior_sigma1, "sigma2": self.prior_sigma2}
        return {"hyperprior": self.hyperprior, "scale": self.prior_scale}

    def fixed_noise_scale(self) -> float | None:
        """Return the Gaussian noise scale as a number, or ``None`` when it is learned."""
        return None if self.noise_scale == "learned" else float(self.noise_scale)

    def validate(self) -> RunConfig:
        """Raise :class:`ConfigError` for the first invalid option; return ``self``."""
        choices = {
            "dataset": DATASET_NAMES + REGRESSION_DATASET_NAMES, "device": DEVICES, "prior": PRIOR_NAMES,
            "guide": GUIDE_NAMES, "elbo": ELBOS, "scheme": SCHEMES, "hyperprior": HYPERPRIOR_NAMES,
            "likelihood": LIKELIHOOD_NAMES, "optimizer": (None,) + OPTIMIZERS, "temperature": TEMPERATURES,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                names = ", ".join(v for v in valid if v is not None)
                raise ConfigError(f"invalid {_flag(name)} {getattr(self, name)!r}; valid values: {names}")
        positive_ints = ["batch_size", "num_samples", "num_particles", "guide_rank", "convs_per_block", "head_epochs"]
        for name in positive_ints + ["epochs", "subset", "image_size"]:
            value = getattr(self, name)
            if value is None and name not in positive_ints:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"invalid {_flag(name)} {value!r}; expected a positive integer")
        for name in ["lr", "guide_lr", "prior_scale", "init_scale", "prior_df", "prior_sigma1", "prior_sigma2"]:
            if getattr(self, name) is None and name == "lr":
                continue
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"invalid {_flag(name)} {getattr(self, name)!r}; expected a positive number")
        for name in ["weight_decay", "kl_weight"]:
            if getattr(self, name) is None and name == "weight_decay":
                continue
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"invalid {_flag(name)} {getattr(self, name)!r}; expected a number >= 0")
        if self.kl_warmup_epochs < 0:
            raise ConfigError(f"invalid --kl-warmup-epochs {self.kl_warmup_epochs}; expected an integer >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"invalid --val-fraction {self.val_fraction}; expected a number in [0, 1)")
        if not 0 < self.prior_pi < 1:
            raise ConfigError(f"invalid --prior-pi {self.prior_pi}; expected a number in (0, 1)")
        if self.widths is not None and (not self.widths or any(int(w) < 1 for w in self.widths)):
            raise ConfigError(f"invalid --widths {self.widths}; expected positive integers")
        if self.drop_leaked and self.dataset != "brain-mri":
            raise ConfigError(f"--drop-leaked applies to --dataset brain-mri only, got --dataset {self.dataset}")
        self._validate_likelihood()
        self._validate_local_reparameterization()
        return self

    def _validate_local_reparameterization(self) -> None:
        """Reject --local-reparameterization settings that prediction would reject after training."""
        if not self.local_reparameterization:
            return
        if self.guide not in LOCAL_REPARAMETERIZATION_GUIDE_NAMES:
            raise ConfigError(
                f"--local-reparameterization needs a mean-field Gaussian guide, got --guide {self.guide}; "
                f"valid values with it: {', '.join(LOCAL_REPARAMETERIZATION_GUIDE_NAMES)}"
            )
        if self.likelihood != "categorical":
            raise ConfigError("--local-reparameterization samples logits, so it needs --likelihood categorical")
        if self.prior == "hierarchical":
            raise ConfigError(
                "--local-reparameterization needs a guide over exactly the head's weight and bias, but "
                "--prior hierarchical adds a scale site; choose another prior"
            )

    def _validate_likelihood(self) -> None:
        noise = self.noise_scale
        if noise != "learned":
            if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 < noise < float("inf"):
                raise ConfigError(f"invalid --noise-scale {noise!r}; expected a positive number or 'learned'")
        regression_data = self.dataset in REGRESSION_DATASET_NAMES
        if self.likelihood == "gaussian" and not regression_data:
            raise ConfigError(
                f"--likelihood gaussian needs a regression dataset ({', '.join(REGRESSION_DATASET_NAMES)}), "
                f"got --dataset {self.dataset}; use --dataset tabular --data-dir FILE.csv"
            )
        if regression_data and self.likelihood != "gaussian":
            raise ConfigError(f"--dataset {self.dataset} has real-valued targets; add --likelihood gaussian")
        if self.prior == "laplace" and self.guide == "laplace" and self.likelihood == "categorical":
            raise ConfigError(
                "--guide laplace cannot follow --prior laplace with a categorical likelihood: the "
                "laplace prior has no curvature along the softmax's shift direction, so the Hessian "
                "at the MAP is singular; choose another prior or guide"
            )

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["widths"] = list(self.resolved_widths())
        data["epochs"] = self.resolved_epochs()
        data["optimizer"] = self.resolved_optimizer()
        data["lr"] = self.resolved_lr()
        data["weight_decay"] = self.resolved_weight_decay()
        return data

    @classmethod
    def from_report(cls, data: dict) -> RunConfig:
        """Rebuild the config stored in a run's ``report.json`` (unvalidated).

        Runs from before the ``temperature`` option predicted without one, so a stored config
        that lacks it gets ``"none"``, not today's default.
        """
        return cls.from_dict({"temperature": "none", **data})

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
        values = dict(data)
        if values.get("widths") is not None:
            values["widths"] = tuple(int(w) for w in values["widths"])
        return cls(**values)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_toml(path: str | Path) -> dict:
    """Read a TOML config file; keys may use ``-`` or ``_``. Returns the option dict."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    options = {}
    for key, value in raw.items():
        if isinstance(value, dict):  # allow [model], [guide] ... tables for grouping
            options.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            options[key.replace("-", "_")] = value
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
    return options
