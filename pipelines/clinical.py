"""Outputs for a clinical reader: referral thresholds, selective risk, cases to review.

:func:`write_clinical_outputs` runs after a ``brain-mri`` run has trained both models. It writes
per-class metrics and confusion matrices, and the selective-risk curve: accuracy on the scans
kept as the most uncertain ones are referred to a radiologist. It chooses a referral threshold
on the validation split (``referral.json``), checks how well uncertainty flags CIFAR-10
photographs as out of distribution, draws the most uncertain test scans, and summarises it all
in ``clinical.md``.

``bayeshead predict RUN_DIR SCAN ...`` loads such a run and applies the Bayesian model and the
stored threshold to new scans, without the training data.

A scan is referred when its score (predictive entropy, in nats) is above the threshold, and
kept (accepted) when it is at or below it.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import calibration
from pipelines.config import DEVICES
from pipelines.data import (
    BRAIN_MRI_SIZE,
    CIFAR10_CLASSES,
    BatchIterator,
    DataBundle,
    DataError,
    ImageSet,
    decode_image,
    list_image_folder,
    load_images_cached,
    subset_indices,
)
from pipelines.io import (
    atomic_save_figure,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
)

logger = logging.getLogger(__name__)
# Below this many kept validation scans, the referral threshold gets a warning note.
MIN_KEPT_VALIDATION_SCANS = 30

N_BINS = 15
REFERRED_FRACTIONS = (0.05, 0.10, 0.20)
DEFAULT_TARGET_ACCURACY = 0.99
NUM_CASES = 16
NUM_OOD_IMAGES = 1000
REFERRAL_FILE = "referral.json"
INPUT_CHECK_FILE = "input_check.pt"
# Share of the validation scans that the input check accepts: scans farther from every class
# than this quantile of the validation distances are referred as unlike the training scans.
INPUT_CHECK_QUANTILE = 0.99
REFERRAL_MODEL = "bayesian"
REFERRAL_SCORE = "predictive_entropy"
MODEL_TITLES = {"deterministic": "CNN (cross-entropy)", "bayesian": "CNN + Bayesian head (SVI)"}
SCORE_TITLES = {"predictive_entropy": "predictive entropy", "mutual_information": "mutual information"}


# --------------------------------------------------------------------------------------------
# Measures


def per_class_calibration_error(probs, labels, n_bins: int = N_BINS) -> np.ndarray:
    r"""Compute the one-vs-rest ECE of each class's probability column.

    Column :math:`k` is binned on its own in equal-width bins, and each bin compares the mean
    of :math:`p_{ik}` with the frequency of :math:`y_i = k`. The mean of the returned array is
    :func:`pipelines.calibration.classwise_calibration_error` (Kull et al. 2019).

    Parameters
    ----------
    probs : array_like, shape (N, num_classes)
    labels : array_like of int, shape (N,)
    n_bins : int

    Returns
    -------
    numpy.ndarray of float64, shape (num_classes,)

    Examples
    --------
    >>> import numpy as np
    >>> probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    >>> per_class_calibration_error(probs, np.array([0, 1, 1, 0]), n_bins=4)
    array([0.25, 0.25])
    """
    # NOTE: calibration.py exposes only the mean over classes, so this reuses its private
    # validation and binning helpers instead of repeating them.
    inputs = calibration._validate_inputs(probs, labels, n_bins=n_bins)
    errors = []
    for k in range(inputs.probs.shape[1]):
        bins = calibration._uniform_bins(inputs.probs[:, k], inputs.labels == k, n_bins)
        weights, gaps = calibration._calibration_gaps(bins)
        errors.append(float(np.sum(weights * gaps)))
    return np.array(errors)


def per_class_metrics(probs, labels, classes) -> dict:
    """Return precision, recall, one-vs-rest ECE and support of each class, and the confusion matrix.

    Precision of a class that is never predicted is reported as 0 (scikit-learn's
    ``zero_division=0``).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    probs, labels = np.asarray(probs), np.asarray(labels)
    predicted = probs.argmax(axis=1)
    indices = list(range(len(classes)))
    precision, recall, _, support = precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0
    )
    ece = per_class_calibration_error(probs, labels)
    table = {
        name: {"precision": float(precision[k]), "recall": float(recall[k]), "ece": float(ece[k]),
               "support": int(support[k])}
        for k, name in enumerate(classes)
    }
    matrix = confusion_matrix(labels, predicted, labels=indices)
    return {"per_class": table, "confusion_matrix": matrix.tolist()}


def referral_scores(prediction, bayesian: bool) -> dict[str, np.ndarray]:
    """Return the referral scores of one model's :class:`pipelines.prediction.Predictions`.

    A deterministic model has no posterior samples, so its mutual information is 0 and only
    its predictive entropy is a score.
    """
    scores = {"predictive_entropy": prediction.predictive_entropy}
    if bayesian:
        scores["mutual_information"] = prediction.mutual_information
    return scores


def selective_risk_summary(probs, labels, scores: dict[str, np.ndarray],
                           fractions=REFERRED_FRACTIONS) -> tuple[dict, dict]:
    """Return the accuracy on the kept scans at each referred fraction, per score.

    Returns
    -------
    summary : dict
        ``{score: {"aurc": float, "accuracy_at": {"0.00": ..., "0.05": ...}}}``. An entry is
        None when the fraction would refer every scan.
    curves : dict
        ``{score: SelectiveRiskCurve}`` for plotting.
    """
    summary, curves = {}, {}
    for name, score in scores.items():
        curve = calibration.selective_risk_curve(probs, labels, score)
        largest = float(curve.referred_fraction[-1])
        accuracy_at = {}
        for fraction in (0.0, *fractions):
            accuracy_at[f"{fraction:.2f}"] = curve.accuracy_at(fraction) if fraction <= largest else None
        summary[name] = {"aurc": curve.aurc, "accuracy_at": accuracy_at}
        curves[name] = curve
    return summary, curves


def choose_referral_threshold(scores, correct, target_accuracy: float = DEFAULT_TARGET_ACCURACY) -> dict:
    """Choose the largest score threshold whose kept scans reach ``target_accuracy``.

    Scans with a score at or below the threshold are kept, the others referred. Every distinct
    score is a candidate. When no candidate reaches the target, the strictest one (the smallest
    score, which keeps the fewest scans) is returned with ``met_target`` False.

    Parameters
    ----------
    scores : array_like of float, shape (N,)
        Referral score of each validation scan; larger means more uncertain.
    correct : array_like of bool, shape (N,)
        Whether the model's predicted class is the label.
    target_accuracy : float
        Accuracy required on the kept scans, in (0, 1].

    Returns
    -------
    dict
        ``threshold``, ``target_accuracy``, ``met_target``, ``accuracy_kept`` and
        ``referred_fraction`` on these scans, and ``num_scans``.

    Raises
    ------
    ValueError
        If there are no scans, the lengths differ, a score is NaN, or the target is outside
        (0, 1].

    Examples
    --------
    >>> choose_referral_threshold([0.1, 0.2, 0.3, 0.9], [True, True, True, False], 0.99)["threshold"]
    0.3
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if scores.ndim != 1 or scores.shape != correct.shape or len(scores) == 0:
        raise ValueError(
            f"scores and correct must be non-empty 1-D arrays of one length, got shapes "
            f"{scores.shape} and {correct.shape}"
        )
    if np.isnan(scores).any():
        raise ValueError("scores must not contain NaN; compute the entropies from valid probabilities")
    if not 0 < target_accuracy <= 1:
        raise ValueError(f"target_accuracy must lie in (0, 1], got {target_accuracy}")

    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    kept_correct = np.cumsum(correct[order])
    # A threshold keeps every scan tied with it, so only the last position of each run of equal
    # scores is a candidate.
    last_of_value = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    kept_accuracy = kept_correct[last_of_value] / (last_of_value + 1)
    meets = np.flatnonzero(kept_accuracy >= target_accuracy)
    choice = meets[-1] if len(meets) else 0
    position = last_of_value[choice]
    return {
        "threshold": float(sorted_scores[position]),
        "target_accuracy": float(target_accuracy),
        "met_target": bool(len(meets)),
        "accuracy_kept": float(kept_accuracy[choice]),
        "referred_fraction": float(1 - (position + 1) / len(scores)),
        "num_scans": int(len(scores)),
    }


def apply_threshold(scores, correct, threshold: float) -> dict:
    """Return the referred fraction and the accuracy on the kept scans for a fixed threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    kept = scores <= threshold
    return {
        "referred_fraction": float(1 - kept.mean()) if len(scores) else None,
        "accuracy_kept": float(correct[kept].mean()) if kept.any() else None,
        "num_scans": int(len(scores)),
        "num_referred": int((~kept).sum()),
    }


def ood_auroc(in_distribution: dict[str, np.ndarray], out_of_distribution: dict[str, np.ndarray]) -> dict:
    """Return the AUROC of each score for telling out-of-distribution inputs (positives) apart.

    0.5 is chance and 1.0 a perfect separation; a score that is higher on MRI scans than on
    the other images gives less than 0.5.
    """
    from sklearn.metrics import roc_auc_score

    result = {}
    for name, negatives in in_distribution.items():
        positives = out_of_distribution[name]
        truth = np.concatenate([np.zeros(len(negatives)), np.ones(len(positives))])
        result[name] = float(roc_auc_score(truth, np.concatenate([negatives, positives])))
    return result


# --------------------------------------------------------------------------------------------
# Figures (matplotlib's object API, so no GUI backend is needed)


def fit_input_check(features: torch.Tensor, labels: torch.Tensor, val_features: torch.Tensor,
                    num_classes: int, quantile: float = INPUT_CHECK_QUANTILE) -> dict:
    """Fit the input check: class means and one shared covariance of the backbone's features.

    A scan's score is its squared Mahalanobis distance to the nearest class mean (Lee, Lee, Lee
    and Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018), taken on the last feature layer only, without the
    paper's input perturbation or its combination of layers. The threshold is the ``quantile`` of the validation
    scans' scores, so about ``1 - quantile`` of new scans like them are referred. Predictive
    entropy cannot do this job: a photograph can get a confident class.

    Parameters
    ----------
    features, labels : Tensors ``(N, D)`` and ``(N,)``
        Backbone features of the training scans and their classes.
    val_features : Tensor ``(M, D)``
        Backbone features of the validation scans, for the threshold.
    num_classes : int
    quantile : float in (0, 1)

    Returns
    -------
    dict
        ``means`` ``(num_classes, D)`` and ``precision`` ``(D, D)`` (float64 tensors),
        ``threshold`` and ``quantile``.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if len(val_features) == 0:
        raise ValueError("the input check needs validation scans for its threshold; use --val-fraction above 0")
    features = features.double()
    missing = [k for k in range(num_classes) if not bool((labels == k).any())]
    if missing:
        raise ValueError(f"the input check needs training scans of every class; none of class {missing}")
    means = torch.stack([features[labels == k].mean(0) for k in range(num_classes)])
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    # A small ridge keeps the inverse finite when some features never vary (dead ReLUs).
    ridge = 1e-6 * max(float(covariance.diagonal().mean()), 1e-12)
    precision = torch.linalg.inv(covariance + ridge * torch.eye(len(covariance), dtype=torch.float64))
    check = {"means": means, "precision": precision, "quantile": float(quantile)}
    check["threshold"] = float(np.quantile(input_distance(check, val_features), quantile))
    return check


def input_distance(check: dict, features: torch.Tensor) -> np.ndarray:
    """Return each input's squared Mahalanobis distance to the nearest class mean, ``(N,)``."""
    differences = features.double().cpu()[:, None, :] - check["means"][None]
    distances = torch.einsum("nki,ij,nkj->nk", differences, check["precision"], differences)
    return distances.min(dim=1).values.numpy()


def plot_confusion_matrix(matrix, classes, title: str):
    """Return a figure of the confusion matrix, true classes down and predicted across."""
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix)
    figure = Figure(figsize=(4.8, 4.2), layout="constrained")
    ax = figure.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center",
                color="white" if count > threshold else "black")
    return figure


def plot_selective_risk(curves: dict[str, dict], max_fraction: float = 0.5):
    """Return a figure of accuracy on the kept scans against the fraction referred.

    ``curves`` maps a model name to ``{score name: SelectiveRiskCurve}``.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.2), layout="constrained")
    ax = figure.subplots()
    styles = {"predictive_entropy": "-", "mutual_information": "--"}
    colors = {"deterministic": "tab:gray", "bayesian": "tab:blue"}
    for model, by_score in curves.items():
        for score, curve in by_score.items():
            shown = curve.referred_fraction <= max_fraction
            ax.plot(curve.referred_fraction[shown], curve.accuracy[shown], styles.get(score, ":"),
                    color=colors.get(model), label=f"{MODEL_TITLES.get(model, model)}, {SCORE_TITLES[score]}")
    for fraction in REFERRED_FRACTIONS:
        ax.axvline(fraction, color="lightgray", linewidth=0.8, zorder=0)
    ax.set_xlabel("fraction of test scans referred (most uncertain first)")
    ax.set_ylabel("accuracy on the scans kept")
    ax.set_title("Selective risk: refer the most uncertain scans")
    ax.legend(loc="lower right", fontsize="small")
    return figure


def plot_cases(images: np.ndarray, cases: list[dict], columns: int = 4):
    """Return a grid of scans, each titled with its true class, prediction and uncertainty.

    ``images`` has shape ``(num_cases, 1, H, W)`` (``uint8``); ``cases`` contains the entries of
    the cases-to-review list in the same order.
    """
    from matplotlib.figure import Figure

    rows = max(1, -(-len(cases) // columns))
    figure = Figure(figsize=(3.2 * columns, 3.6 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, case in zip(axes, images, cases, strict=False):
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
        probabilities = case["probabilities"]
        top = sorted(probabilities, key=probabilities.get, reverse=True)[:2]
        ax.set_title(
            f"{Path(case['scan']).name}\ntrue: {case['true_class']}\n"
            + ", ".join(f"{name} {probabilities[name]:.2f}" for name in top)
            + f"\nH {case['predictive_entropy']:.2f}  MI {case['mutual_information']:.3f}",
            fontsize="small",
            color="black" if case["true_class"] == case["predicted_class"] else "tab:red",
        )
    return figure


# --------------------------------------------------------------------------------------------
# The outputs of a run


def _save(figure, path: Path) -> None:
    atomic_save_figure(figure, path, dpi=110, bbox_inches="tight")


def predict_photographs(config, data: DataBundle, models, device) -> dict:
    """Predict on a seeded sample of CIFAR-10 test images made to look like the scans' input.

    Returns ``{"skipped": reason}`` when ``config.data_dir`` contains no ``cifar10-jpeg/test``
    folder; otherwise the folder, the number of images, both models' predictions and the loader
    of the photographs.
    """
    from pipelines.runner import PREDICT_BATCH_SIZE, predict_both

    folder = Path(config.data_dir).expanduser() / "cifar10-jpeg" / "test"
    if not folder.is_dir():
        return {"skipped": f"no CIFAR-10 test images under {folder}; the out-of-distribution check needs them"}
    paths, _, _ = list_image_folder(folder, CIFAR10_CLASSES)
    chosen = [paths[i] for i in subset_indices(len(paths), NUM_OOD_IMAGES, config.seed)]
    size = data.image_size[0]
    images = load_images_cached(chosen, "L", size)
    labels = torch.zeros(len(chosen), dtype=torch.int64)
    loader = BatchIterator(ImageSet(images, labels), PREDICT_BATCH_SIZE, data.mean, data.std, device=device)
    return {"source": str(folder), "num_images": len(chosen), "predictions": predict_both(config, models, loader),
            "loader": loader}


def _cases_to_review(data: DataBundle, prediction, threshold: float | None, count: int = NUM_CASES):
    scores = prediction.predictive_entropy
    order = np.argsort(-scores, kind="stable")[:count]
    mutual = prediction.mutual_information
    cases = []
    for index in order.tolist():
        probs = prediction.probs[index]
        cases.append({
            "scan": data.test.paths[index] if data.test.paths else str(index),
            "true_class": data.classes[int(prediction.labels[index])],
            "predicted_class": data.classes[int(probs.argmax())],
            "probabilities": {name: float(p) for name, p in zip(data.classes, probs, strict=True)},
            "predictive_entropy": float(scores[index]),
            "mutual_information": float(mutual[index]),
            "refer": bool(threshold is not None and scores[index] > threshold),
        })
    return order, cases


def write_clinical_outputs(out, config, data: DataBundle, models, loaders: dict, predictions: dict,
                           target_accuracy: float = DEFAULT_TARGET_ACCURACY) -> dict:
    """Write the clinical outputs of a ``brain-mri`` run into ``out`` and return their numbers.

    Parameters
    ----------
    out : path
        The run folder.
    config : RunConfig
    data : DataBundle
    models : pipelines.runner.TrainedModels
    loaders : dict of BatchIterator
        Needs ``"val"`` (for the referral threshold) and ``"test"`` (for its device).
    predictions : dict
        ``"deterministic"`` and ``"bayesian"`` :class:`pipelines.prediction.Predictions` on the
        test split.
    target_accuracy : float
        Accuracy on the kept validation scans that the referral threshold must reach.

    Returns
    -------
    dict
        JSON-serialisable: ``per_class``, ``selective_risk``, ``referral``, ``out_of_distribution``,
        ``cases_to_review``, ``leakage`` and ``files``.
    """
    out = Path(out)
    classes = list(data.classes)
    result: dict = {"files": {}}

    result["per_class"] = {}
    for name, prediction in predictions.items():
        result["per_class"][name] = per_class_metrics(prediction.probs, prediction.labels, classes)
        figure = plot_confusion_matrix(result["per_class"][name]["confusion_matrix"], classes,
                                       MODEL_TITLES.get(name, name))
        result["files"][f"confusion_{name}"] = f"confusion_{name}.png"
        _save(figure, out / f"confusion_{name}.png")

    result["selective_risk"], curves = {}, {}
    for name, prediction in predictions.items():
        result["selective_risk"][name], curves[name] = selective_risk_summary(
            prediction.probs, prediction.labels, referral_scores(prediction, name != "deterministic"))
    result["files"]["selective_risk"] = "selective_risk.png"
    _save(plot_selective_risk(curves), out / "selective_risk.png")

    logger.info("clinical outputs: choosing the referral threshold on the validation split")
    result["referral"] = _referral(out, config, models, loaders, predictions, target_accuracy)
    threshold = result["referral"]["threshold"]

    check, result["input_check"], test_distance = fit_run_input_check(out, models, loaders)
    if check is not None:
        result["files"]["input_check"] = INPUT_CHECK_FILE
    result["out_of_distribution"] = _ood_summary(config, data, models, loaders["test"].device, predictions,
                                                 check, test_distance)

    order, cases = _cases_to_review(data, predictions[REFERRAL_MODEL], threshold)
    result["cases_to_review"] = cases
    result["files"]["cases_to_review"] = "cases_to_review.png"
    _save(plot_cases(data.test.images[torch.as_tensor(order)].numpy(), cases), out / "cases_to_review.png")

    leakage = data.info.get("leakage")
    result["leakage"] = None if leakage is None else {k: v for k, v in leakage.items() if k != "pairs"}
    result["files"]["referral"] = REFERRAL_FILE
    result["files"]["markdown"] = "clinical.md"
    atomic_write_text(out / "clinical.md", clinical_markdown(result, classes, data.info))
    return result


def _referral(out: Path, config, models, loaders, predictions, target_accuracy) -> dict:
    """Choose the threshold on validation, write ``referral.json``, and apply it to the test split.

    The plain CNN gets a threshold by the same rule under ``"deterministic"``, for comparison.
    """
    from pipelines.runner import predict_both

    referral = {"model": REFERRAL_MODEL, "score": REFERRAL_SCORE, "threshold": None,
                "target_accuracy": float(target_accuracy)}
    if loaders["val"].num_data == 0:
        referral["note"] = "no validation scans (--val-fraction 0), so no threshold was chosen"
        logger.warning("clinical outputs: %s", referral["note"])
    else:
        validation = predict_both(config, models, loaders["val"])
        chosen = {}
        for name, prediction in validation.items():
            correct = prediction.probs.argmax(axis=1) == prediction.labels
            chosen[name] = choose_referral_threshold(prediction.predictive_entropy, correct, target_accuracy)
        main = chosen[REFERRAL_MODEL]
        referral.update({
            "threshold": main["threshold"],
            "met_target": main["met_target"],
            "val_accuracy_kept": main["accuracy_kept"],
            "val_referred_fraction": main["referred_fraction"],
            "num_val": main["num_scans"],
        })
        kept_scans = round(main["num_scans"] * (1.0 - main["referred_fraction"]))
        if not main["met_target"]:
            referral["note"] = (f"no threshold reaches accuracy {target_accuracy} on the kept validation "
                                "scans; the strictest one (the lowest entropy) is used")
        elif kept_scans < MIN_KEPT_VALIDATION_SCANS:
            referral["note"] = (f"the threshold keeps only {kept_scans} of {main['num_scans']} validation scans, too few "
                                "to trust; train longer or use a larger validation split")
        if "note" in referral:
            logger.warning("clinical outputs: %s", referral["note"])
        referral["deterministic"] = chosen["deterministic"]
    atomic_write_json(out / REFERRAL_FILE, referral)

    test_outcome = {}
    if referral["threshold"] is not None:
        for name, prediction in predictions.items():
            correct = prediction.probs.argmax(axis=1) == prediction.labels
            own = referral["threshold"] if name == REFERRAL_MODEL else referral["deterministic"]["threshold"]
            test_outcome[name] = {"threshold": own,
                                  **apply_threshold(prediction.predictive_entropy, correct, own)}
    return {**referral, "test": test_outcome}


def fit_run_input_check(out: Path, models, loaders) -> tuple[dict | None, dict, np.ndarray | None]:
    """Fit the input check on the Bayesian model's backbone, save it in ``out``, and score the test split.

    ``loaders`` needs ``train_plain`` (the training scans without augmentation), ``val`` and
    ``test``. Returns the check (``None`` when it cannot be fitted), its summary for the report, and the
    test scans' distances.
    """
    from pipelines.training import extract_features

    if models is None or "train_plain" not in loaders or loaders["val"].num_data == 0:
        return None, {"skipped": "no trained backbone or no validation scans to fit the input check on"}, None
    logger.info("clinical outputs: fitting the input check on the training scans' features")
    backbone = models.hybrid.backbone
    features, labels = extract_features(backbone, loaders["train_plain"])
    val_features, _ = extract_features(backbone, loaders["val"])
    check = fit_input_check(features, labels, val_features, models.hybrid.head.out_features)
    atomic_torch_save(check, out / INPUT_CHECK_FILE)
    test_distance = input_distance(check, extract_features(backbone, loaders["test"])[0])
    summary = {"score": "squared Mahalanobis distance of the backbone features to the nearest class mean",
               "threshold": check["threshold"], "quantile": check["quantile"],
               "val_referred_fraction": float(np.mean(input_distance(check, val_features) > check["threshold"])),
               "test_referred_fraction": float(np.mean(test_distance > check["threshold"]))}
    return check, summary, test_distance


def _ood_summary(config, data, models, device, predictions, check=None, test_distance=None) -> dict:
    found = predict_photographs(config, data, models, device)
    if "skipped" in found:
        logger.info("clinical outputs: %s", found["skipped"])
        return found
    loader = found.pop("loader")
    input_check = None
    if check is not None:
        from pipelines.training import extract_features

        distance = input_distance(check, extract_features(models.hybrid.backbone, loader)[0])
        input_check = {"auroc": ood_auroc({"input_distance": test_distance}, {"input_distance": distance})[
                           "input_distance"],
                       "referred_fraction": float(np.mean(distance > check["threshold"]))}
    auroc, labelled_as = {}, {}
    for name, prediction in found.pop("predictions").items():
        bayesian = name != "deterministic"
        auroc[name] = ood_auroc(referral_scores(predictions[name], bayesian), referral_scores(prediction, bayesian))
        auroc[name].setdefault("mutual_information", None)
        predicted = np.bincount(prediction.probs.argmax(axis=1), minlength=len(data.classes))
        labelled_as[name] = {
            "predicted_class_counts": {c: int(n) for c, n in zip(data.classes, predicted, strict=True)},
            "mean_confidence": float(prediction.probs.max(axis=1).mean()),
            "mean_predictive_entropy": float(prediction.predictive_entropy.mean()),
            "mean_predictive_entropy_mri": float(predictions[name].predictive_entropy.mean()),
        }
    return {**found, "negatives": "MRI test scans", "positives": "CIFAR-10 test images, grayscale",
            "auroc": auroc, "labelled_as": labelled_as, "input_check": input_check,
            "note": "A deterministic model has no posterior samples, so its mutual information is 0 "
                    "and has no AUROC"}


# --------------------------------------------------------------------------------------------
# clinical.md


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def clinical_markdown(result: dict, classes, info: dict) -> str:
    """Return ``clinical.md``: the tables of ``result`` with the figures it names."""
    lines = ["# Clinical summary: brain-tumour MRI", ""]
    lines += ["Probabilities come from each model on the held-out test scans. Entropy and mutual "
              "information are in nats (maximum ln 4 = 1.386 for four classes).", ""]

    lines += ["## Per-class results", "",
              "Precision: of the scans given this label, the share that truly have it. Recall "
              "(sensitivity): of the scans that truly have it, the share found. ECE: one-vs-rest "
              "calibration error of this class's probability (15 bins); 0 is perfect.", ""]
    for model, table in result["per_class"].items():
        lines += [f"### {MODEL_TITLES.get(model, model)}", "",
                  "| class | precision | recall | ECE | scans |", "|---|---|---|---|---|"]
        for name in classes:
            row = table["per_class"][name]
            lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['ece']:.4f} "
                         f"| {row['support']} |")
        lines += ["", f"![confusion matrix]({result['files'][f'confusion_{model}']})", ""]

    lines += ["## Referring the most uncertain scans", "",
              "Accuracy on the scans the model keeps when the given share of test scans, the most "
              "uncertain first, is referred to a radiologist.", "",
              "| model | score | 0% referred | 5% | 10% | 20% | AURC |", "|---|---|---|---|---|---|---|"]
    for model, by_score in result["selective_risk"].items():
        for score, row in by_score.items():
            at = row["accuracy_at"]
            lines.append(f"| {MODEL_TITLES.get(model, model)} | {SCORE_TITLES[score]} | "
                         + " | ".join(_number(at[k]) for k in ("0.00", "0.05", "0.10", "0.20"))
                         + f" | {row['aurc']:.4f} |")
    lines += ["", f"![selective risk]({result['files']['selective_risk']})", ""]

    referral = result["referral"]
    lines += ["## Referral threshold", ""]
    if referral["threshold"] is None:
        lines += [referral.get("note", "no threshold was chosen"), ""]
    else:
        lines += [f"Chosen on {referral['num_val']} validation scans for the Bayesian model: refer a scan when "
                  f"its predictive entropy exceeds {referral['threshold']:.4f} nats. On validation this "
                  f"refers {referral['val_referred_fraction']:.1%} and the kept scans are "
                  f"{referral['val_accuracy_kept']:.2%} correct (target {referral['target_accuracy']:.2%}).",
                  ""]
        if "note" in referral:
            lines += [f"Warning: {referral['note']}.", ""]
        lines += ["| model | threshold | test referred | test accuracy kept |", "|---|---|---|---|"]
        for model, row in referral["test"].items():
            lines.append(f"| {MODEL_TITLES.get(model, model)} | {row['threshold']:.4f} | "
                         f"{row['referred_fraction']:.1%} | {_number(row['accuracy_kept'])} |")
        lines += ["", f"The threshold is stored in `{REFERRAL_FILE}`; `bayeshead predict` applies it.", ""]

    ood = result["out_of_distribution"]
    lines += ["## Inputs that are not brain MRI", ""]
    if "skipped" in ood:
        lines += [f"Skipped: {ood['skipped']}.", ""]
    else:
        lines += [f"AUROC for telling {ood['num_images']} CIFAR-10 photographs (grayscale, resized like "
                  "the scans) from the MRI test scans by each uncertainty score; 0.5 is chance, 1.0 "
                  "perfect.", "", "| model | predictive entropy | mutual information |", "|---|---|---|"]
        for model, row in ood["auroc"].items():
            lines.append(f"| {MODEL_TITLES.get(model, model)} | {_number(row['predictive_entropy'])} | "
                         f"{_number(row['mutual_information'])} |")
        lines += ["", ood["note"] + ".", "",
                  "What the models call the photographs, with their mean confidence and mean predictive "
                  "entropy (on the MRI test scans for comparison):", "",
                  "| model | " + " | ".join(classes) + " | mean confidence | mean entropy | on MRI |",
                  "|---|" + "---|" * (len(classes) + 3)]
        for model, row in ood["labelled_as"].items():
            counts = " | ".join(str(row["predicted_class_counts"][name]) for name in classes)
            lines.append(f"| {MODEL_TITLES.get(model, model)} | {counts} | {row['mean_confidence']:.3f} | "
                         f"{row['mean_predictive_entropy']:.3f} | {row['mean_predictive_entropy_mri']:.3f} |")
        lines.append("")
        if ood.get("input_check"):
            row = ood["input_check"]
            lines += [f"The input check (feature distance, below) tells the photographs from the MRI test scans "
                      f"with AUROC {row['auroc']:.4f} and refers {row['referred_fraction']:.1%} of them.", ""]

    check = result.get("input_check", {})
    if "threshold" in check:
        lines += ["## Input check", "",
                  f"Score: {check['score']}. A scan is referred as unlike the training scans when its score "
                  f"exceeds {check['threshold']:.2f}, the {check['quantile']:.0%} quantile on the validation "
                  f"scans. It refers {check['test_referred_fraction']:.1%} of the MRI test scans. "
                  f"`bayeshead predict` applies it with the entropy threshold (stored in `{INPUT_CHECK_FILE}`).", ""]

    leakage = result.get("leakage")
    if leakage:
        lines += ["## Test scans that also appear in training", "",
                  f"Of {leakage['test_scans_checked']} test scans, {leakage['byte_identical']['total']} are "
                  f"byte-identical to a training scan and {leakage['near_identical']['total']} more are "
                  f"near-identical (perceptual hash within {leakage['phash_threshold']} of 64 bits). "
                  + ("They were dropped from the test split." if info.get("drop_leaked")
                     else "They are still in the test split, so test accuracy is optimistic."), "",
                  "| class | byte-identical | near-identical |", "|---|---|---|"]
        for name in classes:
            lines.append(f"| {name} | {leakage['byte_identical']['per_class'][name]} | "
                         f"{leakage['near_identical']['per_class'][name]} |")
        lines.append("")

    lines += ["## Cases to review", "",
              f"The {len(result['cases_to_review'])} test scans with the highest predictive entropy "
              "(Bayesian model). Red titles are misclassified.", "",
              f"![cases to review]({result['files']['cases_to_review']})", "",
              "| scan | true | predicted | probability | entropy | MI | refer |", "|---|---|---|---|---|---|---|"]
    for case in result["cases_to_review"]:
        lines.append(f"| {Path(case['scan']).name} | {case['true_class']} | {case['predicted_class']} | "
                     f"{case['probabilities'][case['predicted_class']]:.3f} | {case['predictive_entropy']:.3f} | "
                     f"{case['mutual_information']:.4f} | {'yes' if case['refer'] else 'no'} |")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# bayeshead predict


@dataclass
class Predictor:
    """A finished run's Bayesian model with what it needs to preprocess and refer new scans."""

    config: object
    models: object
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_size: int
    mode: str
    referral: dict
    device: torch.device
    input_check: dict | None = None


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(what)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not readable JSON ({error}); rerun 'bayeshead run'") from error


def load_predictor(run_dir, device: str | None = None) -> Predictor:
    """Load a run's models, normalisation and referral threshold, without its training data.

    Raises
    ------
    FileNotFoundError
        If ``run_dir``, its ``report.json``, ``referral.json`` or a checkpoint is missing.
    DataError
        If a JSON file is damaged or ``referral.json`` has no threshold.
    """
    from pipelines.config import RunConfig
    from pipelines.runner import load_run
    from pipelines.training import select_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} not found: expected the output folder of 'bayeshead run'")
    stored = _read_json(run_dir / "report.json",
                        f"no report.json in {run_dir}: expected the output folder of 'bayeshead run'")
    referral = _read_json(run_dir / REFERRAL_FILE,
                          f"no {REFERRAL_FILE} in {run_dir}: only 'bayeshead run --dataset brain-mri' writes "
                          "the referral threshold that predict applies")
    if referral.get("threshold") is None:
        raise DataError(f"{run_dir / REFERRAL_FILE} has no threshold ({referral.get('note', 'none stored')}); "
                        "rerun with a validation split (--val-fraction above 0)")

    config = RunConfig.from_report(stored["config"])
    config.progress = False
    torch_device = select_device(device or config.device)
    mean, std = stored["normalization"]["mean"], stored["normalization"]["std"]
    image_size = stored.get("data_source", {}).get("image_size") or config.image_size or BRAIN_MRI_SIZE
    channels = len(mean)
    # load_run sizes the models from a DataBundle and runs the guide once on two test images to
    # create its parameters, which it then overwrites: blank placeholders serve for both.
    placeholder = ImageSet(torch.zeros((2, channels, image_size, image_size), dtype=torch.uint8),
                           torch.zeros(2, dtype=torch.int64))
    bundle = DataBundle(config.dataset, list(stored["classes"]), placeholder, placeholder, placeholder, mean, std)
    models = load_run(run_dir, config, bundle, torch_device)
    input_check = None
    if (run_dir / INPUT_CHECK_FILE).is_file():  # runs from before the input check have none
        input_check = load_checkpoint(run_dir / INPUT_CHECK_FILE, map_location="cpu")
    return Predictor(config, models, list(stored["classes"]), mean, std, int(image_size),
                     "L" if channels == 1 else "RGB", referral, torch_device, input_check)


def predict_scans(predictor: Predictor, scans) -> tuple[list[dict], list[str]]:
    """Classify scan files with the Bayesian model and decide refer or accept for each.

    Returns
    -------
    results : list of dict
        One per readable scan, in input order: ``scan``, ``predicted_class``, ``probabilities``,
        ``predictive_entropy``, ``mutual_information``, ``refer`` and ``threshold``. With the
        run's input check also ``input_distance`` and ``unlike_training``; such a scan is
        referred whatever its entropy.
    errors : list of str
        One message per file that could not be decoded.
    """
    from pipelines.prediction import predict_bayesian
    from pipelines.runner import PREDICT_BATCH_SIZE

    arrays, readable, errors = [], [], []
    for scan in scans:
        try:
            arrays.append(decode_image(Path(scan), predictor.mode, predictor.image_size))
            readable.append(str(scan))
        except DataError as error:
            errors.append(str(error))
    if not arrays:
        return [], errors

    images = ImageSet(torch.from_numpy(np.stack(arrays)), torch.zeros(len(arrays), dtype=torch.int64))
    loader = BatchIterator(images, PREDICT_BATCH_SIZE, predictor.mean, predictor.std, device=predictor.device)
    config = predictor.config
    prediction = predict_bayesian(predictor.models.hybrid, predictor.models.guide, loader,
                                  config.num_samples, seed=config.seed)
    threshold = float(predictor.referral["threshold"])
    entropy, mutual = prediction.predictive_entropy, prediction.mutual_information
    distance = None
    if predictor.input_check is not None:
        from pipelines.training import extract_features

        distance = input_distance(predictor.input_check,
                                  extract_features(predictor.models.hybrid.backbone, loader)[0])
    results = []
    for index, scan in enumerate(readable):
        probs = prediction.probs[index]
        results.append({
            "scan": scan,
            "predicted_class": predictor.classes[int(probs.argmax())],
            "probabilities": {name: float(p) for name, p in zip(predictor.classes, probs, strict=True)},
            "predictive_entropy": float(entropy[index]),
            "mutual_information": float(mutual[index]),
            "refer": bool(entropy[index] > threshold),
            "threshold": threshold,
        })
        if distance is not None:
            unlike = bool(distance[index] > predictor.input_check["threshold"])
            results[-1].update({"input_distance": float(distance[index]), "unlike_training": unlike,
                                "refer": results[-1]["refer"] or unlike})
    return results, errors


def format_predictions(results: list[dict], classes) -> str:
    """Return the predictions as a Markdown table, one row per scan."""
    checked = any("unlike_training" in row for row in results)
    header = ["scan", "predicted", *[f"p({name})" for name in classes], "entropy", "MI",
              *(["input check"] if checked else []), "decision"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results:
        cells = [row["scan"], row["predicted_class"], *[f"{row['probabilities'][name]:.4f}" for name in classes],
                 f"{row['predictive_entropy']:.4f}", f"{row['mutual_information']:.4f}"]
        if checked:
            cells.append("unlike training scans" if row.get("unlike_training") else "ok")
        cells.append("refer" if row["refer"] else "accept")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _predict_command(args) -> int:
    predictor = load_predictor(args.run_dir, device=args.device)
    results, errors = predict_scans(predictor, args.scans)
    for message in errors:
        print(f"bayeshead: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    elif results:
        print(format_predictions(results, predictor.classes))
        referral = predictor.referral
        print(f"refer when predictive entropy > {referral['threshold']:.4f} nats (chosen on "
              f"{referral.get('num_val', 'the')} validation scans for accuracy {referral['target_accuracy']} "
              f"on the kept scans, referring {referral.get('val_referred_fraction', float('nan')):.1%} of them"
              + ("" if referral.get("met_target", True) else "; no threshold reached it, so the strictest is used")
              + ")")
        if predictor.input_check is not None:
            print(f"also refer when the input check's feature distance > {predictor.input_check['threshold']:.2f} "
                  f"(the {predictor.input_check['quantile']:.0%} quantile on the validation scans)")
    return 1 if errors else 0


def add_commands(subparsers) -> None:
    """Add ``predict`` to the ``bayeshead`` parser."""
    parser = subparsers.add_parser(
        "predict", help="classify new MRI scans with a finished brain-mri run and refer the uncertain ones",
        description="Classify scan files with the Bayesian model of RUN_DIR, preprocessed as in training "
                    "(grayscale, resized to the run's image size), and decide refer or accept from the "
                    "threshold in RUN_DIR/referral.json.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output folder of 'bayeshead run --dataset brain-mri'")
    parser.add_argument("scans", metavar="SCAN", nargs="+", help="image files to classify (any format Pillow reads)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list with one object per scan instead of a table")
    parser.add_argument("--device", choices=DEVICES, help="device to predict on (default: the run's)")
    parser.set_defaults(handler=_predict_command)
