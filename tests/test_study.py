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
    assert result["rows"][1]["temperature"] > 0
    assert result["rows"][4]["prior_scale"] in study.PRIOR_SCALE_GRID
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
