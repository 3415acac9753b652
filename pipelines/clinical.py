"""Outputs for a clinical reader: referral thresholds, selective risk, cases to review."""

from __future__ import annotations


def add_commands(subparsers) -> None:
    """Add this module's sub-commands to the ``bayeshead`` parser."""
