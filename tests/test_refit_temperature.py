"""benchmarks/refit_temperature.py: the validation temperature on a run trained without one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyro
import pytest
import torch

from pipelines.config import RunConfig
from pipelines.runner import run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "refit_temperature.py"


@pytest.fixture(scope="module")
def refit():
    spec = importlib.util.spec_from_file_location("refit_temperature", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refit_on_run_without_temperature(refit, tmp_path, capsys):
    pyro.clear_param_store()
    options = {"dataset": "digits", "subset": 400, "epochs": 2, "num_samples": 10, "seed": 0, "device": "cpu",
               "progress": False}
    report = run(RunConfig(temperature="none", out=str(tmp_path / "plain"), **options))
    assert torch.load(tmp_path / "plain" / "bayesian.pt", weights_only=True)["temperature"] == 1.0

    out = tmp_path / "refit.json"
    assert refit.main([str(tmp_path / "plain"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    as_stored, fitted = rows["as stored"], rows["validation temperature"]
    assert as_stored["temperature"] == 1.0
    for key in ("accuracy", "ece", "nll", "brier"):
        assert as_stored[key] == pytest.approx(report["models"]["bayesian"][key], abs=1e-9), key
    # The same training with the temperature on stores the temperature the script fits.
    pyro.clear_param_store()
    tempered = run(RunConfig(out=str(tmp_path / "tempered"), **options))
    assert fitted["temperature"] == pytest.approx(tempered["models"]["bayesian"]["temperature"], rel=1e-6)
    assert fitted["temperature"] != 1.0
    assert fitted["nll"] == pytest.approx(tempered["models"]["bayesian"]["nll"], rel=1e-6)
    assert "| validation temperature |" in capsys.readouterr().out


def test_refit_missing_run_is_error(refit, tmp_path, capsys):
    assert refit.main([str(tmp_path / "none")]) == 2
    assert f"run folder {tmp_path / 'none'} not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert refit.main([str(tmp_path / "empty")]) == 2
    assert f"no report.json in {tmp_path / 'empty'}" in capsys.readouterr().err


def test_small_validation_split_warns(tmp_path, caplog):
    pyro.clear_param_store()
    config = RunConfig(dataset="digits", subset=200, epochs=1, num_samples=5, device="cpu", progress=False,
                       out=str(tmp_path / "run"))
    with caplog.at_level("WARNING", logger="pipelines.runner"):
        report = run(config)
    num_val = report["sizes"]["val"]
    assert num_val < 100
    assert f"was fitted on only {num_val} validation images" in caplog.text
