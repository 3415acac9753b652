"""ArviZ diagnostics: InferenceData layout, log-likelihood values, LOO, compare, R-hat, CLI."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from guides.autoguides import make_guide
from models import BayesianLinearHead
from pipelines.cli import main
from pipelines.config import RunConfig
from pipelines.diagnostics import (
    DiagnosticsError,
    build_inference_data,
    combine_runs,
    compare_inference_data,
    compare_runs,
    head_inference_data,
    import_arviz,
    load_inference_data,
    loo_diagnostics,
    posterior_summary,
    rhat_across_runs,
    save_inference_data,
    to_inference_data,
    top_weights,
)
from pipelines.runner import run

NUM_DRAWS = 40
# With --subset 400, digits' 359 test images are all kept whatever the seed, so the two runs
# share a test set (see pipelines.data.subset_indices).
NUM_TEST = 359


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny digits runs that differ only in seed, each with a saved ``diagnostics.nc``."""
    root = tmp_path_factory.mktemp("runs")
    built = {}
    for name, seed in (("a", 0), ("b", 1)):
        out = root / name
        report = run(RunConfig(dataset="digits", epochs=2, subset=400, seed=seed, out=str(out), progress=False,
                               widths=(4, 8), convs_per_block=1, scheme="joint"))
        idata = build_inference_data(out, num_draws=NUM_DRAWS)
        save_inference_data(idata, out / "diagnostics.nc")
        built[name] = {"dir": out, "report": report, "idata": idata}
    return built


def _tiny_head(prior="normal", num_inputs=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    head = BayesianLinearHead(3, 4, prior)
    features = torch.randn(num_inputs, 3, generator=generator)
    labels = torch.randint(0, 4, (num_inputs,), generator=generator)
    guide = make_guide(head.model, "normal", init_scale=0.3)
    guide(features, labels)  # autoguides create their parameters on the first call
    return head, guide, features, labels


# --------------------------------------------------------------------------------------------
# Layout of the InferenceData


def test_groups_have_named_dims(runs):
    idata = runs["a"]["idata"]
    posterior = idata.posterior

    assert posterior["head.weight"].dims == ("chain", "draw", "class", "feature")
    assert posterior["head.weight"].shape == (1, NUM_DRAWS, 10, 8)
    assert posterior["head.bias"].dims == ("chain", "draw", "class")
    assert list(posterior["class"].values) == [str(d) for d in range(10)]
    for group in ("posterior_predictive", "log_likelihood"):
        assert getattr(idata, group)["obs"].dims == ("chain", "draw", "obs_id")
        assert getattr(idata, group)["obs"].shape == (1, NUM_DRAWS, NUM_TEST)
    assert idata.observed_data["obs"].dims == ("obs_id",)
    assert idata.observed_data["obs"].shape == (NUM_TEST,)


def test_observed_and_predictive_are_labels(runs):
    idata = runs["a"]["idata"]
    observed = idata.observed_data["obs"].values
    predictive = idata.posterior_predictive["obs"].values

    assert np.bincount(observed, minlength=10).min() > 0
    assert predictive.min() >= 0
    assert predictive.max() <= 9
    assert np.issubdtype(predictive.dtype, np.integer)
    assert np.all(idata.log_likelihood["obs"].values < 0)


def test_train_loss_and_config_stored(runs):
    idata, report = runs["a"]["idata"], runs["a"]["report"]
    loss = idata.sample_stats["train_loss"]

    assert loss.dims == ("chain", "epoch")
    assert list(loss["epoch"].values) == [1, 2]
    np.testing.assert_allclose(loss.values[0], report["models"]["bayesian"]["train_losses"])
    assert json.loads(idata.attrs["config"]) == report["config"]
    assert idata.attrs["draw_seed"] == 0
    assert len(idata.attrs["test_set_sha1"]) == 40


def test_hierarchical_prior_adds_scale():
    head, guide, features, labels = _tiny_head("hierarchical")
    idata = head_inference_data(head, guide, features, labels, ["w", "x", "y", "z"], num_draws=12, seed=1)

    scale = idata.posterior["head.scale"]
    assert scale.dims == ("chain", "draw", "class")
    assert scale.shape == (1, 12, 4)
    assert np.all(scale.values > 0)


# --------------------------------------------------------------------------------------------
# Chains


@pytest.mark.parametrize("num_draws", [1, 7, 30])
def test_draws_never_become_chains(num_draws):
    head, guide, features, labels = _tiny_head()
    idata = head_inference_data(head, guide, features, labels, ["w", "x", "y", "z"], num_draws=num_draws)

    assert idata.posterior.sizes["chain"] == 1
    assert idata.posterior.sizes["draw"] == num_draws
    assert idata.log_likelihood.sizes["chain"] == 1


def test_missing_chain_axis_rejected():
    rng = np.random.default_rng(0)
    draws = {"head.bias": rng.normal(size=(20, 4))}  # (draw, class): no chain axis
    with pytest.raises(DiagnosticsError, match=r"leading \(chain, draw\) = \(1, 20\)"):
        to_inference_data(draws, rng.normal(size=(1, 20, 5)), np.zeros((1, 20, 5), dtype=int),
                          np.zeros(5, dtype=int), ["w", "x", "y", "z"])


def test_combine_runs_one_chain_per_run(runs):
    a, b = runs["a"]["idata"], runs["b"]["idata"]
    combined = combine_runs([a, b])

    assert combined.posterior.sizes["chain"] == 2
    assert combined.posterior.sizes["draw"] == NUM_DRAWS
    np.testing.assert_array_equal(combined.posterior["head.weight"].values[0], a.posterior["head.weight"].values[0])
    np.testing.assert_array_equal(combined.posterior["head.weight"].values[1], b.posterior["head.weight"].values[0])
    np.testing.assert_array_equal(combined.log_likelihood["obs"].values[1], b.log_likelihood["obs"].values[0])
    np.testing.assert_allclose(combined.sample_stats["train_loss"].values,
                               [runs[n]["report"]["models"]["bayesian"]["train_losses"] for n in ("a", "b")])
    assert [entry["config"]["seed"] for entry in json.loads(combined.attrs["runs"])] == [0, 1]


def test_combine_runs_from_folders(runs):
    combined = combine_runs([runs["a"]["dir"], runs["b"]["dir"]])
    assert combined.posterior.sizes["chain"] == 2


def test_combine_needs_two_runs(runs):
    with pytest.raises(DiagnosticsError, match="at least two runs, got 1"):
        combine_runs([runs["a"]["idata"]])


# --------------------------------------------------------------------------------------------
# Values


def test_log_likelihood_equals_direct_computation():
    head, guide, features, labels = _tiny_head(num_inputs=9)
    idata = head_inference_data(head, guide, features, labels, ["w", "x", "y", "z"], num_draws=25, seed=3)

    weight = torch.from_numpy(idata.posterior["head.weight"].values[0]).double()  # (S, class, feature)
    bias = torch.from_numpy(idata.posterior["head.bias"].values[0]).double()  # (S, class)
    logits = torch.einsum("skf,nf->snk", weight, features.double()) + bias[:, None, :]
    expected = torch.log_softmax(logits, dim=-1)[:, torch.arange(9), labels]

    np.testing.assert_allclose(idata.log_likelihood["obs"].values[0], expected.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, labels.numpy())


def test_draws_repeat_with_seed():
    head, guide, features, labels = _tiny_head()
    first = head_inference_data(head, guide, features, labels, ["w", "x", "y", "z"], num_draws=5, seed=4)
    second = head_inference_data(head, guide, features, labels, ["w", "x", "y", "z"], num_draws=5, seed=4)
    np.testing.assert_array_equal(first.posterior["head.weight"].values, second.posterior["head.weight"].values)


def test_lppd_equals_run_nll(runs):
    # With the run's seed and num_samples the draws are those 'bayeshead run' predicted with,
    # so the test lppd is minus N times the NLL in report.json.
    run_a = runs["a"]
    idata = build_inference_data(run_a["dir"], num_draws=run_a["report"]["config"]["num_samples"])
    lppd = loo_diagnostics(idata)["lppd"]
    assert -lppd / NUM_TEST == pytest.approx(run_a["report"]["models"]["bayesian"]["nll"], abs=1e-5)


def test_netcdf_round_trip(runs, tmp_path):
    az = import_arviz()
    idata = runs["a"]["idata"]
    path = save_inference_data(idata, tmp_path / "diagnostics.nc")

    with az.rc_context({"data.load": "eager"}):
        loaded = az.from_netcdf(path)
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data", "sample_stats"):
        original, reloaded = getattr(idata, group), getattr(loaded, group)
        assert set(reloaded.data_vars) == set(original.data_vars), group
        for name in original.data_vars:
            np.testing.assert_array_equal(reloaded[name].values, original[name].values)
            assert reloaded[name].dims == original[name].dims
    assert list(loaded.posterior["class"].values) == list(idata.posterior["class"].values)
    assert loaded.attrs["config"] == idata.attrs["config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnostics.nc"]  # no temporary file left


def test_load_missing_netcdf(tmp_path):
    with pytest.raises(FileNotFoundError, match="run 'bayeshead diagnose"):
        load_inference_data(tmp_path / "diagnostics.nc")


# --------------------------------------------------------------------------------------------
# Summary, LOO, compare, R-hat


def test_summary_selects_largest_weights(runs):
    idata = runs["a"]["idata"]
    table, sentence = posterior_summary(idata, per_class=3)

    assert len(table) == 10 + 10 * 3
    assert list(table.index[:10]) == [f"head.bias[{d}]" for d in range(10)]
    means = np.abs(idata.posterior["head.weight"].values.mean(axis=(0, 1)))
    class_7 = [f"head.weight[7, {f}]" for f in np.argsort(-means[7])[:3]]
    assert list(table.index[10 + 7 * 3 : 10 + 8 * 3]) == class_7
    assert {"mean", "sd", "hdi_3%", "hdi_97%"} <= set(table.columns)
    assert "3 weights with the largest |posterior mean|" in sentence


def test_summary_max_rows(runs):
    table, sentence = posterior_summary(runs["a"]["idata"], per_class=5, max_rows=12)
    assert len(table) == 12
    assert "The first 12 of 60 rows" in sentence


def test_top_weights_order(runs):
    idata = runs["a"]["idata"]
    selection = top_weights(idata, per_class=2)
    means = np.abs(idata.posterior["head.weight"].values.mean(axis=(0, 1)))
    assert selection[:2] == [("0", int(f)) for f in np.argsort(-means[0])[:2]]
    assert len(selection) == 20


def test_loo_is_finite(runs):
    loo = loo_diagnostics(runs["a"]["idata"])

    assert np.isfinite(loo["elpd_loo"])
    assert loo["elpd_loo"] < 0
    assert loo["se"] > 0
    assert loo["elpd_loo"] <= loo["lppd"]
    assert loo["num_observations"] == NUM_TEST
    assert loo["num_draws"] == NUM_DRAWS
    assert loo["pareto_k"].shape == (NUM_TEST,)
    assert loo["num_high_k"] == int(np.sum(loo["pareto_k"] > 0.7))
    assert loo["good_k"] == pytest.approx(min(1 - 1 / np.log10(NUM_DRAWS), 0.7))


def test_loo_needs_enough_draws():
    head, guide, features, labels = _tiny_head()
    idata = head_inference_data(head, guide, features, labels, ["w", "x", "y", "z"], num_draws=5)
    with pytest.raises(DiagnosticsError, match="at least 20 draws, got 5"):
        loo_diagnostics(idata)


def test_compare_runs_on_two_runs(runs):
    table = compare_runs([runs["a"]["dir"], runs["b"]["dir"]])

    assert set(table.index) == {"a", "b"}
    assert np.all(np.isfinite(table["elpd_loo"]))
    for name in ("a", "b"):
        expected = loo_diagnostics(runs[name]["idata"])["elpd_loo"]
        assert table.loc[name, "elpd_loo"] == pytest.approx(expected)
    best = table.index[0]
    assert table.loc[best, "rank"] == 0
    assert table.loc[best, "elpd_diff"] == 0.0
    assert table["weight"].sum() == pytest.approx(1.0, abs=1e-6)


def test_compare_rejects_other_labels(runs):
    other = copy.deepcopy(runs["b"]["idata"])
    labels = other.observed_data["obs"].values
    labels[0] = (labels[0] + 1) % 10
    with pytest.raises(DiagnosticsError, match=f"differ at 1 of {NUM_TEST} positions"):
        compare_inference_data({"a": runs["a"]["idata"], "b": other})
    with pytest.raises(DiagnosticsError, match="differ at 1 of"):
        combine_runs([runs["a"]["idata"], other])


def test_compare_rejects_other_images(runs):
    other = copy.deepcopy(runs["b"]["idata"])
    other.attrs["test_set_sha1"] = "0" * 40
    with pytest.raises(DiagnosticsError, match="test images of b and a differ"):
        compare_inference_data({"a": runs["a"]["idata"], "b": other})


def test_compare_rejects_other_sizes(runs):
    other = runs["b"]["idata"].isel(obs_id=slice(0, 100))
    with pytest.raises(DiagnosticsError, match=f"b has 100 test labels but a has {NUM_TEST}"):
        compare_inference_data({"a": runs["a"]["idata"], "b": other})


def test_rhat_separates_seeds(runs):
    a, b = runs["a"]["idata"], runs["b"]["idata"]
    across_seeds = rhat_across_runs(combine_runs([a, b]))
    same_run = rhat_across_runs(combine_runs([a, copy.deepcopy(a)]))

    assert list(across_seeds.index) == ["head.weight", "head.bias", "log_likelihood obs"]
    assert across_seeds.loc["head.weight", "size"] == 80
    assert across_seeds.loc["log_likelihood obs", "size"] == NUM_TEST
    # Two seeds give clearly different variational posteriors; a run beside itself does not.
    assert across_seeds.loc["log_likelihood obs", "median_r_hat"] > 1.1
    assert same_run.loc["log_likelihood obs", "median_r_hat"] < 1.05


def test_rhat_needs_two_chains(runs):
    with pytest.raises(DiagnosticsError, match="at least two chains"):
        rhat_across_runs(runs["a"]["idata"])


# --------------------------------------------------------------------------------------------
# Command line


def test_diagnose_command_writes_files(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["a"]["dir"], run_dir)
    (run_dir / "diagnostics.nc").unlink()

    assert main(["diagnose", str(run_dir), "--num-draws", "30", "--top-weights", "2"]) == 0
    output = capsys.readouterr().out
    loaded = load_inference_data(run_dir / "diagnostics.nc")
    loo = loo_diagnostics(loaded)

    assert loaded.posterior.sizes["draw"] == 30
    assert f"ELPD-LOO {loo['elpd_loo']:.2f} (SE {loo['se']:.2f})" in output
    assert f"Pareto k > 0.7: {loo['num_high_k']} of {NUM_TEST} test inputs" in output
    for name in ("diagnostics_train_loss.png", "diagnostics_forest.png", "diagnostics_posterior.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG", name
    report = (run_dir / "diagnostics.md").read_text()
    assert f"| {loo['elpd_loo']:.2f} | {loo['se']:.2f} |" in report
    assert "| head.weight[0, " in report
    assert "the 2 weights with the largest |posterior mean|" in report


def test_compare_command_writes_table(runs, tmp_path, capsys):
    out = tmp_path / "comparison"
    assert main(["compare", str(runs["a"]["dir"]), str(runs["b"]["dir"]), "--out", str(out)]) == 0

    table = pd.read_csv(out / "comparison.csv", index_col=0)
    assert set(table.index) == {"a", "b"}
    assert "| a | " in capsys.readouterr().out
    assert "| b | " in (out / "comparison.md").read_text()


def test_combine_command_writes_rhat(runs, tmp_path, capsys):
    out = tmp_path / "combined"
    assert main(["combine", str(runs["a"]["dir"]), str(runs["b"]["dir"]), "--out", str(out)]) == 0

    assert "| log_likelihood obs | 359 |" in capsys.readouterr().out
    assert load_inference_data(out / "combined.nc").posterior.sizes["chain"] == 2
    assert "not that a sampler has not converged" in (out / "combined.md").read_text()
    assert (out / "combined_forest.png").read_bytes()[:4] == b"\x89PNG"


def _empty_folder(path):
    path.mkdir()
    return path


def _report_only(path, runs):
    path.mkdir()
    shutil.copy(runs["a"]["dir"] / "report.json", path / "report.json")
    return path


def _report_text(path, text):
    path.mkdir()
    (path / "report.json").write_text(text)
    return path


def _edited_report(path, runs, edit):
    shutil.copytree(runs["a"]["dir"], path)
    report = json.loads((path / "report.json").read_text())
    edit(report)
    (path / "report.json").write_text(json.dumps(report))
    return path


def _regression_report(report):
    report["config"].update(dataset="tabular", likelihood="gaussian")


def _custom_prior_report(report):
    report["models"]["bayesian"]["custom_prior"] = True


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda path, runs: path, "run folder {path} not found"),
        (lambda path, runs: _empty_folder(path), "no report.json in {path}"),
        (lambda path, runs: _report_text(path, '{"config": '), "{path}/report.json is not valid JSON"),
        (lambda path, runs: _report_text(path, '{"config": {}, "models": {}}'),
         "{path}/report.json is missing normalization"),
        (_report_only, "missing checkpoint {path}/deterministic.pt"),
        (lambda path, runs: _edited_report(path, runs, _regression_report), "{path} is a regression run"),
        (lambda path, runs: _edited_report(path, runs, _custom_prior_report),
         "this run was trained with a prior passed from Python"),
    ],
    ids=["missing-folder", "missing-report", "invalid-json", "missing-keys", "missing-checkpoint", "regression-run", "custom-prior"],
)
def test_diagnose_bad_run_is_one_line(make, fragment, runs, tmp_path, capsys):
    path = make(tmp_path / "run", runs)
    assert main(["diagnose", str(path)]) == 2

    error = capsys.readouterr().err
    lines = error.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"bayeshead: error: {fragment.format(path=path)}")
    assert "Traceback" not in error


def test_compare_missing_run_is_one_line(runs, tmp_path, capsys):
    assert main(["compare", str(runs["a"]["dir"]), str(tmp_path / "absent"), "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"bayeshead: error: run folder {tmp_path / 'absent'} not found")
    assert len(error.strip().splitlines()) == 1


def test_compare_needs_two_runs(runs, capsys):
    assert main(["compare", str(runs["a"]["dir"])]) == 2
    assert "comparing needs at least two runs, got 1" in capsys.readouterr().err
