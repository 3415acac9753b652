"""ArviZ diagnostics of the Bayesian head: InferenceData, LOO, compare, plots."""

from __future__ import annotations


def add_commands(subparsers) -> None:
    """Add this module's sub-commands to the ``bayeshead`` parser."""
