"""Atomic writes."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from pipelines.io import atomic_torch_save, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "model.pt"
    atomic_torch_save({"weights": torch.ones(3)}, path)
    # Pickling a lambda fails after torch.save has started writing the temporary file.
    with pytest.raises((AttributeError, pickle.PicklingError), match="lambda"):
        atomic_torch_save({"weights": torch.zeros(3), "hook": lambda: 0}, path)
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_atomic_write_uses_umask_mode(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
