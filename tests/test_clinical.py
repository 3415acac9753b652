"""Clinical outputs of a brain-MRI run: referral thresholds, selective risk and ``predict``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipelines import calibration, clinical
from pipelines.cli import main
from pipelines.config import RunConfig
from pipelines.data import BatchIterator, DataBundle, ImageSet
from pipelines.prediction import Predictions
from tests.conftest import real_data_root

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _predictions(labels, confidence, wrong=(), mutual=None) -> Predictions:
    """Predictions that give ``confidence`` to the label, or to the next class for ``wrong`` inputs.

    The other classes share the rest equally. ``mutual`` sets the mutual information by
    lowering the expected entropy; without it the predictions are deterministic.
    """
    labels = np.asarray(labels)
    confidence = np.asarray(confidence, dtype=np.float64)
    predicted = labels.copy()
    predicted[list(wrong)] = (labels[list(wrong)] + 1) % len(CLASSES)
    probs = np.repeat(((1 - confidence) / (len(CLASSES) - 1))[:, None], len(CLASSES), axis=1)
    probs[np.arange(len(labels)), predicted] = confidence
    entropy = -(probs * np.log(probs)).sum(axis=1)
    expected = entropy if mutual is None else entropy - np.asarray(mutual)
    return Predictions(probs=probs, log_probs=np.log(probs), labels=labels, expected_entropy=expected,
                       seconds=0.0)


# --------------------------------------------------------------------------------------------
# Threshold and measures on hand-made numbers


def test_threshold_largest_meeting_target():
    scores = [0.1, 0.2, 0.2, 0.5, 0.9]
    correct = [True, True, True, False, True]
    # Kept accuracy by threshold: 0.1 -> 1/1, 0.2 -> 3/3, 0.5 -> 3/4, 0.9 -> 4/5.
    strict = clinical.choose_referral_threshold(scores, correct, 0.99)
    assert strict["threshold"] == 0.2
    assert strict["accuracy_kept"] == 1.0
    assert strict["referred_fraction"] == pytest.approx(0.4)
    assert strict["met_target"] is True
    # At 0.8 the accuracy dips below the target at 0.5 and recovers at 0.9: the largest wins.
    loose = clinical.choose_referral_threshold(scores, correct, 0.8)
    assert loose["threshold"] == 0.9
    assert loose["referred_fraction"] == 0.0


def test_threshold_unmet_uses_strictest():
    chosen = clinical.choose_referral_threshold([0.3, 0.1, 0.2], [True, False, True], 0.99)
    assert chosen["met_target"] is False
    assert chosen["threshold"] == 0.1
    assert chosen["accuracy_kept"] == 0.0
    assert chosen["referred_fraction"] == pytest.approx(2 / 3)
    assert chosen["num_scans"] == 3


def test_threshold_keeps_ties_together():
    # Both scans at 0.5 are kept or referred together, so 0.5 (accuracy 2/3) cannot be chosen.
    chosen = clinical.choose_referral_threshold([0.1, 0.5, 0.5], [True, True, False], 0.9)
    assert chosen["threshold"] == 0.1
    assert chosen["referred_fraction"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("scores", "correct", "target", "message"),
    [([], [], 0.99, "non-empty 1-D arrays"), ([0.1, 0.2], [True], 0.99, "of one length"),
     ([np.nan], [True], 0.99, "must not contain NaN"), ([0.1], [True], 1.5, r"must lie in \(0, 1\], got 1.5")],
)
def test_threshold_rejects_invalid_input(scores, correct, target, message):
    with pytest.raises(ValueError, match=message):
        clinical.choose_referral_threshold(scores, correct, target)


def test_apply_threshold_counts():
    outcome = clinical.apply_threshold([0.1, 0.4, 0.4, 0.7], [True, False, True, False], 0.4)
    assert outcome == {"referred_fraction": 0.25, "accuracy_kept": pytest.approx(2 / 3), "num_scans": 4,
                       "num_referred": 1}


def test_per_class_ece_mean_is_classwise():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), size=200)
    labels = rng.integers(0, 4, size=200)
    per_class = clinical.per_class_calibration_error(probs, labels)
    assert per_class.shape == (4,)
    assert per_class.mean() == pytest.approx(calibration.classwise_calibration_error(probs, labels), abs=1e-15)


def test_per_class_ece_hand_value():
    # Column 0 is 0.9 for two scans of class 0 and 0.1 for two others: bins (0.867, 0.933]
    # and (0.067, 0.133] with frequencies 1 and 0, so gaps 0.1 each and ECE 0.1.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    errors = clinical.per_class_calibration_error(probs, np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(errors, [0.1, 0.1], atol=1e-12)


def test_ood_auroc_direction():
    mri = {"predictive_entropy": np.array([0.1, 0.2, 0.3])}
    assert clinical.ood_auroc(mri, {"predictive_entropy": np.array([0.5, 0.6])})["predictive_entropy"] == 1.0
    assert clinical.ood_auroc(mri, {"predictive_entropy": np.array([0.0, 0.05])})["predictive_entropy"] == 0.0


# --------------------------------------------------------------------------------------------
# write_clinical_outputs on hand-made predictions


@pytest.fixture
def hand_made_outputs(tmp_path, monkeypatch):
    # 20 test scans; the two wrong ones (0 and 1) have the lowest confidence, so the highest
    # entropy, but the lowest mutual information.
    labels = np.arange(20) % 4
    confidence = np.linspace(0.95, 0.6, 20)[::-1].copy()
    wrong = (0, 1)
    mutual = np.linspace(0.01, 0.2, 20)
    test = {"deterministic": _predictions(labels, confidence, wrong),
            "bayesian": _predictions(labels, confidence, wrong, mutual=mutual)}
    # 10 validation scans, confidence falling with the index; the last two are wrong.
    val_labels = np.arange(10) % 4
    validation = {name: _predictions(val_labels, np.linspace(0.99, 0.5, 10), (8, 9)) for name in test}
    monkeypatch.setattr("pipelines.runner.predict_both", lambda config, models, loader: validation)

    images = torch.zeros((20, 1, 8, 8), dtype=torch.uint8)
    test_set = ImageSet(images, torch.as_tensor(labels), [f"scan{i:02d}.png" for i in range(20)])
    val_set = ImageSet(images[:10], torch.as_tensor(val_labels))
    data = DataBundle("brain-mri", CLASSES, val_set, val_set, test_set, [0.5], [0.2], "scan", {})
    loaders = {name: BatchIterator(split, 10, [0.5], [0.2]) for name, split in
               (("val", val_set), ("test", test_set))}
    config = RunConfig(dataset="brain-mri", data_dir=str(tmp_path / "no-cifar"), out=str(tmp_path))
    result = clinical.write_clinical_outputs(tmp_path, config, data, None, loaders, test)
    return result, test, validation, tmp_path


def test_selective_risk_hand_numbers(hand_made_outputs):
    result = hand_made_outputs[0]["selective_risk"]
    entropy = result["bayesian"]["predictive_entropy"]["accuracy_at"]
    # Referring by entropy removes the two wrong scans first: ceil(0.05 * 20) = 1 referred keeps
    # 18 of 19 correct, 2 referred keep 18 of 18.
    assert entropy == {"0.00": 0.9, "0.05": 18 / 19, "0.10": 1.0, "0.20": 1.0}
    # Mutual information refers correct scans first, so the two errors stay in.
    mutual = result["bayesian"]["mutual_information"]["accuracy_at"]
    assert mutual == {"0.00": 0.9, "0.05": 17 / 19, "0.10": 16 / 18, "0.20": 14 / 16}
    assert set(result["deterministic"]) == {"predictive_entropy"}
    assert result["deterministic"]["predictive_entropy"]["accuracy_at"] == entropy


def test_referral_chosen_on_validation(hand_made_outputs):
    result, test, validation, out = hand_made_outputs
    referral = result["referral"]
    val_entropy = validation["bayesian"].predictive_entropy
    # The first 8 validation scans are correct and the least uncertain.
    assert referral["threshold"] == val_entropy[7]
    assert referral["val_accuracy_kept"] == 1.0
    assert referral["val_referred_fraction"] == pytest.approx(0.2)
    assert referral["met_target"] is True
    expected_referred = float(np.mean(test["bayesian"].predictive_entropy > val_entropy[7]))
    assert referral["test"]["bayesian"]["referred_fraction"] == pytest.approx(expected_referred)

    stored = json.loads((out / "referral.json").read_text())
    assert stored["threshold"] == referral["threshold"]
    assert stored["score"] == "predictive_entropy"
    assert stored["target_accuracy"] == 0.99
    assert stored["num_val"] == 10


def test_outputs_files_and_tables(hand_made_outputs):
    result, _, _, out = hand_made_outputs
    for name in ("clinical.md", "referral.json", "selective_risk.png", "cases_to_review.png",
                 "confusion_deterministic.png", "confusion_bayesian.png"):
        assert (out / name).is_file(), name
    deterministic = result["per_class"]["deterministic"]
    # Scan 0 (glioma) was called meningioma and scan 1 (meningioma) notumor.
    assert deterministic["confusion_matrix"][0] == [4, 1, 0, 0]
    assert deterministic["per_class"]["glioma"]["recall"] == 0.8
    assert deterministic["per_class"]["meningioma"]["precision"] == pytest.approx(4 / 5)
    assert "skipped" in result["out_of_distribution"]
    assert [case["scan"] for case in result["cases_to_review"][:2]] == ["scan00.png", "scan01.png"]
    assert len(result["cases_to_review"]) == 16
    json.dumps(result)  # must be JSON-serialisable for report.json
    markdown = (out / "clinical.md").read_text()
    assert "| CNN + Bayesian head (SVI) | mutual information | 0.9000 | 0.8947 | 0.8889 | 0.8750 |" in markdown


# --------------------------------------------------------------------------------------------
# A tiny real run, and bayeshead predict on it


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = real_data_root()
    if not (root / "brain-tumor-mri" / "Training").is_dir():
        pytest.skip(f"brain-tumour MRI scans not found under {root}/brain-tumor-mri (set BAYESHEAD_DATA)")
    from pipelines.runner import run

    folder = tmp_path_factory.mktemp("mri-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BAYESHEAD_CACHE", str(folder / "cache"))
        report = run(RunConfig(dataset="brain-mri", data_dir=str(root), subset=40, image_size=32, epochs=1,
                               widths=(4, 8), convs_per_block=1, out=str(folder / "run"), progress=False))
    return folder / "run", report


def test_run_writes_clinical_report(tiny_run):
    run_dir, report = tiny_run
    stored = json.loads((run_dir / "report.json").read_text())
    assert stored["clinical"]["referral"]["threshold"] == report["clinical"]["referral"]["threshold"]
    assert stored["data_source"]["image_size"] == 32
    assert stored["data_source"]["leakage"]["test_scans_checked"] == 40
    ood = stored["clinical"]["out_of_distribution"]
    if "skipped" not in ood:
        assert ood["num_images"] == 1000
        for value in (ood["auroc"]["bayesian"]["predictive_entropy"], ood["auroc"]["bayesian"]["mutual_information"]):
            assert 0.0 <= value <= 1.0
        assert ood["auroc"]["deterministic"]["mutual_information"] is None
        assert sum(ood["labelled_as"]["bayesian"]["predicted_class_counts"].values()) == 1000
        assert 0.25 <= ood["labelled_as"]["bayesian"]["mean_confidence"] <= 1.0
    assert "## Inputs that are not brain MRI" in (run_dir / "clinical.md").read_text()
    check = stored["clinical"]["input_check"]
    saved = torch.load(run_dir / "input_check.pt", weights_only=True)
    assert saved["threshold"] == check["threshold"] > 0
    assert saved["means"].shape == (4, 8)  # 4 classes, 8 backbone features
    assert 0.0 <= check["test_referred_fraction"] <= 1.0
    assert "## Input check" in (run_dir / "clinical.md").read_text()


def test_predict_matches_run(tiny_run, capsys):
    run_dir, report = tiny_run
    cases = report["clinical"]["cases_to_review"][:3]
    code = main(["predict", str(run_dir), *[case["scan"] for case in cases], "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    threshold = report["clinical"]["referral"]["threshold"]
    assert [row["scan"] for row in rows] == [case["scan"] for case in cases]
    for row, case in zip(rows, cases, strict=True):
        # The same preprocessing and posterior samples as in the run give the same numbers.
        for name in CLASSES:
            assert row["probabilities"][name] == pytest.approx(case["probabilities"][name], abs=1e-5)
        assert row["predicted_class"] == max(row["probabilities"], key=row["probabilities"].get)
        assert row["refer"] is (row["predictive_entropy"] > threshold or row["unlike_training"])
        assert row["unlike_training"] is (row["input_distance"] > report["clinical"]["input_check"]["threshold"])
        assert row["threshold"] == threshold


def test_predict_corrupt_file_reported(tiny_run, tmp_path, capsys):
    run_dir, report = tiny_run
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    good = report["clinical"]["cases_to_review"][0]["scan"]
    missing = tmp_path / "absent.png"
    code = main(["predict", str(run_dir), str(broken), str(missing), str(tmp_path), good, "--json"])
    captured = capsys.readouterr()
    assert code == 1
    assert f"bayeshead: error: cannot decode image {broken}" in captured.err
    assert f"bayeshead: error: image {missing} not found" in captured.err
    assert f"bayeshead: error: {tmp_path} is a folder, not an image file" in captured.err
    assert [row["scan"] for row in json.loads(captured.out)] == [good]


def test_predict_table(tiny_run, capsys):
    run_dir, report = tiny_run
    scan = report["clinical"]["cases_to_review"][0]["scan"]
    assert main(["predict", str(run_dir), scan]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| scan | predicted | p(glioma) | p(meningioma) | p(notumor) | p(pituitary) |")
    assert lines[2].startswith(f"| {scan} |")
    assert lines[2].rstrip(" |").endswith(("refer", "accept"))


def test_predict_without_training_data(tiny_run, tmp_path, monkeypatch, capsys):
    run_dir, report = tiny_run
    moved = tmp_path / "moved-run"
    shutil.copytree(run_dir, moved)
    stored = json.loads((moved / "report.json").read_text())
    stored["config"]["data_dir"] = str(tmp_path / "absent")
    (moved / "report.json").write_text(json.dumps(stored))

    def fail(*args, **kwargs):
        raise AssertionError("predict must not load a dataset")

    monkeypatch.setattr("pipelines.runner.load_dataset", fail)
    scan = report["clinical"]["cases_to_review"][0]["scan"]
    assert main(["predict", str(moved), scan, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_predict_missing_run_dir(tmp_path, capsys):
    code = main(["predict", str(tmp_path / "absent"), "scan.jpg"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.strip() == f"bayeshead: error: run folder {tmp_path / 'absent'} not found: " \
                            "expected the output folder of 'bayeshead run'"


def test_predict_missing_referral(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    shutil.copy(run_dir / "report.json", tmp_path / "report.json")
    code = main(["predict", str(tmp_path), "scan.jpg"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith(f"bayeshead: error: no referral.json in {tmp_path}")
    assert len(error.strip().splitlines()) == 1
    assert "Traceback" not in error


def test_input_check_hand_made_clusters():
    # Two classes at (0, 0) and (10, 0) with unit variance: a point far from both is flagged,
    # a class mean scores 0, and the threshold is the 0.9 quantile of the validation scores.
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(2000) % 2
    features = torch.randn(2000, 2, generator=generator) + torch.stack([labels * 10.0, 0 * labels], 1)
    val = torch.randn(200, 2, generator=generator)
    check = clinical.fit_input_check(features, labels, val, num_classes=2, quantile=0.9)
    assert check["means"].shape == (2, 2)
    assert check["threshold"] == pytest.approx(np.quantile(clinical.input_distance(check, val), 0.9))
    distances = clinical.input_distance(check, torch.tensor([[0.0, 0.0], [10.0, 0.0], [5.0, 30.0]]))
    assert clinical.input_distance(check, check["means"]) == pytest.approx([0.0, 0.0], abs=1e-9)
    assert distances[0] < 0.01
    assert distances[1] < 0.01
    assert distances[2] > 100 * check["threshold"]
    # Unit covariance: the squared distance of (0, 3) to the first mean is about 9.
    assert clinical.input_distance(check, torch.tensor([[0.0, 3.0]]))[0] == pytest.approx(9.0, rel=0.15)


def test_input_check_rejects_missing_class():
    with pytest.raises(ValueError, match="training scans of every class; none of class \\[1\\]"):
        clinical.fit_input_check(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64), torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="needs validation scans"):
        clinical.fit_input_check(torch.zeros(4, 2), torch.arange(4) % 2, torch.zeros(0, 2), 2)


def test_fit_input_check_script_restores_check(tiny_run, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fit_input_check.py"
    spec = importlib.util.spec_from_file_location("fit_input_check", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    run_dir, report = tiny_run
    copy = tmp_path / "old-run"
    shutil.copytree(run_dir, copy)
    (copy / "input_check.pt").unlink()
    assert module.main([str(copy)]) == 0
    restored = torch.load(copy / "input_check.pt", weights_only=True)
    assert restored["threshold"] == pytest.approx(report["clinical"]["input_check"]["threshold"], rel=1e-9)
    assert "MRI test scans" in capsys.readouterr().out
    assert module.main([str(tmp_path / "absent")]) == 2
