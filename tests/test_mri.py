"""The brain-tumour MRI preset: class folders, grayscale scans and the leakage check."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import mri
from pipelines.data import DataError, decode_image, list_image_folder, load_dataset
from pipelines.mri import (
    PHASH_THRESHOLD,
    canonical_class_name,
    check_leakage,
    hamming_distances,
    load_brain_mri,
    scan_hashes,
)

MRI_CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _smooth_scan(seed: int, size: int = 128) -> Image.Image:
    """A grayscale image of smooth random blobs, whose perceptual hash survives resizing."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(8, 8), dtype=np.uint8), "L")
    return coarse.resize((size, size), Image.BICUBIC)


def _write_split(root, split: str, folders: dict[str, list[int]], mode: str = "L") -> None:
    """Write ``root/split/<folder>/<seed>.png`` for each seed."""
    for folder, seeds in folders.items():
        (root / split / folder).mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            _smooth_scan(seed).convert(mode).save(root / split / folder / f"{seed:03d}.png")


@pytest.mark.parametrize(
    ("folder", "expected"),
    [("notumor", "notumor"), ("no_tumor", "notumor"), ("No-Tumor", "notumor"), ("no tumor", "notumor"),
     ("Glioma", "glioma")],
)
def test_canonical_class_name(folder, expected):
    assert canonical_class_name(folder) == expected


def test_preset_on_real_subset(brain_mri_root):
    data = load_dataset("brain-mri", brain_mri_root, subset=24, image_size=32)

    assert data.classes == MRI_CLASSES
    assert data.augment == "scan"
    assert data.train.images.dtype == torch.uint8
    assert data.train.images.shape[1:] == (1, 32, 32)
    assert len(data.train) + len(data.val) == 24
    assert len(data.test) == 24
    assert data.in_channels == 1
    # The cached tensor contains exactly what decoding one file gives.
    first = data.test.paths[0]
    assert torch.equal(data.test.images[0], torch.from_numpy(np.array(decode_image(first, "L", 32))))
    assert "/Testing/" in first
    assert data.info["image_size"] == 32
    assert data.info["mode"] == "L"
    assert data.info["leakage"]["test_scans_checked"] == 24
    assert data.info["leakage"]["train_scans_checked"] == 24


def test_real_png_named_jpg_decodes(brain_mri_root):
    path = brain_mri_root / "brain-tumor-mri" / "Training" / "notumor" / "Tr-no_1005.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with Image.open(path) as image:
        assert image.format == "PNG"
    assert decode_image(path, "L", 16).shape == (1, 16, 16)


def test_real_byte_identical_counts(brain_mri_root):
    # Byte-identical copies need only SHA-256; each perceptual hash is replaced by 64 bits of
    # the SHA-256, so no near-identical match is expected by chance.
    root = brain_mri_root / "brain-tumor-mri"
    hashes, labels = {}, {}
    for split in ("Training", "Testing"):
        paths, labels[split], _ = list_image_folder(root / split, MRI_CLASSES)
        digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
        hashes[split] = [(d, d[:16]) for d in digests]

    leakage = check_leakage(hashes["Training"], labels["Training"], hashes["Testing"], labels["Testing"],
                            MRI_CLASSES)

    assert leakage["byte_identical"]["total"] == 103
    assert leakage["byte_identical"]["per_class"] == {"glioma": 0, "meningioma": 2, "notumor": 96, "pituitary": 5}
    assert leakage["near_identical"]["total"] == 0
    assert leakage["cross_class"] == 0
    # 5712 training scans of which 5521 are distinct.
    assert leakage["train_byte_duplicates"] == 5712 - 5521


def test_leakage_exact_and_resized_copy(tmp_path):
    _write_split(tmp_path, "Training", {"glioma": [1, 2], "no_tumor": [3, 4]})
    _write_split(tmp_path, "Testing", {"glioma": [], "notumor": [9]})
    shutil.copy(tmp_path / "Training" / "glioma" / "001.png", tmp_path / "Testing" / "glioma" / "copy.png")
    resized = _smooth_scan(4).resize((96, 96), Image.BILINEAR)
    resized.save(tmp_path / "Testing" / "notumor" / "resized.jpg", quality=90)

    train, test, classes, info = load_brain_mri(tmp_path, image_size=16)
    leakage = info["leakage"]

    assert classes == ["glioma", "notumor"]
    assert info["class_folders"]["train"] == {"glioma": "glioma", "notumor": "no_tumor"}
    assert len(test) == 3
    assert leakage["byte_identical"]["per_class"] == {"glioma": 1, "notumor": 0}
    assert leakage["near_identical"]["per_class"] == {"glioma": 0, "notumor": 1}
    assert leakage["flagged"]["total"] == 2
    assert leakage["cross_class"] == 0
    pairs = {p["test"].rsplit("/", 1)[-1]: p for p in leakage["pairs"]}
    assert pairs["copy.png"]["distance"] == 0
    assert pairs["copy.png"]["train"].endswith("glioma/001.png")
    assert 0 <= pairs["resized.jpg"]["distance"] <= PHASH_THRESHOLD
    assert pairs["resized.jpg"]["train"].endswith("no_tumor/004.png")
    assert "009.png" not in pairs
    assert info["dropped"] == 0


def test_drop_leaked_keeps_unrelated(tmp_path):
    _write_split(tmp_path, "Training", {"glioma": [1, 2], "notumor": [3, 4]})
    _write_split(tmp_path, "Testing", {"glioma": [], "notumor": [9]})
    shutil.copy(tmp_path / "Training" / "glioma" / "001.png", tmp_path / "Testing" / "glioma" / "copy.png")
    _smooth_scan(4).resize((96, 96)).save(tmp_path / "Testing" / "notumor" / "resized.jpg", quality=90)

    _, test, _, info = load_brain_mri(tmp_path, image_size=16, drop_leaked=True)

    assert [p.rsplit("/", 1)[-1] for p in test.paths] == ["009.png"]
    assert test.labels.tolist() == [1]
    assert test.images.shape == (1, 1, 16, 16)
    assert info["drop_leaked"] is True
    assert info["dropped"] == 2


def test_modes_become_one_channel(tmp_path):
    _write_split(tmp_path, "Training", {"a": [1]}, mode="RGB")
    _write_split(tmp_path, "Training", {"a": [2]}, mode="RGBA")
    _write_split(tmp_path, "Testing", {"a": [3]}, mode="P")

    train, test, _, _ = load_brain_mri(tmp_path, image_size=20)

    assert train.images.shape == (2, 1, 20, 20)
    assert test.images.shape == (1, 1, 20, 20)


def test_hash_cache_reused(tmp_path, monkeypatch):
    _write_split(tmp_path, "Training", {"a": [1, 2]})
    paths = sorted((tmp_path / "Training" / "a").iterdir())
    first = scan_hashes(paths)

    def fail(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(mri, "hash_scan", fail)
    assert scan_hashes(paths) == first
    cached = json.loads((tmp_path / "cache" / mri.HASH_CACHE_NAME).read_text())
    assert len(cached) == 2
    assert first[0][0] == hashlib.sha256(paths[0].read_bytes()).hexdigest()


def test_hamming_distances_known():
    distances = hamming_distances(["0000000000000000", "ffffffffffffffff"],
                                  ["0000000000000000", "000000000000000f", "8000000000000001"])
    assert distances.tolist() == [[0, 4, 2], [64, 60, 62]]


def test_corrupt_scan_named(tmp_path):
    _write_split(tmp_path, "Training", {"a": [1]})
    _write_split(tmp_path, "Testing", {"a": [2]})
    (tmp_path / "Testing" / "a" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.jpg"):
        load_brain_mri(tmp_path, image_size=16)


def test_mismatched_classes_rejected(tmp_path):
    _write_split(tmp_path, "Training", {"glioma": [1], "notumor": [2]})
    _write_split(tmp_path, "Testing", {"glioma": [3], "pituitary": [4]})
    with pytest.raises(DataError, match=r"name different classes.*rename the folders"):
        load_brain_mri(tmp_path, image_size=16)


def test_two_spellings_of_one_class_rejected(tmp_path):
    _write_split(tmp_path, "Training", {"notumor": [1], "no_tumor": [2]})
    _write_split(tmp_path, "Testing", {"notumor": [3]})
    with pytest.raises(DataError, match=r"'no_tumor' and 'notumor' both name the class 'notumor'"):
        load_brain_mri(tmp_path, image_size=16)


def test_missing_root_explains_layout(tmp_path):
    with pytest.raises(DataError, match=r"no brain MRI scans under .*brain-tumor-mri/Training/<class>/"):
        load_dataset("brain-mri", tmp_path / "absent")


def test_invalid_image_size_rejected(tmp_path):
    with pytest.raises(DataError, match="image_size must be a positive integer number of pixels, got 0"):
        load_brain_mri(tmp_path, image_size=0)


def test_drop_leaked_flag_reaches_loader(tmp_path):
    from pipelines.cli import build_parser, config_from_args
    from pipelines.runner import load_config_data

    _write_split(tmp_path, "Training", {"glioma": [1, 2], "notumor": [3, 4]})
    _write_split(tmp_path, "Testing", {"glioma": [5], "notumor": [9]})
    shutil.copy(tmp_path / "Training" / "glioma" / "001.png", tmp_path / "Testing" / "glioma" / "copy.png")
    args = build_parser().parse_args(["run", "--dataset", "brain-mri", "--data-dir", str(tmp_path), "--drop-leaked",
                                      "--image-size", "16", "--val-fraction", "0"])
    config = config_from_args(args)

    data = load_config_data(config)

    assert config.drop_leaked is True
    assert sorted(p.rsplit("/", 1)[-1] for p in data.test.paths) == ["005.png", "009.png"]
    assert data.info["dropped"] == 1


def test_drop_leaked_rejected_elsewhere():
    from pipelines.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="--drop-leaked applies to --dataset brain-mri only, got --dataset cifar10"):
        RunConfig(dataset="cifar10", drop_leaked=True).validate()
