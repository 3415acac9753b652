"""Tests for pipelines.calibration: golden values, reference implementations and properties."""

import doctest
import math
import warnings

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.functional.classification import multiclass_calibration_error

from pipelines import calibration
from pipelines.calibration import (
    accuracy,
    brier_score,
    calibration_summary,
    classwise_calibration_error,
    expected_calibration_error,
    expected_entropy,
    maximum_calibration_error,
    mutual_information,
    negative_log_likelihood,
    predictive_entropy,
    reliability_bins,
    reliability_diagram,
    selective_risk_curve,
)

# Four inputs whose numbers are exact in binary floating point.
#   confidence: 0.75, 0.5 (tie, predicts class 0), 0.75, 1.0
#   correct:    yes,  no,                         yes,  yes
EXAMPLE_PROBS = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
EXAMPLE_LABELS = np.array([0, 1, 1, 0])


def random_probs(rng: np.random.Generator, num_inputs: int, num_classes: int, alpha: float = 1.0):
    return rng.dirichlet(np.full(num_classes, alpha), size=num_inputs)


def labels_drawn_from(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """Draw one label per row from the row's categorical distribution."""
    uniform = rng.random(len(probs))[:, None]
    labels = (uniform > np.cumsum(probs, axis=1)).sum(axis=1)
    # The last cumulative sum can round to just below 1.
    return np.minimum(labels, probs.shape[1] - 1)


def row_with_confidence(confidence: float, num_classes: int) -> list[float]:
    """Return a probability row whose largest entry is ``confidence``, in column 0."""
    rest = (1.0 - confidence) / (num_classes - 1)
    assert rest < confidence, "the other classes must stay below the confidence"
    return [confidence] + [rest] * (num_classes - 1)


# ---------------------------------------------------------------------------------------------
# Hand-computed golden cases
# ---------------------------------------------------------------------------------------------


def test_reliability_bins_golden_example():
    # n_bins = 4, bins (0, .25], (.25, .5], (.5, .75], (.75, 1].
    # 0.5 closes bin 1, both 0.75 close bin 2, 1.0 is in bin 3, bin 0 is empty.
    bins = reliability_bins(EXAMPLE_PROBS, EXAMPLE_LABELS, n_bins=4)

    np.testing.assert_array_equal(bins.lower, [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_array_equal(bins.upper, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(bins.count, [0, 1, 2, 1])
    np.testing.assert_array_equal(bins.confidence, [np.nan, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(bins.accuracy, [np.nan, 0.0, 1.0, 1.0])


def test_calibration_errors_golden_example():
    # Gaps per filled bin: |0 - .5| = .5, |1 - .75| = .25, |1 - 1| = 0.
    # ECE = 1/4 * .5 + 2/4 * .25 + 1/4 * 0 = .25, and MCE = .5.
    assert expected_calibration_error(EXAMPLE_PROBS, EXAMPLE_LABELS, n_bins=4) == 0.25
    assert maximum_calibration_error(EXAMPLE_PROBS, EXAMPLE_LABELS, n_bins=4) == 0.5


def test_classwise_error_golden_example():
    # n_bins = 4. Class 0: p = [.75, .5, .25, 1], y == 0: [1, 0, 0, 1], one input per bin,
    #   gaps .25, .5, .25, 0, each weighted 1/4 -> .25.
    # Class 1: p = [.25, .5, .75, 0], y == 1: [0, 1, 1, 0]. Bin 0 contains 0 and .25
    #   (mean .125, frequency 0), weighted 2/4 -> .0625. Bins 1 and 2: gaps .5 and .25,
    #   weighted 1/4 -> .125 + .0625. Sum .25.
    # Mean over the two classes: .25.
    assert classwise_calibration_error(EXAMPLE_PROBS, EXAMPLE_LABELS, n_bins=4) == 0.25


def test_scoring_rules_golden_example():
    # Brier per input: .25² + .25² = .125, .5² + .5² = .5, .125, 0 -> mean .75 / 4 = .1875.
    # NLL = -(ln .75 + ln .5 + ln .75 + ln 1) / 4.
    expected_nll = -(2 * math.log(0.75) + math.log(0.5)) / 4

    assert accuracy(EXAMPLE_PROBS, EXAMPLE_LABELS) == 0.75
    assert brier_score(EXAMPLE_PROBS, EXAMPLE_LABELS) == 0.1875
    assert negative_log_likelihood(EXAMPLE_PROBS, EXAMPLE_LABELS) == pytest.approx(
        expected_nll, rel=1e-15
    )


def test_quantile_ece_golden_example():
    # Sorted confidences .5 (wrong), .75, .75, 1 (right). Two groups of two:
    #   group 0: mean confidence .625, accuracy .5 -> gap .125
    #   group 1: mean confidence .875, accuracy 1 -> gap .125
    # ECE = 1/2 * .125 + 1/2 * .125 = .125.
    ece = expected_calibration_error(EXAMPLE_PROBS, EXAMPLE_LABELS, n_bins=2, strategy="quantile")
    assert ece == 0.125


def test_quantile_ece_more_bins_than_inputs():
    # With 10 bins and 4 inputs each input is its own group and six groups are empty:
    # ECE = (|1 - .75| + |0 - .5| + |1 - .75| + |1 - 1|) / 4 = .25.
    ece = expected_calibration_error(EXAMPLE_PROBS, EXAMPLE_LABELS, n_bins=10, strategy="quantile")
    assert ece == 0.25


def test_quantile_ece_ignores_input_order_with_ties():
    # Four inputs tie at confidence .6, two right and two wrong, so a split through the tie
    # would depend on the input order unless ties are ordered by correctness.
    probs = np.array([[0.6, 0.4]] * 4 + [[0.9, 0.1]] * 2)
    labels = np.array([0, 1, 0, 1, 0, 0])
    order = np.array([1, 3, 0, 2, 5, 4])

    ece = expected_calibration_error(probs, labels, n_bins=3, strategy="quantile")
    reordered = expected_calibration_error(
        probs[order], labels[order], n_bins=3, strategy="quantile"
    )
    assert ece == reordered


def test_one_hot_probs_all_correct():
    # One-hot predictions that are all right: every gap and every loss is 0.
    probs = np.eye(3)
    labels = np.array([0, 1, 2])

    assert expected_calibration_error(probs, labels) == 0.0
    assert maximum_calibration_error(probs, labels) == 0.0
    assert classwise_calibration_error(probs, labels) == 0.0
    assert negative_log_likelihood(probs, labels) == 0.0
    assert brier_score(probs, labels) == 0.0


def test_one_hot_probs_all_wrong():
    # One-hot predictions that are all wrong: confidence 1, accuracy 0.
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = np.array([1, 2])
    # Classwise, 15 bins: class 0 column [1, 0] against [0, 0] -> 1/2 * 1 = .5.
    # Class 1 column [0, 1] against [1, 0] -> 1/2 * 1 + 1/2 * 1 = 1.
    # Class 2 column [0, 0], one bin, against [0, 1] -> |.5 - 0| = .5. Mean 2/3.
    assert expected_calibration_error(probs, labels) == 1.0
    assert maximum_calibration_error(probs, labels) == 1.0
    assert classwise_calibration_error(probs, labels) == pytest.approx(2 / 3, rel=1e-15)
    # Each input: (1 - 0)² + (0 - 1)² = 2.
    assert brier_score(probs, labels) == 2.0
    with pytest.warns(RuntimeWarning, match="is 0 for 2 of 2 inputs"):
        assert negative_log_likelihood(probs, labels) == math.inf


def test_nll_zero_probability_warns_once():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]])
    labels = np.array([1, 0, 0, 1])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nll = negative_log_likelihood(probs, labels)

    assert nll == math.inf
    # Only this module's warning: numpy's divide-by-zero warning must not appear as well.
    assert len(caught) == 1
    assert caught[0].category is RuntimeWarning
    assert "is 0 for 2 of 4 inputs" in str(caught[0].message)


def test_all_inputs_at_one_confidence():
    # Five inputs at confidence .6, two of them right: accuracy .4, ECE = MCE = |.4 - .6|.
    # .6 = 9/15 lies on an edge of the 15 default bins and closes bin 8.
    probs = np.array([[0.6, 0.3, 0.1]] * 5)
    labels = np.array([0, 0, 1, 2, 1])
    bins = reliability_bins(probs, labels)

    assert bins.count[8] == 5
    assert bins.count.sum() == 5
    assert expected_calibration_error(probs, labels) == pytest.approx(0.2, abs=1e-12)
    assert maximum_calibration_error(probs, labels) == pytest.approx(0.2, abs=1e-12)


@pytest.mark.parametrize("n_bins", range(1, 21))
def test_edge_confidence_in_bin_it_closes(n_bins):
    # One input at each confidence k / M, as Python computes it, for k = 1..M. Each edge
    # closes bin k - 1, so every bin contains exactly one input. The float k / M is sometimes
    # above the rational k/M (1 / 5 = 0.2 is), and it must still close bin k - 1.
    probs = np.array([row_with_confidence(k / n_bins, n_bins + 1) for k in range(1, n_bins + 1)])
    labels = np.zeros(n_bins, dtype=int)

    bins = reliability_bins(probs, labels, n_bins=n_bins)

    np.testing.assert_array_equal(bins.count, np.ones(n_bins, dtype=int))
    np.testing.assert_array_equal(bins.confidence, [k / n_bins for k in range(1, n_bins + 1)])


@pytest.mark.parametrize("n_bins", range(2, 21))
def test_confidence_next_to_edge(n_bins):
    # The float just above k / M starts bin k, and the float just below stays in bin k - 1.
    for k in range(1, n_bins):
        above = np.nextafter(k / n_bins, 2.0)
        below = np.nextafter(k / n_bins, 0.0)
        probs = np.array([row_with_confidence(c, n_bins + 1) for c in (above, below)])

        bins = reliability_bins(probs, np.zeros(2, dtype=int), n_bins=n_bins)

        assert bins.count[k] == 1, f"k={k}: the float above k / M is not in bin k"
        assert bins.count[k - 1] == 1, f"k={k}: the float below k / M is not in bin k - 1"


def test_edge_binning_with_25_bins():
    # 7 / 25 * 25 evaluates to 7.000000000000001, so ceil(c * M) - 1 would give bin 7.
    confidence = 7 / 25
    assert confidence * 25 > 7
    probs = np.array([row_with_confidence(confidence, 26)])

    bins = reliability_bins(probs, np.array([0]), n_bins=25)

    assert bins.count[6] == 1


def test_empty_bin_in_middle():
    # n_bins = 5. Confidence .3 is in bin 1 (.2, .4] and right; .9 is in bin 4 (.8, 1] and
    # wrong. Bins 2 and 3 are empty.
    # ECE = 1/2 * |1 - .3| + 1/2 * |0 - .9| = .35 + .45 = .8. MCE = .9.
    probs = np.array([[0.3, 0.25, 0.25, 0.2], [0.9, 0.1, 0.0, 0.0]])
    labels = np.array([0, 1])

    bins = reliability_bins(probs, labels, n_bins=5)

    np.testing.assert_array_equal(bins.count, [0, 1, 0, 0, 1])
    np.testing.assert_array_equal(bins.confidence, [np.nan, 0.3, np.nan, np.nan, 0.9])
    np.testing.assert_array_equal(bins.accuracy, [np.nan, 1.0, np.nan, np.nan, 0.0])
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.8, abs=1e-15)
    assert maximum_calibration_error(probs, labels, n_bins=5) == 0.9


def test_single_class():
    probs = np.ones((4, 1))
    labels = np.zeros(4, dtype=int)

    assert accuracy(probs, labels) == 1.0
    assert expected_calibration_error(probs, labels) == 0.0
    assert maximum_calibration_error(probs, labels) == 0.0
    assert classwise_calibration_error(probs, labels) == 0.0
    assert negative_log_likelihood(probs, labels) == 0.0
    assert brier_score(probs, labels) == 0.0
    np.testing.assert_array_equal(predictive_entropy(np.ones((3, 4, 1))), np.zeros(4))


def test_labels_cover_only_some_classes():
    # Three classes, every label 0, n_bins = 4.
    # Top label: confidences .5 (bin 1) and .75 (bin 2), both right:
    #   ECE = 1/2 * |1 - .5| + 1/2 * |1 - .75| = .375.
    # Classwise: class 0 as the top label, .375. Classes 1 and 2: columns [.25, .125] in bin 0
    #   with mean .1875 and frequency 0 -> .1875 each. Mean (.375 + .1875 + .1875) / 3 = .25.
    probs = np.array([[0.5, 0.25, 0.25], [0.75, 0.125, 0.125]])
    labels = np.array([0, 0])

    assert expected_calibration_error(probs, labels, n_bins=4) == 0.375
    assert classwise_calibration_error(probs, labels, n_bins=4) == 0.25


def test_argmax_ties_predict_first_class():
    # Rows tie between two classes, so the first of them is predicted:
    # row 0 predicts 0 (label 0, right), row 1 predicts 0 (label 1, wrong),
    # row 2 predicts 1 (label 2, wrong). Accuracy 1/3.
    # Confidence .4 = 6/15 for every row closes bin 5: ECE = |1/3 - .4| = 1/15.
    probs = np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.2, 0.4, 0.4]])
    labels = np.array([0, 1, 2])

    bins = reliability_bins(probs, labels)

    assert accuracy(probs, labels) == pytest.approx(1 / 3, rel=1e-15)
    assert bins.count[5] == 3
    assert expected_calibration_error(probs, labels) == pytest.approx(1 / 15, abs=1e-15)


def test_calibration_summary_keys_and_values():
    summary = calibration_summary(EXAMPLE_PROBS, EXAMPLE_LABELS, n_bins=4)

    assert list(summary) == ["accuracy", "ece", "mce", "nll", "brier"]
    assert all(type(value) is float for value in summary.values())
    assert summary["accuracy"] == 0.75
    assert summary["ece"] == 0.25
    assert summary["mce"] == 0.5
    assert summary["brier"] == 0.1875


# ---------------------------------------------------------------------------------------------
# Cross-checks against independent implementations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_ece_and_mce_match_torchmetrics(seed, n_bins):
    # torchmetrics 1.x bins with torch.bucketize(right=True), so its bins are [lo, hi) and a
    # confidence on an edge lands one bin higher than here. It also computes in float32.
    # Random confidences at least 1e-6 from every edge make the binning identical, and the
    # float32 sums then agree with ours to about 1e-6.
    rng = np.random.default_rng(seed)
    probs = random_probs(rng, 1000, 4, alpha=0.5)
    labels = labels_drawn_from(rng, probs)
    edges = np.arange(n_bins + 1) / n_bins
    distance_to_edge = np.abs(probs.max(axis=1)[:, None] - edges[None, :]).min()
    assert distance_to_edge > 1e-6

    preds, target = torch.from_numpy(probs).float(), torch.from_numpy(labels)
    reference_ece = multiclass_calibration_error(preds, target, 4, n_bins=n_bins, norm="l1")
    reference_mce = multiclass_calibration_error(preds, target, 4, n_bins=n_bins, norm="max")

    ece = expected_calibration_error(probs, labels, n_bins=n_bins)
    mce = maximum_calibration_error(probs, labels, n_bins=n_bins)
    assert ece == pytest.approx(reference_ece.item(), abs=1e-5)
    assert mce == pytest.approx(reference_mce.item(), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_nll_and_brier_match_sklearn(seed):
    # Dirichlet(2) rows keep every probability far above the 2.2e-16 to which log_loss clips,
    # so the clipping that this module leaves out changes nothing here.
    rng = np.random.default_rng(seed)
    probs = random_probs(rng, 500, 5, alpha=2.0)
    labels = labels_drawn_from(rng, probs)
    one_hot = np.eye(5)[labels]

    reference_nll = log_loss(labels, probs, labels=np.arange(5))
    reference_brier = brier_score_loss(labels, probs, labels=np.arange(5), scale_by_half=False)
    manual_brier = np.mean(np.sum((probs - one_hot) ** 2, axis=1))

    assert negative_log_likelihood(probs, labels) == pytest.approx(reference_nll, rel=1e-12)
    assert brier_score(probs, labels) == pytest.approx(reference_brier, rel=1e-12)
    assert brier_score(probs, labels) == pytest.approx(manual_brier, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


def all_measures(probs, labels, sample_probs, uncertainty) -> dict:
    curve = selective_risk_curve(probs, labels, uncertainty)
    return {
        "accuracy": accuracy(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "ece_quantile": expected_calibration_error(probs, labels, strategy="quantile"),
        "mce": maximum_calibration_error(probs, labels),
        "classwise": classwise_calibration_error(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "bin_counts": reliability_bins(probs, labels).count,
        "predictive_entropy": predictive_entropy(sample_probs),
        "expected_entropy": expected_entropy(sample_probs),
        "mutual_information": mutual_information(sample_probs),
        "curve_accuracy": curve.accuracy,
        "aurc": curve.aurc,
    }


def test_relabelling_classes_changes_nothing():
    # Continuous random probabilities have no ties, so the predicted class moves with the
    # relabelling. Sums over classes run in a different order, hence rel=1e-12.
    rng = np.random.default_rng(3)
    sample_probs = rng.dirichlet(np.ones(6), size=(8, 300))
    probs = sample_probs.mean(axis=0)
    labels = labels_drawn_from(rng, probs)
    uncertainty = rng.random(300)
    permutation = rng.permutation(6)
    # Column j of the new probabilities is old class permutation[j], so old label y is now
    # the position of y in the permutation.
    new_labels = np.argsort(permutation)[labels]

    before = all_measures(probs, labels, sample_probs, uncertainty)
    after = all_measures(
        probs[:, permutation], new_labels, sample_probs[:, :, permutation], uncertainty
    )

    for name, value in before.items():
        np.testing.assert_allclose(after[name], value, rtol=1e-12, atol=0, err_msg=name)


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_ece_near_zero_on_calibrated_data(strategy):
    # Labels drawn from the probabilities themselves make the probabilities calibrated, so
    # only sampling noise remains. With 200,000 inputs in 15 bins of about 13,000 each, the
    # per-bin accuracy has a standard error of at most sqrt(.25 / 13,000) = .0044, so the
    # weighted mean gap is a few thousandths; 0.01 leaves room for that. Seeds 0-4 gave
    # .0019 to .0047 when this test was written.
    rng = np.random.default_rng(0)
    probs = random_probs(rng, 200_000, 3)
    labels = labels_drawn_from(rng, probs)

    assert expected_calibration_error(probs, labels, strategy=strategy) < 0.01


def test_ece_detects_overconfidence():
    # Control for the test above: the same labels with cubed and renormalised probabilities
    # are overconfident, and ECE rises far above 0.01 (about 0.21 when this test was written).
    rng = np.random.default_rng(0)
    probs = random_probs(rng, 200_000, 3)
    labels = labels_drawn_from(rng, probs)
    sharpened = probs**3 / np.sum(probs**3, axis=1, keepdims=True)

    assert expected_calibration_error(sharpened, labels) > 0.1


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tensor_input_matches_numpy(device, dtype):
    rng = np.random.default_rng(4)
    sample_probs = rng.dirichlet(np.ones(4), size=(5, 200))
    probs = sample_probs.mean(axis=0)
    labels = labels_drawn_from(rng, probs)
    uncertainty = rng.random(200)
    numpy_dtype = np.float64 if dtype == torch.float64 else np.float32
    sample_probs, probs, uncertainty = (
        array.astype(numpy_dtype) for array in (sample_probs, probs, uncertainty)
    )

    expected = all_measures(probs, labels, sample_probs, uncertainty)
    actual = all_measures(
        torch.tensor(probs, device=device, requires_grad=True),
        torch.tensor(labels, device=device),
        torch.tensor(sample_probs, device=device),
        torch.tensor(uncertainty, device=device),
    )

    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def test_bfloat16_tensor_is_accepted():
    probs = torch.tensor(EXAMPLE_PROBS, dtype=torch.bfloat16)
    labels = torch.tensor(EXAMPLE_LABELS)

    # 0.75, 0.5, 0.25 and 1 are exact in bfloat16.
    assert expected_calibration_error(probs, labels, n_bins=4) == 0.25


def test_entropy_golden_values():
    # Input 0: the samples put all mass on different classes, predictive = ln 2, expected 0.
    # Input 1: every sample is uniform over 3 classes, predictive = expected = ln 3.
    sample_probs = np.array(
        [
            [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]],
            [[0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]],
        ]
    )

    np.testing.assert_allclose(
        predictive_entropy(sample_probs), [math.log(2), math.log(3)], rtol=1e-15
    )
    np.testing.assert_allclose(expected_entropy(sample_probs), [0.0, math.log(3)], rtol=1e-15)
    np.testing.assert_allclose(
        mutual_information(sample_probs), [math.log(2), 0.0], rtol=1e-15, atol=1e-15
    )


def test_mutual_information_properties():
    rng = np.random.default_rng(5)
    sample_probs = rng.dirichlet(np.full(5, 0.3), size=(20, 100))

    total = predictive_entropy(sample_probs)
    aleatoric = expected_entropy(sample_probs)
    epistemic = mutual_information(sample_probs)

    assert epistemic.shape == (100,)
    assert np.all(epistemic >= 0)
    # Jensen's inequality, up to rounding.
    assert np.all(aleatoric <= total + 1e-12)
    np.testing.assert_allclose(epistemic, total - aleatoric, rtol=0, atol=1e-12)


def test_mutual_information_zero_on_agreement():
    # The mean of identical rows can differ from them in the last bit, so the difference of
    # the two entropies is only zero up to about 1e-16 before clipping.
    rng = np.random.default_rng(6)
    single = rng.dirichlet(np.ones(7), size=50)
    sample_probs = np.broadcast_to(single, (10, 50, 7))

    epistemic = mutual_information(sample_probs)

    assert np.all(epistemic >= 0)
    np.testing.assert_allclose(epistemic, 0.0, rtol=0, atol=1e-12)


def test_entropy_averages_probabilities_not_logits():
    # Two samples with logits [4, 0] and [0, 0]. Averaging their softmax gives
    # [(0.982 + 0.5) / 2, ...] = [0.741, 0.259], whereas the softmax of the mean logits [2, 0]
    # is [0.881, 0.119]. The two entropies differ by about 0.19 nats.
    logits = torch.tensor([[[4.0, 0.0]], [[0.0, 0.0]]], dtype=torch.float64)
    sample_probs = torch.softmax(logits, dim=-1)
    mean_probs = sample_probs.mean(dim=0).numpy()
    mean_logit_probs = torch.softmax(logits.mean(dim=0), dim=-1).numpy()

    def entropy(p):
        return -np.sum(p * np.log(p), axis=-1)

    result = predictive_entropy(sample_probs)

    np.testing.assert_allclose(result, entropy(mean_probs), rtol=1e-14)
    assert abs(result[0] - entropy(mean_logit_probs)[0]) > 0.1


# ---------------------------------------------------------------------------------------------
# Reliability diagram
# ---------------------------------------------------------------------------------------------


def bar_container(ax, label):
    containers = [c for c in ax.containers if c.get_label() == label]
    assert len(containers) == 1, f"expected one bar container labelled {label!r}"
    return containers[0]


def test_reliability_diagram_new_figure(tmp_path):
    # Bins of the example with n_bins = 4: counts [0, 1, 2, 1], accuracy [-, 0, 1, 1].
    figure = reliability_diagram(EXAMPLE_PROBS, EXAMPLE_LABELS, n_bins=4, title="Example")
    reliability_ax, histogram_ax = figure.axes
    accuracy_bars = bar_container(reliability_ax, "Accuracy")
    gap_bars = bar_container(reliability_ax, "Gap to mean confidence")
    histogram_heights = [patch.get_height() for patch in histogram_ax.patches]

    assert isinstance(figure, Figure)
    assert len(figure.axes) == 2
    assert reliability_ax.get_legend().get_title().get_text() == "ECE = 0.2500"
    assert reliability_ax.get_title() == "Example"
    assert len(accuracy_bars) == 4
    assert [bar.get_height() for bar in accuracy_bars] == [0.0, 0.0, 1.0, 1.0]
    assert [bar.get_x() for bar in accuracy_bars] == [0.0, 0.25, 0.5, 0.75]
    # Gaps .5 in bin 1 (from 0 up to .5) and .25 in bin 2 (from .75 up to 1).
    assert [bar.get_height() for bar in gap_bars] == [0.0, 0.5, 0.25, 0.0]
    assert histogram_heights == [0, 1, 2, 1]

    path = tmp_path / "reliability.png"
    figure.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reliability_diagram_on_given_axes(tmp_path):
    figure = Figure()
    ax = figure.add_subplot()

    result = reliability_diagram(EXAMPLE_PROBS, EXAMPLE_LABELS, n_bins=15, ax=ax)

    assert result is figure
    # matplotlib lists an inset among the child axes of its parent, not in figure.axes.
    assert len(figure.axes) == 1
    assert len(ax.child_axes) == 1
    # With 15 bins, 0.5 is in bin 7, both 0.75 in bin 11 and 1.0 in bin 14.
    histogram_heights = [patch.get_height() for patch in ax.child_axes[0].patches]
    assert histogram_heights == [0] * 7 + [1, 0, 0, 0, 2, 0, 0, 1]
    assert len(bar_container(ax, "Accuracy")) == 15
    assert ax.get_legend().get_title().get_text().startswith("ECE = ")
    figure.savefig(tmp_path / "on_axes.png")


# ---------------------------------------------------------------------------------------------
# Selective prediction
# ---------------------------------------------------------------------------------------------


def probs_with_correctness(correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Return probabilities that predict class 0 and labels that make ``correct`` true."""
    probs = np.tile([0.9, 0.1], (len(correct), 1))
    labels = np.where(correct, 0, 1)
    return probs, labels


def test_selective_risk_hand_computed():
    # Ten inputs, eight right. By decreasing uncertainty: input 2 (wrong), 5 (right),
    # 6 (wrong), then the rest.
    #   10% referred: input 2 -> 8 right of 9 kept.
    #   20% referred: inputs 2, 5 -> 7 right of 8 kept.
    #   30% referred: inputs 2, 5, 6 -> 7 of 7.
    correct = [True, True, False, True, True, True, False, True, True, True]
    uncertainty = [0.1, 0.2, 0.9, 0.3, 0.1, 0.8, 0.7, 0.0, 0.2, 0.1]
    probs, labels = probs_with_correctness(correct)

    curve = selective_risk_curve(probs, labels, uncertainty)

    np.testing.assert_array_equal(curve.referred_fraction, np.arange(10) / 10)
    np.testing.assert_array_equal(curve.coverage, np.arange(10, 0, -1) / 10)
    assert curve.accuracy[0] == 0.8
    assert curve.accuracy_at(0.0) == 0.8
    assert curve.accuracy_at(0.1) == 8 / 9
    assert curve.accuracy_at(0.2) == 7 / 8
    # 15% of 10 inputs rounds up to 2 referred.
    assert curve.accuracy_at(0.15) == 7 / 8
    assert curve.accuracy_at(0.3) == 1.0


def test_selective_aurc_perfect_and_worst_ranking():
    # Four inputs, the last one wrong.
    # Perfect ranking, the wrong input most uncertain: risks over coverage 4/4, 3/4, 2/4, 1/4
    #   are 1/4, 0, 0, 0 -> AURC = (1/4) / 4 = 1/16.
    # Worst ranking, the wrong input least uncertain: risks 1/4, 1/3, 1/2, 1
    #   -> AURC = (1/4 + 1/3 + 1/2 + 1) / 4 = 25/48.
    probs, labels = probs_with_correctness([True, True, True, False])

    perfect = selective_risk_curve(probs, labels, [0.1, 0.2, 0.3, 0.9])
    worst = selective_risk_curve(probs, labels, [0.5, 0.6, 0.7, 0.0])

    assert perfect.aurc == 1 / 16
    assert worst.aurc == pytest.approx(25 / 48, rel=1e-15)
    np.testing.assert_allclose(worst.accuracy, [3 / 4, 2 / 3, 1 / 2, 0.0], rtol=1e-15)


def test_selective_ties_refer_lower_index_first():
    # All uncertainties are equal, so input 0 is referred first.
    # Input 0 wrong: 3 right of 3 kept. Input 0 right: 2 right of 3 kept.
    wrong_first = selective_risk_curve(
        *probs_with_correctness([False, True, True, True]), [1.0] * 4
    )
    right_first = selective_risk_curve(
        *probs_with_correctness([True, True, True, False]), [1.0] * 4
    )

    assert wrong_first.accuracy[1] == 1.0
    assert right_first.accuracy[1] == 2 / 3


def test_accuracy_at_compares_with_float_fractions():
    # 0.07 * 100 evaluates to 7.000000000000001, and ceil of that would refer 8 inputs.
    assert 0.07 * 100 > 7
    correct = [True] * 100
    correct[92] = False
    uncertainty = np.arange(100.0)  # Input 99 is referred first, input 92 eighth.
    curve = selective_risk_curve(*probs_with_correctness(correct), uncertainty)

    assert curve.accuracy_at(0.07) == 92 / 93
    assert curve.accuracy_at(0.08) == 1.0


@pytest.mark.parametrize("fraction", [1.0, 0.95, -0.1, float("nan"), True, "0.5"])
def test_accuracy_at_rejects_invalid_fraction(fraction):
    curve = selective_risk_curve(EXAMPLE_PROBS, EXAMPLE_LABELS, [0.1, 0.9, 0.3, 0.2])

    with pytest.raises(ValueError, match=r"referred_fraction must be a number in \[0, 0\.75\]"):
        curve.accuracy_at(fraction)


def test_result_arrays_are_read_only():
    bins = reliability_bins(EXAMPLE_PROBS, EXAMPLE_LABELS)
    curve = selective_risk_curve(EXAMPLE_PROBS, EXAMPLE_LABELS, [0.1, 0.9, 0.3, 0.2])

    with pytest.raises(ValueError, match="read-only"):
        bins.count[0] = 1
    with pytest.raises(ValueError, match="read-only"):
        curve.accuracy[0] = 0.0


# ---------------------------------------------------------------------------------------------
# Invalid input
# ---------------------------------------------------------------------------------------------

VALID_PROBS = [[0.5, 0.5], [0.2, 0.8]]
VALID_LABELS = [0, 1]

INVALID_INPUTS = {
    "probs_not_2d": (
        {"probs": [0.5, 0.5]},
        r"probs must be 2-D with shape \(N, num_classes\), but got shape \(2,\)",
    ),
    "probs_empty": (
        {"probs": np.zeros((0, 2)), "labels": np.zeros(0, dtype=int)},
        r"probs must not be empty, but got shape \(0, 2\)",
    ),
    "probs_nan": (
        {"probs": [[0.5, 0.5], [np.nan, 0.5]]},
        r"probs must contain only finite values, but the value at index \(1, 0\) is nan "
        r"\(NaN or inf values in total: 1\)",
    ),
    "probs_inf": (
        {"probs": [[0.5, np.inf], [0.5, 0.5]]},
        r"probs must contain only finite values.*index \(0, 1\)",
    ),
    "probs_below_zero": (
        {"probs": [[1.5, -0.5], [0.5, 0.5]]},
        r"probs must lie in \[0, 1\], but got 1\.5 at index \(0, 0\)",
    ),
    "probs_row_sum": (
        {"probs": [[0.5, 0.5], [0.6, 0.6]]},
        r"probs must have rows that sum to 1 \(tolerance 0\.0001\), but row 1 sums to 1\.2",
    ),
    "probs_not_numbers": (
        {"probs": [["a", "b"], ["c", "d"]]},
        r"probs must contain real numbers, but got dtype <U1",
    ),
    "probs_ragged": (
        {"probs": [[0.5, 0.5], [1.0]]},
        r"probs must be an array of numbers, but numpy could not convert it",
    ),
    "labels_float": (
        {"labels": [0.0, 1.0]},
        r"labels must be an integer array of class indices, but got dtype float64",
    ),
    "labels_bool": (
        {"labels": [True, False]},
        r"labels must be an integer array of class indices, but got dtype bool",
    ),
    "labels_too_large": (
        {"labels": [0, 2]},
        r"labels must lie in \[0, num_classes\) = \[0, 2\), but got 2 at index 1",
    ),
    "labels_negative": (
        {"labels": [-1, 0]},
        r"labels must lie in \[0, num_classes\) = \[0, 2\), but got -1 at index 0",
    ),
    "labels_not_1d": (
        {"labels": [[0, 1]]},
        r"labels must be 1-D with shape \(N,\), but got shape \(1, 2\)",
    ),
    "labels_wrong_length": (
        {"labels": [0, 1, 1]},
        r"labels must have one entry per row of probs \(N = 2\), but got length 3",
    ),
    "n_bins_zero": ({"n_bins": 0}, r"n_bins must be an int >= 1, but got 0"),
    "n_bins_float": ({"n_bins": 10.0}, r"n_bins must be an int >= 1, but got 10\.0"),
    "n_bins_bool": ({"n_bins": True}, r"n_bins must be an int >= 1, but got True"),
    "strategy_unknown": (
        {"strategy": "equal"},
        r"strategy must be one of 'uniform', 'quantile', but got 'equal'",
    ),
}


@pytest.mark.parametrize("case", list(INVALID_INPUTS))
def test_expected_calibration_error_rejects(case):
    overrides, message = INVALID_INPUTS[case]
    arguments = {"probs": VALID_PROBS, "labels": VALID_LABELS, **overrides}

    with pytest.raises(ValueError, match=message):
        expected_calibration_error(**arguments)


PROBS_AND_LABELS_FUNCTIONS = [
    accuracy,
    brier_score,
    calibration_summary,
    classwise_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    reliability_diagram,
]


@pytest.mark.parametrize("function", PROBS_AND_LABELS_FUNCTIONS, ids=lambda f: f.__name__)
def test_every_function_rejects_bad_probs(function):
    with pytest.raises(ValueError, match=r"probs must have rows that sum to 1"):
        function([[0.5, 0.6], [0.2, 0.8]], VALID_LABELS)


@pytest.mark.parametrize("function", PROBS_AND_LABELS_FUNCTIONS, ids=lambda f: f.__name__)
def test_every_function_rejects_bad_labels(function):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes\)"):
        function(VALID_PROBS, [0, 5])


@pytest.mark.parametrize(
    "function", [classwise_calibration_error, maximum_calibration_error, reliability_bins]
)
def test_binned_functions_reject_bad_n_bins(function):
    with pytest.raises(ValueError, match=r"n_bins must be an int >= 1, but got -3"):
        function(VALID_PROBS, VALID_LABELS, n_bins=-3)


@pytest.mark.parametrize("function", [predictive_entropy, expected_entropy, mutual_information])
def test_entropy_rejects_sample_probs_not_3d(function):
    message = r"sample_probs must be 3-D with shape \(num_samples, N, num_classes\), but got shape \(2, 2\)"
    with pytest.raises(ValueError, match=message):
        function(np.array(VALID_PROBS))


@pytest.mark.parametrize("function", [predictive_entropy, expected_entropy, mutual_information])
def test_entropy_rejects_bad_sample_row(function):
    sample_probs = np.full((2, 3, 2), 0.5)
    sample_probs[1, 2] = [0.5, 0.4]

    with pytest.raises(ValueError, match=r"sample_probs must have rows .* sample 1, input 2 sums"):
        function(sample_probs)


@pytest.mark.parametrize("function", [predictive_entropy, expected_entropy, mutual_information])
def test_entropy_rejects_sample_probs_above_one(function):
    sample_probs = np.full((2, 3, 2), 0.5)
    sample_probs[1, 0] = [1.25, -0.25]

    with pytest.raises(
        ValueError, match=r"sample_probs must lie in \[0, 1\], but got 1\.25 at index \(1, 0, 0\)"
    ):
        function(sample_probs)


def test_integer_one_hot_probs_are_accepted():
    probs = np.eye(3, dtype=np.int64)

    assert accuracy(probs, [0, 1, 2]) == 1.0
    assert brier_score(probs, [0, 1, 2]) == 0.0


def test_selective_risk_rejects_uncertainty_wrong_length():
    message = (
        r"uncertainty must have shape \(N,\) = \(2,\), one value per input, but got shape \(3,\)"
    )
    with pytest.raises(ValueError, match=message):
        selective_risk_curve(VALID_PROBS, VALID_LABELS, [0.1, 0.2, 0.3])


def test_selective_risk_rejects_uncertainty_nan():
    message = r"uncertainty must not contain NaN, but the value at index 1 is NaN \(NaN values in total: 1\)"
    with pytest.raises(ValueError, match=message):
        selective_risk_curve(VALID_PROBS, VALID_LABELS, [0.1, np.nan])


# ---------------------------------------------------------------------------------------------
# Docstring examples
# ---------------------------------------------------------------------------------------------


def test_docstring_examples():
    result = doctest.testmod(calibration, optionflags=doctest.NORMALIZE_WHITESPACE)

    assert result.attempted > 0
    assert result.failed == 0
