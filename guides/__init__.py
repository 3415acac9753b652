"""Variational guides for the Bayesian head."""

from guides.autoguides import (
    GUIDE_NAMES,
    MAX_MULTIVARIATE_PARAMS,
    check_meanfield_elbo,
    count_latent_params,
    laplace_from_state,
    laplace_posterior,
    laplace_state,
    make_guide,
)
from guides.meanfield import MeanFieldGuide

__all__ = [
    "GUIDE_NAMES",
    "MAX_MULTIVARIATE_PARAMS",
    "MeanFieldGuide",
    "check_meanfield_elbo",
    "count_latent_params",
    "laplace_from_state",
    "laplace_posterior",
    "laplace_state",
    "make_guide",
]
