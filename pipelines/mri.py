"""The brain-tumour MRI preset: grayscale scans, canonical class names and a leakage check.

The data set is ``<root>/brain-tumor-mri/{Training,Testing}/<class>/``, or a ``root`` that
contains ``Training/`` and ``Testing/`` itself. Its files mix JPEG and PNG data, four Pillow
modes and hundreds of sizes, so every scan is decoded by content, converted to one grayscale
channel (mode ``L``) and resized to one square size, once, through the image cache of
:mod:`pipelines.data`.

Public test splits of this compilation share scans with its training split. The leakage check
hashes every scan twice: SHA-256 of the file bytes (byte-identical copies) and a 64-bit
perceptual hash (``imagehash.phash``) that survives re-encoding, resizing and small intensity
changes (near-identical copies). Hashes are cached per file in ``$BAYESHEAD_CACHE``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipelines.data import (
    TEST_SPLITS,
    TRAIN_SPLITS,
    DataError,
    ImageSet,
    cache_dir,
    find_split,
    list_image_folder,
    load_images_cached,
    subset_indices,
)
from pipelines.io import atomic_write_json

logger = logging.getLogger(__name__)

DATA_FOLDER = "brain-tumor-mri"
IMAGE_MODE = "L"

PHASH_THRESHOLD = 2
"""Largest Hamming distance (of 64 bits) between perceptual hashes that counts as near-identical.

No byte-identical copy in the 7,023 real scans crosses classes, so a close match across classes
is chance. No test scan lies within distance 2 of a training scan of another class, while 7 do
within 4 and 59 within 6. Pairs within 2 are mostly the same slice re-encoded, cropped or
shifted. Pairs at 4 to 6 are mostly neighbouring slices of one patient, which
``distance_table`` in the leakage report counts separately.
"""

DISTANCE_TABLE_THRESHOLDS = (0, 2, 4, 6, 8)

HASH_CACHE_NAME = "scan-hashes-v1.json"


# --------------------------------------------------------------------------------------------
# Class folders


def canonical_class_name(folder_name: str) -> str:
    """Return the class name with ``_``, ``-`` and spaces removed, in lower case.

    ``no_tumor``, ``No-Tumor`` and ``notumor`` all become ``notumor``, so the spellings used by
    different releases of the data set name the same class.

    Examples
    --------
    >>> canonical_class_name("no_tumor")
    'notumor'
    >>> canonical_class_name("Pituitary")
    'pituitary'
    """
    return "".join(folder_name.split()).replace("_", "").replace("-", "").lower()


def class_folders(split_dir: Path) -> dict[str, str]:
    """Map each canonical class name to its folder name under ``split_dir``.

    Raises
    ------
    DataError
        If ``split_dir`` has no class folders, or two folders share a canonical name.
    """
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{split_dir}: expected one sub-folder per class, found none")
    mapping: dict[str, str] = {}
    for folder in folders:
        name = canonical_class_name(folder)
        if name in mapping:
            raise DataError(
                f"{split_dir}: class folders {mapping[name]!r} and {folder!r} both name the class "
                f"{name!r}; keep one of them"
            )
        mapping[name] = folder
    return mapping


def resolve_mri_root(root: Path) -> tuple[Path, Path, Path]:
    """Find the data folder and its training and test splits under ``root``.

    ``root`` may hold ``brain-tumor-mri/`` or the ``Training/`` and ``Testing/`` folders
    themselves. Returns ``(data_root, train_dir, test_dir)``.
    """
    root = Path(root).expanduser()
    for candidate in (root / DATA_FOLDER, root):
        train_dir = find_split(candidate, TRAIN_SPLITS)
        test_dir = find_split(candidate, TEST_SPLITS)
        if train_dir is not None and test_dir is not None:
            return candidate, train_dir, test_dir
    raise DataError(
        f"no brain MRI scans under {root}: expected {root / DATA_FOLDER}/Training/<class>/ and "
        f"Testing/<class>/ (or Training/ and Testing/ directly in {root}); point --data-dir or "
        "$BAYESHEAD_DATA at the folder that holds them"
    )


def _matched_classes(train_dir: Path, test_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """Return the canonical class names and, in the same order, the folder names of each split."""
    train_folders = class_folders(train_dir)
    test_folders = class_folders(test_dir)
    if set(train_folders) != set(test_folders):
        raise DataError(
            f"the class folders of {train_dir} ({', '.join(sorted(train_folders))}) and {test_dir} "
            f"({', '.join(sorted(test_folders))}) name different classes, after removing '_', '-' "
            "and spaces and lower-casing; rename the folders so both splits have the same classes"
        )
    classes = sorted(train_folders)
    return classes, [train_folders[c] for c in classes], [test_folders[c] for c in classes]


# --------------------------------------------------------------------------------------------
# Hashes


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def hash_scan(path: Path) -> tuple[str, str]:
    """Return the SHA-256 of the file bytes and the 64-bit perceptual hash of the image, as hex.

    The perceptual hash is ``imagehash.phash`` (ImageHash 4.3) of the image in grayscale. Each
    bit says whether one of the 8x8 lowest-frequency DCT coefficients of a 32x32 reduction is
    above their median, so the hash ignores size, format and small intensity changes.
    """
    import imagehash
    from PIL import Image, UnidentifiedImageError

    try:
        payload = Path(path).read_bytes()
        with Image.open(path) as image:
            perceptual = imagehash.phash(image.convert(IMAGE_MODE))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot decode image {path} ({error}): remove or replace the file and rerun") from error
    return hashlib.sha256(payload).hexdigest(), str(perceptual)


def _read_hash_cache(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # a damaged cache is rebuilt, never trusted
        logger.warning("ignoring unreadable hash cache %s: %s", path, error)
        return {}
    return stored if isinstance(stored, dict) else {}


def scan_hashes(paths: Sequence[Path], progress: bool = False) -> list[tuple[str, str]]:
    """Return ``(sha256, phash)`` hex strings for each file, computing only uncached ones.

    Entries are kept in ``$BAYESHEAD_CACHE/scan-hashes-v1.json`` under the file's resolved
    path, size and modification time, so an edited file is hashed again.
    """
    from tqdm.auto import tqdm

    cache_path = cache_dir() / HASH_CACHE_NAME
    cache = _read_hash_cache(cache_path)
    keys = [_file_key(Path(p)) for p in paths]
    missing = [i for i, key in enumerate(keys) if key not in cache]
    if missing:
        workers = min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            computed = list(tqdm(pool.map(lambda i: hash_scan(Path(paths[i])), missing), total=len(missing),
                                 desc="hashing scans", disable=not progress, leave=False))
        # Re-read before writing, so entries another process added meanwhile are kept.
        cache = {**_read_hash_cache(cache_path), **{keys[i]: list(h) for i, h in zip(missing, computed, strict=True)}}
        try:
            atomic_write_json(cache_path, cache)
        except OSError as error:
            logger.warning("could not write the hash cache %s: %s", cache_path, error)
    return [tuple(cache[key]) for key in keys]


def _phash_bits(hexes: Sequence[str]) -> np.ndarray:
    """Unpack 16-digit hex hashes into a ``(N, 64)`` uint8 array of bits."""
    values = np.array([int(h, 16) for h in hexes], dtype=np.uint64)
    return np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1)


def hamming_distances(test_hashes: Sequence[str], train_hashes: Sequence[str]) -> np.ndarray:
    """Return the ``(num_test, num_train)`` Hamming distances between 64-bit hex hashes."""
    test_bits = _phash_bits(test_hashes).astype(np.int32)
    train_bits = _phash_bits(train_hashes).astype(np.int32)
    # Bits that differ: a(1-b) + (1-a)b, summed over the 64 bits, as two matrix products.
    return test_bits @ (1 - train_bits).T + (1 - test_bits) @ train_bits.T


# --------------------------------------------------------------------------------------------
# Leakage check


def _distance_table(distances: np.ndarray, train_labels, test_labels) -> dict[str, dict[str, int]]:
    """Count test scans whose closest training scan of the same / another class is within t bits.

    Matches across classes show how often unrelated scans come this close by chance.
    """
    if distances.shape[0] == 0 or len(train_labels) == 0:
        return {str(t): {"same_class": 0, "other_class": 0} for t in DISTANCE_TABLE_THRESHOLDS}
    same = np.asarray(test_labels)[:, None] == np.asarray(train_labels)[None, :]
    closest_same = np.where(same, distances, 65).min(axis=1)
    closest_other = np.where(same, 65, distances).min(axis=1)
    return {
        str(t): {"same_class": int((closest_same <= t).sum()), "other_class": int((closest_other <= t).sum())}
        for t in DISTANCE_TABLE_THRESHOLDS
    }


def check_leakage(
    train_hashes: Sequence[tuple[str, str]],
    train_labels: Sequence[int],
    test_hashes: Sequence[tuple[str, str]],
    test_labels: Sequence[int],
    classes: Sequence[str],
    threshold: int = PHASH_THRESHOLD,
) -> dict:
    """Find test scans that are byte-identical or near-identical to a training scan.

    Parameters
    ----------
    train_hashes, test_hashes : sequence of (sha256, phash) hex pairs
        As returned by :func:`scan_hashes`.
    train_labels, test_labels : sequence of int
        Class indices into ``classes``.
    classes : sequence of str
    threshold : int
        Largest perceptual-hash Hamming distance that counts as near-identical.

    Returns
    -------
    dict
        ``byte_identical`` and ``near_identical`` (within ``threshold`` but not byte-identical)
        with ``total`` and ``per_class`` counts of test scans, and ``flagged``, their union.
        ``cross_class`` counts flagged scans whose closest training copy has another label.
        ``train_byte_duplicates`` counts training scans byte-identical to an earlier training
        scan, and ``distance_table`` is described in :func:`_distance_table`. The dict also
        has the sizes checked, the threshold, ``flagged_test_index`` (sorted test indices) and
        ``pairs`` (one entry per flagged test scan: test index, training index, distance).
    """
    if threshold < 0 or threshold > 64:
        raise ValueError(f"threshold must be a Hamming distance in [0, 64], got {threshold}")
    train_sha = [h[0] for h in train_hashes]
    first_index_of = {}
    for index, digest in enumerate(train_sha):
        first_index_of.setdefault(digest, index)
    train_duplicates = len(train_sha) - len(first_index_of)

    distances = np.full((len(test_hashes), max(len(train_hashes), 1)), 65, dtype=np.int64)
    if len(test_hashes) and len(train_hashes):
        distances = hamming_distances([h[1] for h in test_hashes], [h[1] for h in train_hashes])
    closest = distances.argmin(axis=1)
    closest_distance = distances[np.arange(len(test_hashes)), closest]

    exact, near, pairs, cross_class = [], [], [], 0
    for index, (digest, _) in enumerate(test_hashes):
        if digest in first_index_of:
            match, distance = first_index_of[digest], 0
            exact.append(index)
        elif closest_distance[index] <= threshold:
            match, distance = int(closest[index]), int(closest_distance[index])
            near.append(index)
        else:
            continue
        pairs.append({"test_index": index, "train_index": match, "distance": distance})
        cross_class += int(train_labels[match] != test_labels[index])

    def counts(indices):
        per_class = {name: 0 for name in classes}
        for index in indices:
            per_class[classes[test_labels[index]]] += 1
        return {"total": len(indices), "per_class": per_class}

    return {
        "hash": "sha256 of the file bytes; imagehash.phash (64 bits) of the grayscale image",
        "phash_threshold": int(threshold),
        "test_scans_checked": len(test_hashes),
        "train_scans_checked": len(train_hashes),
        "byte_identical": counts(exact),
        "near_identical": counts(near),
        "flagged": counts(sorted(exact + near)),
        "cross_class": cross_class,
        "train_byte_duplicates": train_duplicates,
        "distance_table": _distance_table(distances, train_labels, test_labels),
        "flagged_test_index": sorted(exact + near),
        "pairs": pairs,
    }


# --------------------------------------------------------------------------------------------
# The preset


def load_brain_mri(
    root: str | Path,
    subset: int | None = None,
    seed: int = 0,
    image_size: int = 96,
    progress: bool = False,
    *,
    drop_leaked: bool = False,
    phash_threshold: int = PHASH_THRESHOLD,
) -> tuple[ImageSet, ImageSet, list[str], dict]:
    """Load the brain-tumour MRI scans as one-channel ``uint8`` images with a leakage report.

    Parameters
    ----------
    root : path
        Folder holding ``brain-tumor-mri/``, or ``Training/`` and ``Testing/`` directly.
    subset : int or None
        Use a seeded random subset of at most this many training and test scans. The leakage
        check then compares the chosen test scans with the chosen training scans.
    seed : int
        Seed of the subset draw (``seed`` for training, ``seed + 1`` for test).
    image_size : int
        Side in pixels of the square the scans are resized to (bilinear).
    progress : bool
        Show progress bars while decoding and hashing.
    drop_leaked : bool
        Remove the test scans that the leakage check flags (byte-identical or within
        ``phash_threshold`` of a training scan).
    phash_threshold : int
        Largest perceptual-hash Hamming distance (of 64 bits) that counts as near-identical.

    Returns
    -------
    train, test : ImageSet
        Images of shape ``(N, 1, image_size, image_size)``, labels and file paths.
    classes : list of str
        Canonical class names (sorted), for example ``notumor`` for a ``no_tumor`` folder.
    info : dict
        ``source``, ``format``, ``mode``, ``image_size``, ``class_folders``, ``leakage`` (see
        :func:`check_leakage`, without the index lists), ``drop_leaked`` and ``dropped``.

    Raises
    ------
    DataError
        If the folders are missing, the two splits name different classes, or a scan cannot be
        decoded.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer number of pixels, got {image_size!r}")
    data_root, train_dir, test_dir = resolve_mri_root(Path(root))
    classes, train_folders, test_folders = _matched_classes(train_dir, test_dir)

    chosen = []
    for offset, (split_dir, folders) in enumerate(((train_dir, train_folders), (test_dir, test_folders))):
        paths, labels, _ = list_image_folder(split_dir, folders)
        keep = subset_indices(len(paths), subset, seed + offset)
        chosen.append(([paths[i] for i in keep], [labels[i] for i in keep]))
    (train_paths, train_labels), (test_paths, test_labels) = chosen

    leakage = check_leakage(scan_hashes(train_paths, progress), train_labels,
                            scan_hashes(test_paths, progress), test_labels, classes, phash_threshold)
    flagged = leakage.pop("flagged_test_index")
    pairs = leakage.pop("pairs")
    leakage["pairs"] = [
        {"test": str(test_paths[p["test_index"]]), "train": str(train_paths[p["train_index"]]),
         "distance": p["distance"]}
        for p in pairs
    ]
    logger.info("leakage check: %d test scans byte-identical and %d near-identical (phash distance <= %d) "
                "to a training scan", leakage["byte_identical"]["total"], leakage["near_identical"]["total"],
                phash_threshold)
    if drop_leaked and flagged:
        dropped = set(flagged)
        kept = [i for i in range(len(test_paths)) if i not in dropped]
        test_paths = [test_paths[i] for i in kept]
        test_labels = [test_labels[i] for i in kept]

    sets = []
    for paths, labels in ((train_paths, train_labels), (test_paths, test_labels)):
        images = load_images_cached(paths, IMAGE_MODE, image_size, progress)
        sets.append(ImageSet(images, torch.tensor(labels, dtype=torch.int64), [str(p) for p in paths]))

    info = {
        "source": str(data_root),
        "format": "images",
        "mode": IMAGE_MODE,
        "image_size": image_size,
        "class_folders": {
            "train": dict(zip(classes, train_folders, strict=True)),
            "test": dict(zip(classes, test_folders, strict=True)),
        },
        "leakage": leakage,
        "drop_leaked": bool(drop_leaked),
        "dropped": len(flagged) if drop_leaked else 0,
    }
    return sets[0], sets[1], classes, info
