"""Small data sets that tests write themselves."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar_pickles(root: Path, name: str = "cifar10", per_split: tuple[int, int] = (50, 20),
                        num_classes: int | None = None, seed: int = 0) -> Path:
    """Write tiny files in the official CIFAR python-pickle layout; returns the data root."""
    rng = np.random.default_rng(seed)
    num_classes = num_classes or (10 if name == "cifar10" else 100)
    train_count, test_count = per_split

    def batch(count, label_key):
        labels = (np.arange(count) % num_classes).tolist()
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        # The class shows in the red channel's mean so a model can learn something.
        data[:, :1024] = (np.array(labels)[:, None] * (255 // num_classes)).astype(np.uint8)
        return {b"data": data, label_key: labels, b"batch_label": b"test batch"}

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        per_batch = max(1, train_count // 5)
        for index in range(1, 6):
            _dump(folder / f"data_batch_{index}", batch(per_batch, b"labels"))
        _dump(folder / "test_batch", batch(test_count, b"labels"))
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
        _dump(folder / "batches.meta", {b"label_names": names[:num_classes], b"num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        _dump(folder / "train", batch(train_count, b"fine_labels"))
        _dump(folder / "test", batch(test_count, b"fine_labels"))
        _dump(folder / "meta", {b"fine_label_names": [f"class{i}".encode() for i in range(num_classes)],
                                b"coarse_label_names": [b"coarse"]})
    return root


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def write_image_folder(root: Path, classes=("cats", "dogs"), per_class=(6, 3), size=16, mode="RGB") -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/test/<class>/*.jpg`` with random pixels."""
    from PIL import Image

    rng = np.random.default_rng(1)
    channels = 3 if mode == "RGB" else 1
    for split, count in zip(("train", "test"), per_class, strict=True):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for item in range(count):
                pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
                pixels[..., 0] = index * 100
                image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
                suffix = ".png" if split == "train" else ".jpg"
                image.save(folder / f"{item:03d}{suffix}", format="PNG" if suffix == ".png" else "JPEG")
    return root
