"""Backbones, Bayesian heads and priors."""

from models.backbone import CNNBackbone, MLPBackbone, freeze, is_frozen
from models.classifiers import DeterministicClassifier, HybridClassifier
from models.heads import BayesianLinearHead, data_plate
from models.priors import (
    PRIOR_NAMES,
    CallablePrior,
    HierarchicalPrior,
    LaplacePrior,
    NormalPrior,
    Prior,
    ScaleMixturePrior,
    StudentTPrior,
    make_prior,
)

__all__ = [
    "PRIOR_NAMES",
    "BayesianLinearHead",
    "CNNBackbone",
    "CallablePrior",
    "DeterministicClassifier",
    "HierarchicalPrior",
    "HybridClassifier",
    "LaplacePrior",
    "MLPBackbone",
    "NormalPrior",
    "Prior",
    "ScaleMixturePrior",
    "StudentTPrior",
    "data_plate",
    "freeze",
    "is_frozen",
    "make_prior",
]
