"""Dataset readers, splits and batches."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from pipelines.data import (
    BatchIterator,
    DataError,
    ImageSet,
    load_cifar_pickles,
    load_dataset,
    read_cifar_batch,
)
from tests.helpers import write_cifar_pickles, write_image_folder


def test_cifar10_pickles_read(tmp_path):
    write_cifar_pickles(tmp_path, "cifar10", per_split=(50, 20))
    train, test, classes = load_cifar_pickles(tmp_path, "cifar10")
    assert train.images.shape == (50, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert test.labels.tolist() == [i % 10 for i in range(20)]
    assert classes[0] == "airplane"
    # Channel-major layout: the first 1024 bytes of a row are the red plane.
    assert int(train.images[3, 0, 0, 0]) == 3 * 25


def test_cifar100_pickles_read(tmp_path):
    write_cifar_pickles(tmp_path, "cifar100", per_split=(40, 10), num_classes=100)
    data = load_dataset("cifar100", tmp_path, val_fraction=0.0)
    assert data.num_classes == 100
    assert len(data.train) == 40
    assert data.classes[5] == "class5"


def test_cifar_pickle_rejects_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(DataError, match=r"global (posix|os|nt)\.system is not allowed"):
        read_cifar_batch(path)


def test_cifar_missing_gives_instructions(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py.*--download"):
        load_dataset("cifar10", tmp_path)


def test_cifar_truncated_batch_named(tmp_path):
    write_cifar_pickles(tmp_path, "cifar10")
    broken = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_2: not a readable CIFAR batch file"):
        load_cifar_pickles(tmp_path, "cifar10")


def test_image_folder_layout_and_modes(tmp_path):
    write_image_folder(tmp_path, per_class=(6, 3))
    # A PNG file with a .jpg name is decoded by content.
    (tmp_path / "train" / "cats" / "000.png").rename(tmp_path / "train" / "cats" / "fake.jpg")
    data = load_dataset("image-folder", tmp_path, val_fraction=0.0)
    assert data.classes == ["cats", "dogs"]
    assert data.train.images.shape == (12, 3, 16, 16)
    assert len(data.test) == 6


def test_image_folder_corrupt_file_named(tmp_path):
    write_image_folder(tmp_path)
    bad = tmp_path / "test" / "dogs" / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode image .*broken.jpg"):
        load_dataset("image-folder", tmp_path)


def test_image_folder_missing(tmp_path):
    with pytest.raises(DataError, match=f"image folder {tmp_path / 'nope'} not found"):
        load_dataset("image-folder", tmp_path / "nope")


def test_image_folder_mixed_sizes_need_image_size(tmp_path):
    from PIL import Image

    write_image_folder(tmp_path, size=16)
    Image.new("RGB", (20, 12)).save(tmp_path / "train" / "cats" / "odd.png")
    with pytest.raises(DataError, match="--image-size"):
        load_dataset("image-folder", tmp_path)
    data = load_dataset("image-folder", tmp_path, image_size=10)
    assert data.train.images.shape[-2:] == (10, 10)


def test_validation_split_fixed_and_from_train():
    first = load_dataset("digits", "unused", seed=0)
    second = load_dataset("digits", "unused", seed=5)
    assert torch.equal(first.val.images, second.val.images)
    assert len(first.val) == pytest.approx(0.1 * (len(first.train) + len(first.val)), abs=10)
    assert len(first.test) == 359  # 20% of 1797 digits, per class rounded


def test_digits_pixel_range():
    data = load_dataset("digits", "unused")
    assert data.train.images.dtype == torch.uint8
    assert int(data.train.images.max()) == 255
    assert data.in_channels == 1


def test_subset_limits_each_split(tmp_path):
    write_cifar_pickles(tmp_path, "cifar10", per_split=(100, 40))
    data = load_dataset("cifar10", tmp_path, subset=30, val_fraction=0.0)
    assert len(data.train) == 30
    assert len(data.test) == 30


def test_unknown_dataset_lists_valid():
    with pytest.raises(DataError, match="valid names: digits, cifar10, cifar100, image-folder, brain-mri"):
        load_dataset("mnist", "data")


def test_batches_cover_data_once():
    images = ImageSet(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).clone(),
                      torch.arange(10))
    loader = BatchIterator(images, 4, [0.0], [1.0 / 255.0], shuffle=True)
    seen = torch.cat([labels for _, labels in loader])
    assert sorted(seen.tolist()) == list(range(10))
    assert len(loader) == 3
    batch, labels = next(iter(BatchIterator(images, 10, [0.0], [1.0 / 255.0])))
    # Normalised with mean 0 and std 1/255, pixels come back as their uint8 values.
    assert torch.allclose(batch[:, 0, 0, 0], labels.float())


def test_crop_flip_keeps_shape_and_content():
    pixels = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    loader = BatchIterator(ImageSet(pixels, torch.zeros(8, dtype=torch.long)), 8, [0, 0, 0], [1, 1, 1],
                           augment="crop-flip", generator=torch.Generator().manual_seed(3))
    batch, _ = next(iter(loader))
    assert batch.shape == (8, 3, 32, 32)
    original = pixels.float() / 255
    # Each crop is a shifted (and maybe mirrored) window: its centre 24x24 appears in the padded original.
    for index in range(8):
        found = False
        for flipped in (batch[index], batch[index].flip(-1)):
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    window = original[index, :, 4 + dy:28 + dy, 4 + dx:28 + dx]
                    if torch.allclose(flipped[:, 4:28, 4:28], window):
                        found = True
        assert found, index


def test_cifar10_jpeg_real_subset(cifar_jpeg_root):
    data = load_dataset("cifar10", cifar_jpeg_root, subset=200)
    assert data.info["format"] == "images"
    assert data.classes[:3] == ["airplane", "automobile", "bird"]
    assert data.train.images.shape[1:] == (3, 32, 32)
    assert len(data.test) == 200
    assert np.allclose(data.mean, [0.49, 0.48, 0.45], atol=0.05)
