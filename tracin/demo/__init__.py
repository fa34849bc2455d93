"""Demo data and models: MNIST or 8x8 digits with flipped labels, and small classifiers to train on them."""

from tracin.demo.data import ImageArrayDataset, flip_labels, load_digits_arrays, load_mnist
from tracin.demo.datamodule import ImageClassificationDataModule
from tracin.demo.models import MLP, SmallCNN

__all__ = [
    "MLP",
    "ImageArrayDataset",
    "ImageClassificationDataModule",
    "SmallCNN",
    "flip_labels",
    "load_digits_arrays",
    "load_mnist",
]
