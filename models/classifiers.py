"""The two classifiers compared by the pipeline: deterministic and hybrid (Bayesian head)."""

from __future__ import annotations

import pyro
import torch
from torch import nn

from models.backbone import is_frozen
from models.heads import BayesianLinearHead


class DeterministicClassifier(nn.Module):
    """Backbone plus ``nn.Linear``, trained with cross-entropy; predicts with softmax."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class HybridClassifier(nn.Module):
    """A deterministic backbone with a Bayesian linear head, as one Pyro model.

    The backbone's trainable parameters are registered in Pyro's param store as point
    estimates (the SVI optimizer trains them with the guide's parameters); they are never
    sample sites. Parameters with ``requires_grad=False`` are left out of the param store,
    because registering a parameter there switches ``requires_grad`` back on.
    """

    def __init__(self, backbone: nn.Module, head: BayesianLinearHead):
        super().__init__()
        if head.in_features != backbone.out_features:
            raise ValueError(
                f"head expects {head.in_features} features but the backbone gives {backbone.out_features}"
            )
        self.backbone = backbone
        self.head = head
        # Divides every posterior draw's logits at prediction time; 1 until a temperature is
        # fitted on held-out data (pipelines.runner.fit_head_temperature). Never used in training.
        self.temperature = 1.0

    @property
    def backbone_frozen(self) -> bool:
        return is_frozen(self.backbone)

    def register_backbone(self) -> None:
        """Put the backbone's trainable parameters into the param store, unchanged."""
        for name, param in self.backbone.named_parameters():
            if param.requires_grad:
                pyro.param(f"backbone.{name}", param)

    def model(self, images: torch.Tensor, targets=None, num_data: int | None = None):
        """Pyro model over images: backbone features, then the Bayesian head."""
        self.register_backbone()
        features = self.backbone(images)
        return self.head.model(features, targets, num_data)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features in eval mode (batch norm uses its running statistics)."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return self.backbone(images)
        finally:
            self.backbone.train(was_training)
