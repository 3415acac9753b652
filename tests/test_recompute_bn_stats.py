"""benchmarks/recompute_bn_stats.py: recomputed batch-norm statistics on a finished run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pyro

from pipelines.config import RunConfig
from pipelines.runner import run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recompute_bn_stats.py"


def _script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_recompute_on_one_epoch_run(tmp_path, caplog):
    pyro.clear_param_store()
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="pipelines.runner"):
        run(RunConfig(dataset="digits", epochs=1, head_epochs=3, num_samples=5, seed=0, device="cpu",
                      progress=False, out=str(out)))
    assert "the CNN took only 11 optimizer steps" in caplog.text
    assert "batch-norm statistics as trained" in (out / "report.md").read_text()
    before = sorted(path.name for path in out.iterdir())

    result = _script(out, "--out", tmp_path / "bn.json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "bn.json").read_text())["rows"]
    # 11 optimizer steps leave the running statistics unsettled (see benchmarks/short_run_batchnorm.py).
    assert rows["CNN, running statistics"]["accuracy"] < 0.5
    assert rows["CNN, recomputed statistics"]["accuracy"] > 0.8
    assert rows["Bayesian head, recomputed statistics"]["accuracy"] > 0.8
    assert rows["Bayesian head, recomputed statistics"]["temperature"] != 1.0
    assert "| CNN, recomputed statistics |" in result.stdout
    assert sorted(path.name for path in out.iterdir()) == before  # the run folder is left unchanged


def test_recompute_rejects_joint_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    report = {"config": RunConfig(scheme="joint").to_dict(), "normalization": {}, "models": {"bayesian": {}}}
    (out / "report.json").write_text(json.dumps(report))
    result = _script(out)
    assert result.returncode == 2
    assert "recompute_bn_stats: error: the script refits a two-stage classification head" in result.stderr
    assert "Traceback" not in result.stderr
