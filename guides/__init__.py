"""Variational guides for the Bayesian head."""

from guides.autoguides import GUIDE_NAMES, MAX_MULTIVARIATE_PARAMS, count_latent_params, make_guide

__all__ = ["GUIDE_NAMES", "MAX_MULTIVARIATE_PARAMS", "count_latent_params", "make_guide"]
