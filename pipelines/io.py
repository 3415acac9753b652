"""Atomic file writes: a temporary file in the target folder, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from pipelines.config import RunFolderError


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file readable by its owner only; give it the usual umask mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: Path) -> None:
    """Save with ``torch.save`` so that ``path`` contains either the old or the new file."""
    _atomic_write(path, lambda stream: torch.save(obj, stream))


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def atomic_save_figure(figure, path: Path, **kwargs) -> None:
    _atomic_write(path, lambda stream: figure.savefig(stream, format="png", **kwargs))


def load_checkpoint(path: Path, map_location=None) -> dict:
    """Load a checkpoint of ``bayeshead run`` with ``weights_only=True``, so a file cannot run code.

    Raises :class:`pipelines.config.RunFolderError` when the file is damaged or contains
    anything but tensors and plain containers. PyTorch's own error suggests
    ``weights_only=False``, which would run any code in a tampered file, so it is not passed on.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunFolderError(
            f"cannot read checkpoint {path}: it is damaged or not a checkpoint of 'bayeshead run' ({reason[:200]}); "
            "train the run again"
        ) from None
    if not isinstance(state, dict):
        raise RunFolderError(f"invalid checkpoint {path}: it contains a {type(state).__name__}, not the dict "
                             "that 'bayeshead run' saves")
    return state
