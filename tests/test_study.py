"""The study script's quick mode: every method gives a complete, valid row, and it resumes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.helpers import write_cifar_pickles

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module
    spec.loader.exec_module(module)
    return module


def _check_rows(result: dict, methods) -> None:
    rows = {row["method"]: row for row in result["rows"]}
    for method in methods:
        row = rows[method]
        if "skipped" in row:
            assert method == "laplace", row  # only the optional package may be missing
            continue
        assert 0.0 <= row["accuracy"] <= 1.0, method
        assert 0.0 <= row["ece"] <= row["mce"] <= 1.0, method
        assert 0.0 < row["nll"] < 20.0, method
        assert 0.0 <= row["brier"] <= 2.0, method
        assert row["train_seconds"] > 0, method


def test_quick_study_on_real_cifar10(study, cifar_jpeg_root, tmp_path, capsys):
    out = tmp_path / "study"
    code = study.main(["--quick", "--subset", "600", "--dataset", "cifar10", "--data-dir", str(cifar_jpeg_root),
                       "--out", str(out), "--no-progress"])
    assert code == 0
    result = json.loads((out / "study_cifar10.json").read_text())
    _check_rows(result, study.METHODS)
    rows = {row["method"]: row for row in result["rows"]}
    assert [row["method"] for row in result["rows"]] == list(study.METHODS)
    for method in ("temperature", "joint-tempered", "two-stage-tempered"):
        # One epoch on 600 images leaves the models near chance, where a large T is the right fit.
        assert 0 < rows[method]["temperature"] < float("inf"), method
    assert rows["two-stage-val"]["prior_scale"] in study.PRIOR_SCALE_GRID
    # The tempered rows divide the same draws' logits; the averaged class changes only for
    # images whose draws disagree, so accuracy moves little.
    assert abs(rows["joint-tempered"]["accuracy"] - rows["joint"]["accuracy"]) <= 0.02
    assert abs(rows["two-stage-tempered"]["accuracy"] - rows["two-stage"]["accuracy"]) <= 0.02
    assert (out / "reliability_cifar10.png").stat().st_size > 1000
    assert "| joint | 1 |" in capsys.readouterr().out

    # A second call finds every row on disk and retrains nothing.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cifar10" / "seed0").iterdir()}
    assert study.main(["--quick", "--subset", "600", "--dataset", "cifar10", "--data-dir", str(cifar_jpeg_root),
                       "--out", str(out), "--no-progress"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cifar10" / "seed0").iterdir()}
    assert before == after


def test_quick_study_on_cifar100_pickles(study, tmp_path):
    # 10 training images per class, so the 10% validation split keeps one per class.
    write_cifar_pickles(tmp_path / "data", "cifar100", per_split=(1000, 100), num_classes=100)
    out = tmp_path / "study"
    methods = ["deterministic", "temperature", "two-stage"]
    code = study.main(["--quick", "--dataset", "cifar100", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                       "--methods", *methods, "--no-progress"])
    assert code == 0
    result = json.loads((out / "study_cifar100.json").read_text())
    _check_rows(result, methods)
    assert result["summary"]["deterministic"]["seeds"] == 1


def test_study_empty_validation_is_error(study, tmp_path, capsys):
    write_cifar_pickles(tmp_path / "data", "cifar100", per_split=(300, 100), num_classes=100)
    code = study.main(["--quick", "--dataset", "cifar100", "--data-dir", str(tmp_path / "data"),
                       "--out", str(tmp_path / "out"), "--methods", "temperature", "--no-progress"])
    assert code == 2
    assert "temperature scaling needs a validation split" in capsys.readouterr().err


def test_study_missing_data_is_error(study, tmp_path, capsys):
    code = study.main(["--quick", "--dataset", "cifar100", "--data-dir", str(tmp_path / "none"),
                       "--out", str(tmp_path / "out")])
    assert code == 2
    assert "no cifar100 data under" in capsys.readouterr().err


# The study's options that the reused run below shares: 400 images, 1 epoch, 20 posterior samples.
REUSE_OPTIONS = ["--dataset", "digits", "--subset", "400", "--epochs", "1", "--num-samples", "20",
                 "--head-epochs", "2", "--seeds", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished one-epoch ``bayeshead run`` on 400 digits (joint scheme, seed 0)."""
    import pyro

    from pipelines.config import RunConfig
    from pipelines.runner import run

    pyro.clear_param_store()
    out = tmp_path_factory.mktemp("digits-run")
    report = run(RunConfig(dataset="digits", subset=400, epochs=1, num_samples=20, seed=0, device="cpu",
                           scheme="joint", out=str(out), progress=False))
    pyro.clear_param_store()
    return out, report


def _no_training(*args, **kwargs):
    raise AssertionError("the study trained a model that --reuse-run should have supplied")


def test_reuse_run_matches_report(study, digits_run, tmp_path, monkeypatch):
    run_dir, report = digits_run
    monkeypatch.setattr(study, "train_deterministic", _no_training)
    monkeypatch.setattr(study, "train_hybrid", _no_training)
    out = tmp_path / "study"
    methods = ["deterministic", "joint", "joint-tempered", "temperature", "two-stage"]
    code = study.main([*REUSE_OPTIONS, "--out", str(out), "--reuse-run", str(run_dir), "--methods", *methods])
    assert code == 0

    rows = {row["method"]: row for row in json.loads((out / "study_digits.json").read_text())["rows"]}
    # The run fitted its head's temperature on the validation split. The study's joint-tempered
    # row fits it again the same way, so it equals the report. Its joint row uses no temperature.
    for method, model in (("deterministic", "deterministic"), ("joint-tempered", "bayesian")):
        for key in ("accuracy", "ece", "mce", "nll", "brier"):
            assert rows[method][key] == report["models"][model][key], (method, key)
    assert rows["joint-tempered"]["temperature"] == report["models"]["bayesian"]["temperature"] != 1.0
    assert rows["deterministic"]["train_seconds"] == report["models"]["deterministic"]["train_seconds"]
    assert rows["joint"]["train_seconds"] == report["models"]["bayesian"]["train_seconds"]
    assert rows["joint"]["nll"] != report["models"]["bayesian"]["nll"]
    # Temperature scaling and the two-stage head build on the reused CNN and add their own time.
    assert rows["temperature"]["train_seconds"] > report["models"]["deterministic"]["train_seconds"]
    assert rows["two-stage"]["train_seconds"] > report["models"]["deterministic"]["train_seconds"]
    assert rows["two-stage"]["reused_run"] == str(run_dir)

    seed_folder = out / "digits" / "seed0"
    assert not (seed_folder / "deterministic.pt").exists()
    assert not (seed_folder / "deterministic.time.json").exists()
    assert json.loads((seed_folder / "models.json").read_text())["run"] == str(run_dir.resolve())


def test_reuse_run_config_mismatch(study, digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    options = [*REUSE_OPTIONS, "--out", str(tmp_path / "study"), "--reuse-run", str(run_dir)]
    options[options.index("--epochs") + 1] = "2"
    assert study.main(options) == 2
    error = capsys.readouterr().err
    assert "the run's config differs from the study's on epochs (run: 1, study: 2)" in error
    assert error.count("\n") == 1
    assert not (tmp_path / "study").exists()


def test_reuse_run_seed_not_studied(study, digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    options = [*REUSE_OPTIONS, "--out", str(tmp_path / "study"), "--reuse-run", str(run_dir)]
    options[options.index("--seeds") + 1] = "1"
    assert study.main(options) == 2
    assert "the run's seed is 0, which is not among --seeds 1" in capsys.readouterr().err


def test_reuse_run_into_trained_folder(study, digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    seed_folder = tmp_path / "study" / "digits" / "seed0"
    seed_folder.mkdir(parents=True)
    (seed_folder / "deterministic.json").write_text("{}")  # a row left by the study's own training
    code = study.main([*REUSE_OPTIONS, "--out", str(tmp_path / "study"), "--reuse-run", str(run_dir)])
    assert code == 2
    assert "contains results of a CNN from the study's own training" in capsys.readouterr().err


def test_reuse_run_without_report(study, tmp_path, capsys):
    code = study.main([*REUSE_OPTIONS, "--out", str(tmp_path / "study"), "--reuse-run", str(tmp_path)])
    assert code == 2
    assert "report.json not found" in capsys.readouterr().err


def test_options_fill_config(study, tmp_path):
    args = study.parse_args(["--quick", "--epochs", "3", "--optimizer", "adamw", "--lr", "0.01", "--guide-lr", "0.02"])
    config = study.study_config(args, 0, tmp_path)
    assert config.resolved_epochs() == 3  # --quick keeps an epoch count that was given
    assert config.resolved_optimizer() == "adamw"
    assert config.resolved_lr() == 0.01
    assert config.resolved_weight_decay() == 0.05  # the adamw recipe
    assert config.guide_lr == 0.02
    assert config.head_epochs == 3
    assert config.num_samples == 20
    assert config.subset == 1000

    defaults = study.study_config(study.parse_args(["--dataset", "cifar10"]), 0, tmp_path)
    assert defaults.resolved_epochs() == 20  # the epochs of 'bayeshead run' on CIFAR-10
    assert defaults.resolved_optimizer() == "sgd"
    assert defaults.head_epochs == 30
    assert defaults.num_samples == 100
