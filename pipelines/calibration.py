r"""Calibration and uncertainty measures for classifier probabilities.

Every function takes numpy arrays or torch tensors on any device. Tensors are detached and moved
to the CPU, and all arithmetic runs in float64. Probabilities have shape ``(N, num_classes)`` and
labels shape ``(N,)``. Monte Carlo samples of the posterior predictive have shape
``(num_samples, N, num_classes)``.

Conventions shared by the binned measures:

* The confidence of an input is its largest class probability. The predicted class is the first
  index that reaches it, as ``np.argmax`` returns it.
* Equal-width bins are closed on the right, :math:`(k/M, (k+1)/M]`, and the first bin also
  contains 0. The edges are the float64 values ``k / M``, so a confidence equal to ``k / M`` as
  Python computes it falls into the bin that the edge closes, and 1.0 falls into the last bin.

Invalid input raises ``ValueError`` with the name of the argument, the expected value and the
received value. The measures depend only on numpy and torch, and the plot needs matplotlib.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ReliabilityBins",
    "SelectiveRiskCurve",
    "accuracy",
    "brier_score",
    "calibration_summary",
    "classwise_calibration_error",
    "expected_calibration_error",
    "expected_entropy",
    "maximum_calibration_error",
    "mutual_information",
    "negative_log_likelihood",
    "predictive_entropy",
    "reliability_bins",
    "reliability_diagram",
    "selective_risk_curve",
]

ROW_SUM_TOLERANCE = 1e-4
"""Largest absolute difference from 1 that a row of probabilities may sum to."""

BINNING_STRATEGIES = ("uniform", "quantile")


# ---------------------------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------------------------


def _freeze_arrays(instance) -> None:
    for value in vars(instance).values():
        if isinstance(value, np.ndarray):
            value.setflags(write=False)


@dataclass(frozen=True, eq=False)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram, one entry per bin.

    Attributes
    ----------
    lower, upper : numpy.ndarray of float64, shape (n_bins,)
        Bin edges. A bin contains the confidences in ``(lower, upper]``, and the first bin also
        contains 0.
    count : numpy.ndarray of int64, shape (n_bins,)
        Number of inputs whose confidence falls into the bin.
    confidence : numpy.ndarray of float64, shape (n_bins,)
        Mean confidence of the inputs in the bin, NaN for an empty bin.
    accuracy : numpy.ndarray of float64, shape (n_bins,)
        Fraction of the inputs in the bin whose predicted class is the label, NaN for an empty
        bin.

    The arrays are read-only.
    """

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    def __post_init__(self) -> None:
        _freeze_arrays(self)


@dataclass(frozen=True, eq=False)
class SelectiveRiskCurve:
    """Accuracy on the kept inputs as more and more uncertain inputs are referred.

    Attributes
    ----------
    referred_fraction : numpy.ndarray of float64, shape (N,)
        ``r / N`` for ``r = 0, ..., N - 1`` referred inputs.
    accuracy : numpy.ndarray of float64, shape (N,)
        Accuracy on the ``N - r`` inputs that are kept.
    coverage : numpy.ndarray of float64, shape (N,)
        Fraction of inputs kept, ``(N - r) / N``.
    aurc : float
        Area under the risk-coverage curve, as defined in :func:`selective_risk_curve`.

    The arrays are read-only.
    """

    referred_fraction: np.ndarray
    accuracy: np.ndarray
    coverage: np.ndarray
    aurc: float

    def __post_init__(self) -> None:
        _freeze_arrays(self)

    def accuracy_at(self, referred_fraction: float) -> float:
        r"""Return the accuracy on the kept inputs when at least ``referred_fraction`` is referred.

        The number of referred inputs is :math:`r = \lceil f N \rceil`, the smallest ``r``
        with ``r / N >= f``. The comparison is against the float64 values ``r / N``, so that
        ``f = 0.07`` with ``N = 100`` refers 7 inputs even though ``0.07 * 100`` evaluates to
        ``7.000000000000001`` in float64.

        Parameters
        ----------
        referred_fraction : float
            Fraction :math:`f` of the inputs, the most uncertain first, that is referred.

        Returns
        -------
        float
            Accuracy on the :math:`N - r` inputs that are kept.

        Raises
        ------
        ValueError
            If ``referred_fraction`` is not a number in ``[0, (N - 1) / N]``, because referring
            more would keep no input.
        """
        num_inputs = len(self.referred_fraction)
        largest = float(self.referred_fraction[-1])
        is_number = isinstance(referred_fraction, (int, float, np.integer, np.floating))
        is_number = is_number and not isinstance(referred_fraction, bool)
        if not is_number or not 0 <= referred_fraction <= largest:
            raise ValueError(
                f"referred_fraction must be a number in [0, {largest!r}] "
                f"(at most N - 1 = {num_inputs - 1} of N = {num_inputs} inputs referred), "
                f"but got {referred_fraction!r}."
            )
        referred = int(np.searchsorted(self.referred_fraction, referred_fraction, side="left"))
        return float(self.accuracy[referred])


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    """Arguments converted to float64 (labels to int64), or None where not given."""

    probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    sample_probs: np.ndarray | None = None
    uncertainty: np.ndarray | None = None


def _validate_inputs(
    probs=None,
    labels=None,
    *,
    sample_probs=None,
    uncertainty=None,
    n_bins=None,
    strategy=None,
) -> _Inputs:
    """Convert and check every argument that a public function received.

    Arguments left as None are not checked. ``labels`` and ``uncertainty`` are checked against
    the number of inputs and classes in ``probs``, so ``probs`` must be given with them.
    """
    checked = {}
    if probs is not None:
        checked["probs"] = _check_probabilities(probs, "probs", ndim=2)
    if labels is not None:
        checked["labels"] = _check_labels(labels, checked["probs"].shape)
    if sample_probs is not None:
        checked["sample_probs"] = _check_probabilities(sample_probs, "sample_probs", ndim=3)
    if uncertainty is not None:
        checked["uncertainty"] = _check_uncertainty(uncertainty, len(checked["probs"]))
    if n_bins is not None:
        _check_n_bins(n_bins)
    if strategy is not None and strategy not in BINNING_STRATEGIES:
        valid = ", ".join(repr(name) for name in BINNING_STRATEGIES)
        raise ValueError(f"strategy must be one of {valid}, but got {strategy!r}.")
    return _Inputs(**checked)


def _to_numpy(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            # numpy has no bfloat16, and the measures work in float64 anyway.
            tensor = tensor.to(torch.float64)
        return tensor.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name} must be an array of numbers, but numpy could not convert it: {error}"
        ) from error


def _check_real_dtype(array: np.ndarray, name: str) -> None:
    # Kinds: f float, i signed integer, u unsigned integer. Bool, complex and object are invalid.
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must contain real numbers, but got dtype {array.dtype}.")


def _describe_position(index: tuple) -> str:
    if len(index) == 1:
        return f"row {index[0]}"
    return f"sample {index[0]}, input {index[1]}"


def _check_probabilities(value, name: str, ndim: int) -> np.ndarray:
    array = _to_numpy(value, name)
    expected_shape = "(N, num_classes)" if ndim == 2 else "(num_samples, N, num_classes)"
    if array.ndim != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D with shape {expected_shape}, but got shape {array.shape}."
        )
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, but got shape {array.shape}.")
    _check_real_dtype(array, name)
    array = array.astype(np.float64)

    not_finite = ~np.isfinite(array)
    if not_finite.any():
        first = np.unravel_index(np.flatnonzero(not_finite)[0], array.shape)
        raise ValueError(
            f"{name} must contain only finite values, but the value at index "
            f"{tuple(int(i) for i in first)} is {float(array[first])!r} "
            f"(NaN or inf values in total: {int(not_finite.sum())})."
        )
    outside = (array < 0) | (array > 1)
    if outside.any():
        first = np.unravel_index(np.flatnonzero(outside)[0], array.shape)
        raise ValueError(
            f"{name} must lie in [0, 1], but got {float(array[first])!r} at index "
            f"{tuple(int(i) for i in first)}. Apply softmax to logits before calling."
        )
    _check_row_sums(array, name)
    return array


def _check_row_sums(array: np.ndarray, name: str) -> None:
    row_sums = array.sum(axis=-1)
    bad_rows = np.abs(row_sums - 1.0) > ROW_SUM_TOLERANCE
    if bad_rows.any():
        first = np.unravel_index(np.flatnonzero(bad_rows)[0], row_sums.shape)
        position = _describe_position(tuple(int(i) for i in first))
        raise ValueError(
            f"{name} must have rows that sum to 1 (tolerance {ROW_SUM_TOLERANCE}), but "
            f"{position} sums to {float(row_sums[first])!r}. Pass probabilities, not logits "
            "or unnormalised scores."
        )


def _check_labels(value, probs_shape: tuple) -> np.ndarray:
    """Check labels against probabilities of shape ``probs_shape``.

    Float labels are rejected even when every value is a whole number, so that probabilities
    passed as labels by mistake fail here instead of being truncated.
    """
    num_inputs, num_classes = probs_shape
    array = _to_numpy(value, "labels")
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D with shape (N,), but got shape {array.shape}.")
    if len(array) != num_inputs:
        raise ValueError(
            f"labels must have one entry per row of probs (N = {num_inputs}), "
            f"but got length {len(array)}."
        )
    if array.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be an integer array of class indices, but got dtype {array.dtype}. "
            "Convert whole-number floats with labels.astype(np.int64)."
        )
    out_of_range = (array < 0) | (array >= num_classes)
    if out_of_range.any():
        first = int(np.flatnonzero(out_of_range)[0])
        raise ValueError(
            f"labels must lie in [0, num_classes) = [0, {num_classes}), but got "
            f"{int(array[first])} at index {first}."
        )
    return array.astype(np.int64)


def _check_uncertainty(value, num_inputs: int) -> np.ndarray:
    array = _to_numpy(value, "uncertainty")
    if array.ndim != 1 or len(array) != num_inputs:
        raise ValueError(
            f"uncertainty must have shape (N,) = ({num_inputs},), one value per input, "
            f"but got shape {array.shape}."
        )
    _check_real_dtype(array, "uncertainty")
    array = array.astype(np.float64)
    is_nan = np.isnan(array)
    if is_nan.any():
        raise ValueError(
            f"uncertainty must not contain NaN, but the value at index "
            f"{int(np.flatnonzero(is_nan)[0])} is NaN (NaN values in total: {int(is_nan.sum())})."
        )
    return array


def _check_n_bins(n_bins) -> None:
    is_integer = isinstance(n_bins, (int, np.integer)) and not isinstance(n_bins, bool)
    if not is_integer or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, but got {n_bins!r}.")


# ---------------------------------------------------------------------------------------------
# Binning
# ---------------------------------------------------------------------------------------------


def _uniform_bin_index(scores: np.ndarray, n_bins: int) -> np.ndarray:
    """Return the index of the equal-width bin ``(k/M, (k+1)/M]`` that contains each score.

    The inner edges are the float64 values ``k / M``, which IEEE division rounds to the nearest
    float, exactly as Python's ``k / M``. ``side="left"`` counts the edges strictly below a
    score, so a score equal to an edge goes to the bin that the edge closes. No other float lies
    between ``k / M`` and its rounded value, so every other score is binned as an exact rational
    comparison would bin it. A score of 0 goes to bin 0 and a score of 1.0 to bin ``M - 1``.
    """
    inner_edges = np.arange(1, n_bins) / n_bins
    return np.searchsorted(inner_edges, scores, side="left")


def _summarise_bins(
    scores: np.ndarray,
    hits: np.ndarray,
    bin_index: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
) -> ReliabilityBins:
    """Count the scores in each bin and average the scores and the 0/1 hits per bin."""
    n_bins = len(lower)
    count = np.bincount(bin_index, minlength=n_bins)
    score_sum = np.bincount(bin_index, weights=scores, minlength=n_bins)
    hit_sum = np.bincount(bin_index, weights=hits.astype(np.float64), minlength=n_bins)
    filled = count > 0
    return ReliabilityBins(
        lower=lower,
        upper=upper,
        count=count.astype(np.int64),
        confidence=np.divide(score_sum, count, out=np.full(n_bins, np.nan), where=filled),
        accuracy=np.divide(hit_sum, count, out=np.full(n_bins, np.nan), where=filled),
    )


def _uniform_bins(scores: np.ndarray, hits: np.ndarray, n_bins: int) -> ReliabilityBins:
    edges = np.arange(n_bins + 1) / n_bins
    bin_index = _uniform_bin_index(scores, n_bins)
    return _summarise_bins(scores, hits, bin_index, edges[:-1], edges[1:])


def _quantile_bins(scores: np.ndarray, hits: np.ndarray, n_bins: int) -> ReliabilityBins:
    """Split the inputs, sorted by score, into ``n_bins`` groups of nearly equal size.

    Equal scores are ordered with misses before hits, so the groups depend only on the
    multiset of (score, hit) pairs and not on the input order. The input at sorted position
    ``i`` goes to group ``floor(i * M / N)``, so sizes differ by at most one and some groups
    are empty when ``N < M``. The edges of a group are its smallest and largest score.
    """
    num_inputs = len(scores)
    order = np.lexsort((hits, scores))
    sorted_scores = scores[order]
    group = np.arange(num_inputs) * n_bins // num_inputs

    first = np.searchsorted(group, np.arange(n_bins), side="left")
    last = np.searchsorted(group, np.arange(n_bins), side="right") - 1
    filled = last >= first
    lower = np.where(filled, sorted_scores[np.minimum(first, num_inputs - 1)], np.nan)
    upper = np.where(filled, sorted_scores[np.maximum(last, 0)], np.nan)
    return _summarise_bins(sorted_scores, hits[order], group, lower, upper)


def _top_label(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the confidence of each input and whether its predicted class is the label."""
    predicted = np.argmax(probs, axis=1)
    confidence = probs[np.arange(len(probs)), predicted]
    return confidence, predicted == labels


def _calibration_gaps(bins: ReliabilityBins) -> tuple[np.ndarray, np.ndarray]:
    """Return the share of the inputs and ``|accuracy - confidence|`` of each non-empty bin."""
    filled = bins.count > 0
    weights = bins.count[filled] / bins.count.sum()
    return weights, np.abs(bins.accuracy[filled] - bins.confidence[filled])


# ---------------------------------------------------------------------------------------------
# Binned calibration errors
# ---------------------------------------------------------------------------------------------


def reliability_bins(probs, labels, n_bins: int = 15) -> ReliabilityBins:
    r"""Bin the top-label confidences in equal-width bins and summarise each bin.

    Parameters
    ----------
    probs : array_like or torch.Tensor, shape (N, num_classes)
        Predicted class probabilities. Each row must sum to 1 within 1e-4.
    labels : array_like or torch.Tensor of int, shape (N,)
        True class indices in ``[0, num_classes)``.
    n_bins : int, default 15
        Number of equal-width bins :math:`M` on ``[0, 1]``.

    Returns
    -------
    ReliabilityBins
        Edges, count, mean confidence and accuracy of every bin. Empty bins are kept, with
        count 0 and NaN mean confidence and accuracy.

    Raises
    ------
    ValueError
        If ``probs``, ``labels`` or ``n_bins`` is invalid. The message names the argument.

    Notes
    -----
    With confidence :math:`c_i = \max_k p_{ik}` and :math:`\hat y_i` the first class that
    reaches it, bin :math:`B_m` contains the inputs with :math:`c_i \in (m/M, (m+1)/M]`, and
    :math:`B_0` also contains :math:`c_i = 0`:

    .. math::

        \operatorname{conf}(B_m) = \frac{1}{|B_m|} \sum_{i \in B_m} c_i, \qquad
        \operatorname{acc}(B_m) = \frac{1}{|B_m|} \sum_{i \in B_m} \mathbb{1}[\hat y_i = y_i].

    A confidence equal to an edge ``m / M`` as float64 computes it belongs to bin ``m - 1``.

    References
    ----------
    .. [1] C. Guo, G. Pleiss, Y. Sun and K. Q. Weinberger, "On Calibration of Modern Neural
       Networks", ICML 2017.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import reliability_bins
    >>> probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    >>> labels = np.array([0, 1, 1, 0])
    >>> bins = reliability_bins(probs, labels, n_bins=4)
    >>> bins.count
    array([0, 1, 2, 1])
    >>> bins.confidence
    array([ nan, 0.5 , 0.75, 1.  ])
    >>> bins.accuracy
    array([nan,  0.,  1.,  1.])
    """
    inputs = _validate_inputs(probs, labels, n_bins=n_bins)
    confidence, correct = _top_label(inputs.probs, inputs.labels)
    return _uniform_bins(confidence, correct, n_bins)


def expected_calibration_error(probs, labels, n_bins: int = 15, strategy: str = "uniform") -> float:
    r"""Compute the top-label expected calibration error (ECE).

    Parameters
    ----------
    probs : array_like or torch.Tensor, shape (N, num_classes)
        Predicted class probabilities. Each row must sum to 1 within 1e-4.
    labels : array_like or torch.Tensor of int, shape (N,)
        True class indices in ``[0, num_classes)``.
    n_bins : int, default 15
        Number of bins :math:`M`.
    strategy : {"uniform", "quantile"}, default "uniform"
        ``"uniform"`` uses the equal-width bins of :func:`reliability_bins`. ``"quantile"``
        uses equal-mass bins, which gives the adaptive calibration error of Nixon et al. The
        inputs are sorted by confidence and the input at sorted position :math:`i` goes to bin
        :math:`\lfloor iM/N \rfloor`, so bin sizes differ by at most one. Equal confidences are
        ordered with wrong predictions first, which makes the result independent of the input
        order. Some bins are empty when :math:`N < M`.

    Returns
    -------
    float
        ECE in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``probs``, ``labels``, ``n_bins`` or ``strategy`` is invalid.

    Notes
    -----
    Each non-empty bin contributes its gap between accuracy and mean confidence, weighted by
    its share of the :math:`N` inputs:

    .. math::

        \mathrm{ECE} = \sum_{m:\,|B_m| > 0} \frac{|B_m|}{N}
            \left| \operatorname{acc}(B_m) - \operatorname{conf}(B_m) \right|.

    References
    ----------
    .. [1] M. P. Naeini, G. F. Cooper and M. Hauskrecht, "Obtaining Well Calibrated
       Probabilities Using Bayesian Binning", AAAI 2015.
    .. [2] C. Guo, G. Pleiss, Y. Sun and K. Q. Weinberger, "On Calibration of Modern Neural
       Networks", ICML 2017.
    .. [3] J. Nixon et al., "Measuring Calibration in Deep Learning", arXiv:1904.01685, 2019.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import expected_calibration_error
    >>> probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    >>> labels = np.array([0, 1, 1, 0])
    >>> expected_calibration_error(probs, labels, n_bins=4)
    0.25
    >>> expected_calibration_error(probs, labels, n_bins=2, strategy="quantile")
    0.125
    """
    inputs = _validate_inputs(probs, labels, n_bins=n_bins, strategy=strategy)
    confidence, correct = _top_label(inputs.probs, inputs.labels)
    if strategy == "uniform":
        bins = _uniform_bins(confidence, correct, n_bins)
    else:
        bins = _quantile_bins(confidence, correct, n_bins)
    weights, gaps = _calibration_gaps(bins)
    return float(np.sum(weights * gaps))


def maximum_calibration_error(probs, labels, n_bins: int = 15) -> float:
    r"""Compute the top-label maximum calibration error (MCE).

    Parameters
    ----------
    probs : array_like or torch.Tensor, shape (N, num_classes)
        Predicted class probabilities. Each row must sum to 1 within 1e-4.
    labels : array_like or torch.Tensor of int, shape (N,)
        True class indices in ``[0, num_classes)``.
    n_bins : int, default 15
        Number of equal-width bins, as in :func:`reliability_bins`.

    Returns
    -------
    float
        MCE in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``probs``, ``labels`` or ``n_bins`` is invalid.

    Notes
    -----
    The largest gap between accuracy and mean confidence over the non-empty bins. Empty bins
    are skipped:

    .. math::

        \mathrm{MCE} = \max_{m:\,|B_m| > 0}
            \left| \operatorname{acc}(B_m) - \operatorname{conf}(B_m) \right|.

    References
    ----------
    .. [1] M. P. Naeini, G. F. Cooper and M. Hauskrecht, "Obtaining Well Calibrated
       Probabilities Using Bayesian Binning", AAAI 2015.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import maximum_calibration_error
    >>> probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    >>> labels = np.array([0, 1, 1, 0])
    >>> maximum_calibration_error(probs, labels, n_bins=4)
    0.5
    """
    bins = reliability_bins(probs, labels, n_bins)
    _, gaps = _calibration_gaps(bins)
    return float(np.max(gaps))


def classwise_calibration_error(probs, labels, n_bins: int = 15) -> float:
    r"""Compute the classwise expected calibration error (classwise-ECE).

    Parameters
    ----------
    probs : array_like or torch.Tensor, shape (N, num_classes)
        Predicted class probabilities. Each row must sum to 1 within 1e-4.
    labels : array_like or torch.Tensor of int, shape (N,)
        True class indices in ``[0, num_classes)``.
    n_bins : int, default 15
        Number of equal-width bins per class, with the edges of :func:`reliability_bins`.

    Returns
    -------
    float
        Classwise-ECE in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``probs``, ``labels`` or ``n_bins`` is invalid.

    Notes
    -----
    For each class :math:`k`, the column :math:`p_{\cdot k}` is binned on its own, and each
    bin :math:`B_{mk}` compares the mean of :math:`p_{ik}` with the frequency of
    :math:`y_i = k`. The result is the mean over all ``num_classes`` columns, including classes
    that no label takes:

    .. math::

        \text{classwise-ECE} = \frac{1}{K} \sum_{k=1}^{K} \sum_{m:\,|B_{mk}| > 0}
            \frac{|B_{mk}|}{N} \left| \frac{1}{|B_{mk}|} \sum_{i \in B_{mk}}
            \left( \mathbb{1}[y_i = k] - p_{ik} \right) \right|.

    References
    ----------
    .. [1] M. Kull, M. Perello-Nieto, M. Kängsepp, T. Silva Filho, H. Song and P. Flach,
       "Beyond temperature scaling: Obtaining well-calibrated multi-class probabilities with
       Dirichlet calibration", NeurIPS 2019.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import classwise_calibration_error
    >>> probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    >>> labels = np.array([0, 1, 1, 0])
    >>> classwise_calibration_error(probs, labels, n_bins=4)
    0.25
    """
    inputs = _validate_inputs(probs, labels, n_bins=n_bins)
    num_classes = inputs.probs.shape[1]

    class_errors = []
    for k in range(num_classes):
        # The bin statistics of column k: "confidence" is the mean p[:, k] and "accuracy" the
        # frequency of y == k in each bin.
        bins = _uniform_bins(inputs.probs[:, k], inputs.labels == k, n_bins)
        weights, gaps = _calibration_gaps(bins)
        class_errors.append(np.sum(weights * gaps))
    return float(np.mean(class_errors))


# ---------------------------------------------------------------------------------------------
# Proper scoring rules and accuracy
# ---------------------------------------------------------------------------------------------


def accuracy(probs, labels) -> float:
    r"""Compute the fraction of inputs whose predicted class is the label.

    Parameters
    ----------
    probs : array_like or torch.Tensor, shape (N, num_classes)
        Predicted class probabilities. Each row must sum to 1 within 1e-4.
    labels : array_like or torch.Tensor of int, shape (N,)
        True class indices in ``[0, num_classes)``.

    Returns
    -------
    float
        Accuracy in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``probs`` or ``labels`` is invalid.

    Notes
    -----
    The predicted class is the first index that reaches the largest probability, so a tie
    between classes 0 and 1 predicts class 0:

    .. math::

        \mathrm{accuracy} = \frac{1}{N} \sum_{i=1}^{N}
            \mathbb{1}\left[\operatorname{argmax}_k p_{ik} = y_i\right].

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import accuracy
    >>> probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    >>> labels = np.array([0, 1, 1, 0])
    >>> accuracy(probs, labels)
    0.75
    """
    inputs = _validate_inputs(probs, labels)
    _, correct = _top_label(inputs.probs, inputs.labels)
    return float(np.mean(correct))


def negative_log_likelihood(probs, labels) -> float:
    r"""Compute the mean negative log-likelihood of the labels, with the natural log.

    Parameters
    ----------
    probs : array_like or torch.Tensor, shape (N, num_classes)
        Predicted class probabilities. Each row must sum to 1 within 1e-4.
    labels : array_like or torch.Tensor of int, shape (N,)
        True class indices in ``[0, num_classes)``.

    Returns
    -------
    float
        NLL in nats, in ``[0, +inf]``.

    Raises
    ------
    ValueError
        If ``probs`` or ``labels`` is invalid.

    Warns
    -----
    RuntimeWarning
        If some true-class probabilities are exactly 0. The result is then +inf, and the
        warning gives the number of such inputs.

    Notes
    -----
    Probabilities are not clipped, unlike ``sklearn.metrics.log_loss``, so a true-class
    probability of 0 gives an infinite NLL:

    .. math::

        \mathrm{NLL} = -\frac{1}{N} \sum_{i=1}^{N} \ln p_{i y_i}.

    References
    ----------
    .. [1] C. Guo, G. Pleiss, Y. Sun and K. Q. Weinberger, "On Calibration of Modern Neural
       Networks", ICML 2017.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import negative_log_likelihood
    >>> probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    >>> labels = np.array([0, 1, 1, 0])
    >>> round(negative_log_likelihood(probs, labels), 4)
    0.3171
    """
    inputs = _validate_inputs(probs, labels)
    true_class_probs = inputs.probs[np.arange(len(inputs.labels)), inputs.labels]

    num_zero = int(np.count_nonzero(true_class_probs == 0))
    if num_zero:
        warnings.warn(
            f"negative_log_likelihood is +inf because the true class probability is 0 for "
            f"{num_zero} of {len(true_class_probs)} inputs.",
            RuntimeWarning,
            stacklevel=2,
        )
    # ln(0) = -inf is the intended result, and the warning above replaces numpy's.
    with np.errstate(divide="ignore"):
        log_probs = np.log(true_class_probs)
    return float(-np.mean(log_probs))


def brier_score(probs, labels) -> float:
    r"""Compute the multiclass Brier score.

    Parameters
    ----------
    probs : array_like or torch.Tensor, shape (N, num_classes)
        Predicted class probabilities. Each row must sum to 1 within 1e-4.
    labels : array_like or torch.Tensor of int, shape (N,)
        True class indices in ``[0, num_classes)``.

    Returns
    -------
    float
        Brier score in ``[0, 2]``. It is not halved for two classes.

    Raises
    ------
    ValueError
        If ``probs`` or ``labels`` is invalid.

    Notes
    -----
    The squared distance between the probability vector and the one-hot label, summed over
    classes and averaged over inputs:

    .. math::

        \mathrm{BS} = \frac{1}{N} \sum_{i=1}^{N} \sum_{k=1}^{K}
            \left( p_{ik} - \mathbb{1}[y_i = k] \right)^2.

    References
    ----------
    .. [1] G. W. Brier, "Verification of Forecasts Expressed in Terms of Probability",
       Monthly Weather Review 78(1), 1950.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import brier_score
    >>> probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    >>> labels = np.array([0, 1, 1, 0])
    >>> brier_score(probs, labels)
    0.1875
    """
    inputs = _validate_inputs(probs, labels)
    one_hot = np.zeros_like(inputs.probs)
    one_hot[np.arange(len(inputs.labels)), inputs.labels] = 1.0
    return float(np.mean(np.sum((inputs.probs - one_hot) ** 2, axis=1)))


def calibration_summary(probs, labels, n_bins: int = 15) -> dict[str, float]:
    """Compute accuracy, ECE, MCE, NLL and Brier score in one call.

    Parameters
    ----------
    probs : array_like or torch.Tensor, shape (N, num_classes)
        Predicted class probabilities. Each row must sum to 1 within 1e-4.
    labels : array_like or torch.Tensor of int, shape (N,)
        True class indices in ``[0, num_classes)``.
    n_bins : int, default 15
        Number of equal-width bins for ECE and MCE.

    Returns
    -------
    dict of str to float
        Keys ``"accuracy"``, ``"ece"``, ``"mce"``, ``"nll"`` and ``"brier"``, as computed by
        :func:`accuracy`, :func:`expected_calibration_error` with ``strategy="uniform"``,
        :func:`maximum_calibration_error`, :func:`negative_log_likelihood` and
        :func:`brier_score`.

    Raises
    ------
    ValueError
        If ``probs``, ``labels`` or ``n_bins`` is invalid.

    Warns
    -----
    RuntimeWarning
        If the NLL is +inf, as in :func:`negative_log_likelihood`.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import calibration_summary
    >>> probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    >>> labels = np.array([0, 1, 1, 0])
    >>> summary = calibration_summary(probs, labels, n_bins=4)
    >>> {name: round(value, 4) for name, value in summary.items()}
    {'accuracy': 0.75, 'ece': 0.25, 'mce': 0.5, 'nll': 0.3171, 'brier': 0.1875}
    """
    inputs = _validate_inputs(probs, labels, n_bins=n_bins)
    return {
        "accuracy": accuracy(inputs.probs, inputs.labels),
        "ece": expected_calibration_error(inputs.probs, inputs.labels, n_bins),
        "mce": maximum_calibration_error(inputs.probs, inputs.labels, n_bins),
        "nll": negative_log_likelihood(inputs.probs, inputs.labels),
        "brier": brier_score(inputs.probs, inputs.labels),
    }


# ---------------------------------------------------------------------------------------------
# Reliability diagram
# ---------------------------------------------------------------------------------------------


def _draw_reliability(ax, bins: ReliabilityBins, ece: float, legend_loc: str) -> None:
    centers = (bins.lower + bins.upper) / 2
    widths = bins.upper - bins.lower
    # Empty bins keep their position with bars of height 0.
    filled = bins.count > 0
    bin_accuracy = np.where(filled, bins.accuracy, 0.0)
    bin_confidence = np.where(filled, bins.confidence, 0.0)

    ax.bar(
        centers,
        bin_accuracy,
        width=widths,
        color="tab:blue",
        edgecolor="black",
        linewidth=0.5,
        label="Accuracy",
    )
    ax.bar(
        centers,
        np.abs(bin_confidence - bin_accuracy),
        bottom=np.minimum(bin_accuracy, bin_confidence),
        width=widths,
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="Gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")

    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy")
    ax.legend(loc=legend_loc, title=f"ECE = {ece:.4f}")


def _draw_confidence_histogram(ax, bins: ReliabilityBins) -> None:
    centers = (bins.lower + bins.upper) / 2
    ax.bar(
        centers,
        bins.count,
        width=bins.upper - bins.lower,
        color="gray",
        edgecolor="black",
        linewidth=0.5,
    )
    ax.set_xlim(0, 1)


def reliability_diagram(probs, labels, n_bins: int = 15, ax=None, title: str | None = None):
    r"""Plot accuracy against confidence per bin, with the gap and a confidence histogram.

    Parameters
    ----------
    probs : array_like or torch.Tensor, shape (N, num_classes)
        Predicted class probabilities. Each row must sum to 1 within 1e-4.
    labels : array_like or torch.Tensor of int, shape (N,)
        True class indices in ``[0, num_classes)``.
    n_bins : int, default 15
        Number of equal-width bins, as in :func:`reliability_bins`.
    ax : matplotlib.axes.Axes, optional
        Axes for the reliability plot. The confidence histogram then goes into an inset in its
        upper left corner. Without ``ax``, a new figure gets the reliability plot above and the
        histogram below.
    title : str, optional
        Title of the reliability plot.

    Returns
    -------
    matplotlib.figure.Figure
        The new figure, or ``ax.figure``. The figure is never shown, so it works on a
        non-interactive backend such as Agg.

    Raises
    ------
    ValueError
        If ``probs``, ``labels`` or ``n_bins`` is invalid.

    Notes
    -----
    Each bin ``m`` gets a blue bar of height :math:`\operatorname{acc}(B_m)` and a hatched red
    bar from :math:`\operatorname{acc}(B_m)` to :math:`\operatorname{conf}(B_m)`. Empty bins
    get bars of height 0. The dashed diagonal is perfect calibration, and the legend title
    gives the ECE of :func:`expected_calibration_error` with the same bins.

    References
    ----------
    .. [1] C. Guo, G. Pleiss, Y. Sun and K. Q. Weinberger, "On Calibration of Modern Neural
       Networks", ICML 2017.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import reliability_diagram
    >>> probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    >>> labels = np.array([0, 1, 1, 0])
    >>> figure = reliability_diagram(probs, labels, n_bins=4)
    >>> len(figure.axes)
    2
    """
    from matplotlib.figure import Figure

    bins = reliability_bins(probs, labels, n_bins)
    weights, gaps = _calibration_gaps(bins)
    ece = float(np.sum(weights * gaps))

    if ax is None:
        figure = Figure(figsize=(5, 6), layout="constrained")
        ax, histogram_ax = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        _draw_reliability(ax, bins, ece, legend_loc="upper left")
        histogram_ax.set_xlabel("Confidence")
        histogram_ax.set_ylabel("Count")
    else:
        figure = ax.figure
        _draw_reliability(ax, bins, ece, legend_loc="lower right")
        ax.set_xlabel("Confidence")
        histogram_ax = ax.inset_axes([0.1, 0.62, 0.34, 0.28])
        histogram_ax.tick_params(labelsize="x-small")
        histogram_ax.set_title("Confidence histogram", fontsize="x-small")
    _draw_confidence_histogram(histogram_ax, bins)

    if title is not None:
        ax.set_title(title)
    return figure


# ---------------------------------------------------------------------------------------------
# Uncertainty from Monte Carlo samples of the posterior predictive
# ---------------------------------------------------------------------------------------------


def _entropy(probs: np.ndarray) -> np.ndarray:
    """Return the entropy in nats over the last axis, with 0 * ln 0 = 0."""
    log_probs = np.log(probs, out=np.zeros_like(probs), where=probs > 0)
    return -np.sum(probs * log_probs, axis=-1)


def predictive_entropy(sample_probs) -> np.ndarray:
    r"""Compute the entropy of the Monte Carlo averaged predictive distribution.

    Parameters
    ----------
    sample_probs : array_like or torch.Tensor, shape (num_samples, N, num_classes)
        Class probabilities for each posterior sample, for example the softmax of each sampled
        set of last-layer weights. Each row must sum to 1 within 1e-4.

    Returns
    -------
    numpy.ndarray of float64, shape (N,)
        Total uncertainty of each input in nats, in ``[0, ln num_classes]``.

    Raises
    ------
    ValueError
        If ``sample_probs`` is not 3-D or does not contain valid probabilities.

    Notes
    -----
    The samples' probabilities are averaged, not their logits, so this is the entropy of the
    posterior predictive :math:`\bar p_{ik} = \frac{1}{S} \sum_s p^{(s)}_{ik}`. The natural log
    is used, with :math:`0 \ln 0 = 0`:

    .. math::

        \mathbb{H}[\bar p_i] = -\sum_{k=1}^{K} \bar p_{ik} \ln \bar p_{ik}.

    References
    ----------
    .. [1] N. Houlsby, F. Huszár, Z. Ghahramani and M. Lengyel, "Bayesian Active Learning for
       Classification and Preference Learning", arXiv:1112.5745, 2011.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import predictive_entropy
    >>> sample_probs = np.array([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]])
    >>> np.round(predictive_entropy(sample_probs), 4)
    array([0.6931, 0.6931])
    """
    inputs = _validate_inputs(sample_probs=sample_probs)
    return _entropy(inputs.sample_probs.mean(axis=0))


def expected_entropy(sample_probs) -> np.ndarray:
    r"""Compute the mean entropy of the samples' predictive distributions (aleatoric part).

    Parameters
    ----------
    sample_probs : array_like or torch.Tensor, shape (num_samples, N, num_classes)
        Class probabilities for each posterior sample. Each row must sum to 1 within 1e-4.

    Returns
    -------
    numpy.ndarray of float64, shape (N,)
        Aleatoric uncertainty of each input in nats, in ``[0, ln num_classes]``.

    Raises
    ------
    ValueError
        If ``sample_probs`` is not 3-D or does not contain valid probabilities.

    Notes
    -----
    The natural log is used, with :math:`0 \ln 0 = 0`:

    .. math::

        \mathbb{E}_s \mathbb{H}[p^{(s)}_i] = -\frac{1}{S} \sum_{s=1}^{S} \sum_{k=1}^{K}
            p^{(s)}_{ik} \ln p^{(s)}_{ik}.

    References
    ----------
    .. [1] N. Houlsby, F. Huszár, Z. Ghahramani and M. Lengyel, "Bayesian Active Learning for
       Classification and Preference Learning", arXiv:1112.5745, 2011.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import expected_entropy
    >>> sample_probs = np.array([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]])
    >>> np.round(expected_entropy(sample_probs), 4)
    array([0.    , 0.6931])
    """
    inputs = _validate_inputs(sample_probs=sample_probs)
    return _entropy(inputs.sample_probs).mean(axis=0)


def mutual_information(sample_probs) -> np.ndarray:
    r"""Compute the mutual information between label and weights (BALD, epistemic part).

    Parameters
    ----------
    sample_probs : array_like or torch.Tensor, shape (num_samples, N, num_classes)
        Class probabilities for each posterior sample. Each row must sum to 1 within 1e-4.

    Returns
    -------
    numpy.ndarray of float64, shape (N,)
        Epistemic uncertainty of each input in nats, at least 0. It is 0, up to rounding of
        about 1e-16, when all samples agree.

    Raises
    ------
    ValueError
        If ``sample_probs`` is not 3-D or does not contain valid probabilities.

    Notes
    -----
    Predictive entropy minus expected entropy, both from the same samples:

    .. math::

        \mathbb{I}[y_i; \theta] = \mathbb{H}[\bar p_i] - \mathbb{E}_s \mathbb{H}[p^{(s)}_i].

    References
    ----------
    .. [1] N. Houlsby, F. Huszár, Z. Ghahramani and M. Lengyel, "Bayesian Active Learning for
       Classification and Preference Learning", arXiv:1112.5745, 2011.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import mutual_information
    >>> sample_probs = np.array([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]])
    >>> np.round(mutual_information(sample_probs), 4)
    array([0.6931, 0.    ])
    """
    inputs = _validate_inputs(sample_probs=sample_probs)
    total = _entropy(inputs.sample_probs.mean(axis=0))
    aleatoric = _entropy(inputs.sample_probs).mean(axis=0)
    # In exact arithmetic total >= aleatoric, because entropy is concave (Jensen's inequality).
    # A negative difference can only be rounding error of order eps * ln(num_classes), as when
    # all samples agree, and it is set to 0.
    return np.maximum(total - aleatoric, 0.0)


# ---------------------------------------------------------------------------------------------
# Selective prediction
# ---------------------------------------------------------------------------------------------


def selective_risk_curve(probs, labels, uncertainty) -> SelectiveRiskCurve:
    r"""Compute the accuracy on the kept inputs as the most uncertain inputs are referred.

    Parameters
    ----------
    probs : array_like or torch.Tensor, shape (N, num_classes)
        Predicted class probabilities. Each row must sum to 1 within 1e-4.
    labels : array_like or torch.Tensor of int, shape (N,)
        True class indices in ``[0, num_classes)``.
    uncertainty : array_like or torch.Tensor, shape (N,)
        Any score where larger means more uncertain, for example :func:`predictive_entropy`.
        It must not contain NaN, but ``inf`` is allowed.

    Returns
    -------
    SelectiveRiskCurve
        For ``r = 0, ..., N - 1`` referred inputs, the fraction referred, the accuracy on the
        ``N - r`` kept inputs, the coverage, and the AURC.

    Raises
    ------
    ValueError
        If ``probs``, ``labels`` or ``uncertainty`` is invalid.

    Notes
    -----
    Inputs are referred in order of decreasing uncertainty. The sort is stable, so among equal
    uncertainties the input with the lower index is referred first.

    The AURC is the area under the selective risk (1 - accuracy on the kept inputs) as a step
    function of coverage. The risk at coverage :math:`n/N` is taken as constant on
    :math:`((n-1)/N, n/N]`, so the area is the mean risk over the :math:`N` curve points:

    .. math::

        \mathrm{AURC} = \frac{1}{N} \sum_{n=1}^{N} \left( 1 - \operatorname{acc}_n \right),

    where :math:`\operatorname{acc}_n` is the accuracy on the :math:`n` least uncertain inputs.
    Lower is better.

    References
    ----------
    .. [1] Y. Geifman and R. El-Yaniv, "Selective Classification for Deep Neural Networks",
       NeurIPS 2017.
    .. [2] Y. Geifman, G. Uziel and R. El-Yaniv, "Bias-Reduced Uncertainty Estimation for Deep
       Neural Classifiers", ICLR 2019.

    Examples
    --------
    >>> import numpy as np
    >>> from pipelines.calibration import selective_risk_curve
    >>> probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    >>> labels = np.array([0, 1, 1, 0])
    >>> curve = selective_risk_curve(probs, labels, uncertainty=[0.1, 0.9, 0.3, 0.2])
    >>> curve.accuracy
    array([0.75, 1.  , 1.  , 1.  ])
    >>> curve.aurc
    0.0625
    >>> curve.accuracy_at(0.2)
    1.0
    """
    inputs = _validate_inputs(probs, labels, uncertainty=uncertainty)
    _, correct = _top_label(inputs.probs, inputs.labels)
    num_inputs = len(correct)

    order = np.argsort(-inputs.uncertainty, kind="stable")
    # correct_kept[r] is the number of correct predictions among order[r:], the kept inputs.
    correct_kept = np.cumsum(correct[order][::-1])[::-1]
    num_referred = np.arange(num_inputs)
    curve_accuracy = correct_kept / (num_inputs - num_referred)

    return SelectiveRiskCurve(
        referred_fraction=num_referred / num_inputs,
        accuracy=curve_accuracy,
        coverage=(num_inputs - num_referred) / num_inputs,
        aurc=float(np.mean(1.0 - curve_accuracy)),
    )
