"""The command line: options, bad input, and the main job end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipelines.cli import build_parser, config_from_args, main
from pipelines.config import ConfigError, RunConfig


def _run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_help_documents_units_and_defaults():
    result = _run_cli("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines at the terminal width
    assert "--num-samples S posterior samples of the head per prediction (default: 20)" in text
    assert "$BAYESHEAD_DATA" in text


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["run", "--dataset", "mnist"], ["invalid choice: 'mnist'", "digits", "cifar10", "image-folder"]),
        (["run", "--epochs", "0"], ["--epochs", "expected a positive integer, got 0"]),
        (["run", "--num-samples", "0"], ["--num-samples", "expected a positive integer, got 0"]),
        (["run", "--device", "tpu"], ["invalid choice: 'tpu'", "auto", "cpu", "cuda"]),
        (["run", "--prior", "cauchy"], ["invalid choice: 'cauchy'", "laplace", "scale-mixture", "hierarchical"]),
    ],
)
def test_invalid_options_list_valid_values(args, fragments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_error(tmp_path, capsys):
    code = main(["run", "--device", "cuda", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2
    assert "CUDA is not available" in error
    assert "Traceback" not in error
    assert len(error.strip().splitlines()) == 1


def test_missing_data_dir_is_one_line_error(tmp_path):
    result = _run_cli("run", "--dataset", "cifar10", "--data-dir", str(tmp_path / "absent"),
                      "--out", str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("bayeshead: error")]
    assert len(error_lines) == 1
    assert str(tmp_path / "absent") in error_lines[0]
    assert "--download" in error_lines[0]


def test_evaluate_missing_run_dir(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert f"no report.json in {tmp_path}" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "absent")]) == 2
    assert f"run folder {tmp_path / 'absent'} not found" in capsys.readouterr().err
    (tmp_path / "report.json").write_text("[1, 2]")
    assert main(["evaluate", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'report.json'} contains a JSON list" in error
    assert "Traceback" not in error


def _bad_run(folder, config=None, checkpoint=b"not a checkpoint"):
    folder.mkdir()
    report = {"config": RunConfig().to_dict() if config is None else config,
              "normalization": {"mean": [0.0], "std": [1.0]}, "models": {"bayesian": {}}}
    (folder / "report.json").write_text(json.dumps(report))
    for name in ("deterministic.pt", "bayesian.pt"):
        (folder / name).write_bytes(checkpoint)
    return folder


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda path: _bad_run(path), "cannot read checkpoint {path}/deterministic.pt: it is damaged"),
        (lambda path: _bad_run(path, config={**RunConfig().to_dict(), "widths": "x"}),
         "the run's report.json has an invalid config"),
        (lambda path: _bad_run(path, config=5), "{path}/report.json: config is not a JSON object"),
        (lambda path: (path.write_text("{}"), path)[1], "{path} is a file, not a run folder"),
    ],
    ids=["damaged-checkpoint", "invalid-widths", "config-not-object", "file-not-folder"],
)
def test_evaluate_bad_run_is_one_line(make, fragment, tmp_path, capsys):
    path = make(tmp_path / "run")
    assert main(["evaluate", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"bayeshead: error: {fragment.format(path=path)}")
    assert len(error.strip().splitlines()) == 1
    assert "weights_only=False" not in error  # torch's advice to load unsafely is not passed on


def test_config_file_equals_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('dataset = "cifar10"\nepochs = 4\nprior = "laplace"\nprior-scale = 0.5\n'
                    '[guide]\nguide = "lowrank"\nguide-rank = 3\n')
    parser = build_parser()
    from_file = config_from_args(parser.parse_args(["run", "--config", str(toml), "--seed", "7"]))
    from_flags = config_from_args(parser.parse_args(
        ["run", "--dataset", "cifar10", "--epochs", "4", "--prior", "laplace", "--prior-scale", "0.5",
         "--guide", "lowrank", "--guide-rank", "3", "--seed", "7"]))
    assert from_file == from_flags
    overridden = config_from_args(parser.parse_args(["run", "--config", str(toml), "--epochs", "9"]))
    assert overridden.epochs == 9


def test_config_file_equals_flags_bayesian_options(tmp_path):
    toml = tmp_path / "bayes.toml"
    toml.write_text(
        'dataset = "tabular"\ndata-dir = "table.csv"\n'
        '[model]\nprior = "scale-mixture"\nprior-pi = 0.3\nprior-sigma1 = 2.0\nprior-sigma2 = 0.01\n'
        'likelihood = "gaussian"\nnoise-scale = 0.4\n'
        '[guide]\nguide = "meanfield"\ninit-scale = 0.05\n'
        '[objective]\nelbo = "meanfield"\nnum-particles = 4\nkl-weight = 0.5\nkl-warmup-epochs = 2\n'
        'scheme = "two-stage"\nhead-epochs = 12\n'
    )
    parser = build_parser()
    from_file = config_from_args(parser.parse_args(["run", "--config", str(toml)]))
    from_flags = config_from_args(parser.parse_args(
        ["run", "--dataset", "tabular", "--data-dir", "table.csv", "--prior", "scale-mixture", "--prior-pi", "0.3",
         "--prior-sigma1", "2.0", "--prior-sigma2", "0.01", "--likelihood", "gaussian", "--noise-scale", "0.4",
         "--guide", "meanfield", "--init-scale", "0.05", "--elbo", "meanfield", "--num-particles", "4",
         "--kl-weight", "0.5", "--kl-warmup-epochs", "2", "--scheme", "two-stage", "--head-epochs", "12"]))
    assert from_file == from_flags
    assert from_file.fixed_noise_scale() == 0.4
    assert from_file.prior_params() == {"pi": 0.3, "sigma1": 2.0, "sigma2": 0.01}

    toml.write_text('prior = "hierarchical"\nhyperprior = "inverse-gamma"\nprior-scale = 0.7\n'
                    'dataset = "tabular"\nlikelihood = "gaussian"\nnoise-scale = "learned"\n'
                    'guide = "lowrank"\nguide-rank = 2\n')
    from_file = config_from_args(parser.parse_args(["run", "--config", str(toml)]))
    from_flags = config_from_args(parser.parse_args(
        ["run", "--prior", "hierarchical", "--hyperprior", "inverse-gamma", "--prior-scale", "0.7",
         "--dataset", "tabular", "--likelihood", "gaussian", "--noise-scale", "learned",
         "--guide", "lowrank", "--guide-rank", "2"]))
    assert from_file == from_flags
    assert from_file.fixed_noise_scale() is None


def test_widths_default_per_dataset():
    assert RunConfig(dataset="brain-mri").resolved_widths() == (16, 32, 64, 128, 256)
    assert RunConfig(dataset="cifar10").resolved_widths() == (32, 64, 128)
    assert RunConfig(dataset="brain-mri", widths=(8, 16)).resolved_widths() == (8, 16)
    flags = config_from_args(build_parser().parse_args(["run", "--dataset", "brain-mri", "--widths", "4,8"]))
    assert flags.resolved_widths() == (4, 8)
    stored = RunConfig(dataset="brain-mri").to_dict()
    assert stored["widths"] == [16, 32, 64, 128, 256]
    # A run stored before the brain-mri default changed reloads with the widths it was trained with.
    assert RunConfig.from_report({**stored, "widths": [32, 64, 128]}).resolved_widths() == (32, 64, 128)
    with pytest.raises(ConfigError, match="--widths"):
        RunConfig(widths=()).validate()


def test_config_file_unknown_key(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("epochz = 3\n")
    assert main(["run", "--config", str(toml)]) == 2
    assert "unknown option(s) epochz" in capsys.readouterr().err


def test_run_and_evaluate_on_real_cifar_subset(cifar_jpeg_root, tmp_path):
    out = tmp_path / "run"
    result = _run_cli("run", "--dataset", "cifar10", "--data-dir", str(cifar_jpeg_root), "--subset", "2000",
                      "--epochs", "1", "--num-samples", "10", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())

    assert report["dataset"] == "cifar10"
    sizes = report["sizes"]
    assert sizes["train"] + sizes["val"] == 2000
    assert abs(sizes["val"] - 200) <= 5  # 10% of each class, rounded per class
    assert sizes["test"] == 2000
    assert report["config"]["num_samples"] == 10
    assert set(report["versions"]) >= {"torch", "pyro-ppl", "arviz", "numpy"}
    for name in ("deterministic", "bayesian"):
        row = report["models"][name]
        assert 0.1 < row["accuracy"] <= 1.0  # one epoch on 1,800 images beats chance (0.1)
        assert 0.0 <= row["ece"] <= row["mce"] <= 1.0
        # After one short epoch of the SGD recipe the Bayesian head can be far overconfident (an
        # NLL near 10 was seen without a temperature); the temperature fitted on the validation
        # split brings it back near the CNN's.
        assert 0.0 < row["nll"] < 5.0
        assert 0.0 <= row["brier"] <= 2.0
        assert row["train_seconds"] > 0
        assert row["predict_seconds"] > 0
        assert (out / f"reliability_{name}.png").stat().st_size > 1000
    assert report["models"]["bayesian"]["prior"] == {"name": "normal", "scale": 1.0}
    assert "| CNN + Bayesian head (SVI) |" in (out / "report.md").read_text()
    temperature = report["models"]["bayesian"]["temperature"]
    # Fitted, not left at 1. Its side of 1 after one epoch depends on the thread count's rounding.
    assert temperature != 1.0
    assert 0.05 < temperature < 20.0
    assert torch.load(out / "bayesian.pt", weights_only=True)["temperature"] == temperature
    assert f"temperature of {temperature:.4f} fitted on the validation split" in (out / "report.md").read_text()

    evaluated = _run_cli("evaluate", str(out))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    recomputed = json.loads((out / "evaluation.json").read_text())
    for name in ("deterministic", "bayesian"):
        for key in ("accuracy", "ece", "mce", "nll", "brier"):
            assert recomputed["models"][name][key] == pytest.approx(report["models"][name][key], abs=1e-6), (name, key)


def test_default_config_is_digits():
    config = RunConfig()
    assert config.dataset == "digits"
    assert config.resolved_epochs() == 30
    assert config.validate() is config


def test_optimizer_recipe_resolves_per_dataset():
    cifar, digits = RunConfig(dataset="cifar10"), RunConfig()
    assert (cifar.resolved_optimizer(), cifar.resolved_lr(), cifar.resolved_weight_decay()) == ("sgd", 0.1, 5e-4)
    assert (digits.resolved_optimizer(), digits.resolved_lr(), digits.resolved_weight_decay()) == ("adamw", 0.003, 0.05)
    assert cifar.resolved_epochs() == 20
    # An explicit value wins over the recipe, and the report's config records the values used.
    chosen = RunConfig(dataset="cifar10", optimizer="adamw", lr=0.01)
    data = chosen.to_dict()
    assert (data["optimizer"], data["lr"], data["weight_decay"]) == ("adamw", 0.01, 0.05)
    assert RunConfig.from_dict(data).resolved_lr() == 0.01


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"optimizer": "rmsprop"}, "invalid --optimizer 'rmsprop'; valid values: sgd, adamw"),
        ({"guide_lr": 0.0}, "invalid --guide-lr 0.0; expected a positive number"),
        ({"local_reparameterization": True, "guide": "lowrank"},
         "--local-reparameterization needs a mean-field Gaussian guide, got --guide lowrank; "
         "valid values with it: normal, diagonal, meanfield"),
        ({"local_reparameterization": True, "prior": "hierarchical"}, "--prior hierarchical adds a scale site"),
    ],
)
def test_invalid_recipe_options(options, fragment):
    with pytest.raises(ConfigError) as error:
        RunConfig(**options).validate()
    assert fragment in str(error.value)


def test_local_reparameterization_rejected_early(tmp_path, capsys):
    code = main(["run", "--local-reparameterization", "--guide", "delta", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2
    assert "needs a mean-field Gaussian guide, got --guide delta" in error
    assert not (tmp_path / "out").exists()


def test_temperature_option():
    assert RunConfig().temperature == "validation"
    assert build_parser().parse_args(["run", "--temperature", "none"]).temperature == "none"
    with pytest.raises(ConfigError, match="invalid --temperature 'test'; valid values: validation, none"):
        RunConfig(temperature="test").validate()
    # A report written before the option existed predicted without a temperature.
    stored = RunConfig(dataset="cifar10").to_dict()
    del stored["temperature"]
    assert RunConfig.from_report(stored).temperature == "none"
    assert RunConfig.from_dict(stored).temperature == "validation"


def test_recompute_bn_stats_rescues_one_epoch(tmp_path):
    # One epoch of digits is 11 optimizer steps: the running statistics have not settled and the
    # CNN predicts one class in eval mode (0.100 in benchmarks/short_run_batchnorm.py).
    out = tmp_path / "run"
    assert main(["run", "--dataset", "digits", "--epochs", "1", "--recompute-bn-stats", "--head-epochs", "3",
                 "--num-samples", "5", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["recompute_bn_stats"] is True
    markdown = (out / "report.md").read_text()
    assert "1 epoch," in markdown
    assert "CNN widths 32, 64, 128; batch-norm statistics recomputed on the training images" in markdown
    for name in ("deterministic", "bayesian"):
        assert report["models"][name]["accuracy"] > 0.8
    # The checkpoints hold the recomputed statistics: evaluating them reproduces the accuracies.
    assert main(["evaluate", str(out)]) == 0
    recomputed = json.loads((out / "evaluation.json").read_text())["models"]
    for name in ("deterministic", "bayesian"):
        assert recomputed[name]["accuracy"] == pytest.approx(report["models"][name]["accuracy"])
