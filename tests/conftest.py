"""Shared fixtures: seeding, a clean Pyro param store, and the location of the real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_root() -> Path:
    """``$BAYESHEAD_DATA`` if set, else the shared data folder next to the repository."""
    return Path(os.environ.get("BAYESHEAD_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seeded_and_clean(tmp_path, monkeypatch):
    pyro.set_rng_seed(0)
    np.random.seed(0)
    pyro.clear_param_store()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    # Decoded-image caches of the tests stay inside the test's own folder.
    monkeypatch.setenv("BAYESHEAD_CACHE", str(tmp_path / "cache"))
    yield
    pyro.clear_param_store()


@pytest.fixture
def cifar_jpeg_root() -> Path:
    root = real_data_root()
    if not (root / "cifar10-jpeg" / "train").is_dir():
        pytest.skip(f"real CIFAR-10 images not found under {root}/cifar10-jpeg (set BAYESHEAD_DATA)")
    return root


@pytest.fixture
def brain_mri_root() -> Path:
    root = real_data_root()
    if not (root / "brain-tumor-mri" / "Training").is_dir():
        pytest.skip(f"brain-tumour MRI scans not found under {root}/brain-tumor-mri (set BAYESHEAD_DATA)")
    return root
