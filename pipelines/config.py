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
LIKELIHOOD_NAMES = ("categorical", "gaussian")
# Datasets of the regression pipeline (pipelines/regression.py), used with --likelihood gaussian.
REGRESSION_DATASET_NAMES = ("tabular",)

# Epochs when --epochs is not given: enough for the default recipe to converge on each preset.
DEFAULT_EPOCHS = {"digits": 30, "cifar10": 15, "cifar100": 15, "image-folder": 15, "brain-mri": 15,
                  "tabular": 50}


class ConfigError(ValueError):
    """An option has an invalid value; the message names the option and the valid values."""


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
    lr: float = 0.003
    weight_decay: float = 0.05
    num_samples: int = 20
    local_reparameterization: bool = False
    subset: int | None = None
    val_fraction: float = 0.1
    image_size: int | None = None
    device: str = "auto"
    seed: int = 0
    download: bool = False
    widths: tuple[int, ...] = (32, 64, 128)
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
    scheme: str = "joint"
    head_epochs: int = 30
    # Likelihood of the head: categorical (classification) or gaussian (regression). The
    # Gaussian noise scale is a positive number, fixed, or "learned" as a point estimate.
    likelihood: str = "categorical"
    noise_scale: float | str = "learned"
    progress: bool = True

    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.dataset]

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
            "likelihood": LIKELIHOOD_NAMES,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigError(f"invalid {_flag(name)} {getattr(self, name)!r}; valid values: {', '.join(valid)}")
        positive_ints = ["batch_size", "num_samples", "num_particles", "guide_rank", "convs_per_block", "head_epochs"]
        for name in positive_ints + ["epochs", "subset", "image_size"]:
            value = getattr(self, name)
            if value is None and name not in positive_ints:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"invalid {_flag(name)} {value!r}; expected a positive integer")
        for name in ["lr", "prior_scale", "init_scale", "prior_df", "prior_sigma1", "prior_sigma2"]:
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"invalid {_flag(name)} {getattr(self, name)!r}; expected a positive number")
        for name in ["weight_decay", "kl_weight"]:
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"invalid {_flag(name)} {getattr(self, name)!r}; expected a number >= 0")
        if self.kl_warmup_epochs < 0:
            raise ConfigError(f"invalid --kl-warmup-epochs {self.kl_warmup_epochs}; expected an integer >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"invalid --val-fraction {self.val_fraction}; expected a number in [0, 1)")
        if not 0 < self.prior_pi < 1:
            raise ConfigError(f"invalid --prior-pi {self.prior_pi}; expected a number in (0, 1)")
        if not self.widths or any(int(w) < 1 for w in self.widths):
            raise ConfigError(f"invalid --widths {self.widths}; expected positive integers")
        self._validate_likelihood()
        return self

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
        data["widths"] = list(self.widths)
        data["epochs"] = self.resolved_epochs()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
        values = dict(data)
        if "widths" in values:
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
