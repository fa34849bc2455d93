r"""Find flipped labels and unusual images on MNIST: TracInCP self-influence against other rankings.

Default command, SmallCNN. On 2 CPU cores shared with other jobs (torch 2.13 CPU build,
one torch thread) it took 8.3 minutes of wall time while the machine was quiet and 15.2
minutes while other jobs used it::

    python benchmarks/mislabel.py

The MLP with the same settings took 4.3 minutes on the same machine::

    python benchmarks/mislabel.py --model mlp --plot '' --workdir runs/mislabel_benchmark_mlp

A quick check of the whole pipeline took 30 seconds::

    python benchmarks/mislabel.py --seeds 1 --train-size 3000 --captum none --no-cleanlab \
        --no-mid-epoch --flip-fractions 0.1 --plot ''

Each run trains the demo SmallCNN (or the MLP) with a real ``pl.Trainer`` on the
first ``--train-size`` MNIST train images, with ``--flip-fractions`` of the labels
changed to another class. Training uses plain SGD with learning rate 0.1, halved every
2 epochs by StepLR, batch size 128 and 4 epochs. ``TracInCheckpoint(every_n_epochs=1)``
saves the 4 epoch-end checkpoints. A second ``TracInCheckpoint`` saves in the middle
of each epoch for the checkpoint-count variant (``--no-mid-epoch`` leaves it out). The seed (0, 1, 2, ...) drives the flipped
labels, the weight initialization and the shuffling.

Rankings, most suspicious first:

* TracInCP self-influence over the 4 epoch-end checkpoints (``tracin.trace_self_influence``);
* loss at the last checkpoint;
* area under the margin (AUM, Pleiss et al., "Identifying Mislabeled Data using the Area
  Under the Margin Ranking", NeurIPS 2020). The margin is the given label's logit minus
  the largest other logit. Here it is summed over the saved checkpoints in eval mode,
  not over every epoch's training pass as in the paper;
* last-layer TracInCP (``params=last_linear_parameters(model)``);
* Captum's ``TracInCP.self_influence`` with ``sample_wise_grads_per_batch=True`` on the same
  checkpoints and learning rates (``--captum first`` runs it for the first seed only);
* confident learning: cleanlab's ``find_label_issues`` on out-of-sample predicted
  probabilities from 3-fold cross-validation, each fold retrained like the main model.
  Flagged examples come first, ranked by self-confidence, then the rest by
  ``get_label_quality_scores``;
* a random order.

For each ranking it reports the curve of the fraction of flipped labels found against
the fraction of the train set checked, the area under that curve (0.5 for a random
order, ``1 - f / 2`` for a perfect one when a fraction ``f`` is flipped), and the recall
after checking 10% and 20%, as mean and standard deviation over seeds. It also scores
variants of self-influence (checkpoint subsets, per-checkpoint normalizations, rank
combinations), checks why self-influence trails the loss, and runs a separate setting
with ``--unusual-fraction`` out-of-distribution images (half inverted digits, half
uniform noise, random labels) added to the clean train set.

Results go to ``WORKDIR/report.md`` (markdown tables) and ``WORKDIR/results.json``, and
the recall curves of the first flip fraction to ``--plot``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from tracin import Checkpoint, discover_checkpoints, trace_self_influence
from tracin.callbacks import TracInCheckpoint
from tracin.demo import MLP, ImageArrayDataset, ImageClassificationDataModule, SmallCNN, load_mnist
from tracin.params import last_linear_parameters

logger = logging.getLogger("mislabel")

NUM_CLASSES = 10
BATCH_SIZE = 128
CURVE_POINTS = 201
CROSS_VALIDATION_FOLDS = 3


# ---------------------------------------------------------------------------------------------
# Data


class UnusualImagesDataModule(pl.LightningDataModule):
    """The first ``train_size`` MNIST train images with clean labels, plus unusual images with random labels.

    ``round(unusual_fraction * train_size)`` images are appended after the MNIST ones:
    the first half are MNIST train images from beyond ``train_size`` with inverted
    pixels (255 - value), the rest uniform noise in 0..255. Each gets a label drawn
    uniformly from the 10 classes. ``seed`` picks the inverted digits, the noise and
    the labels. The test split is the 10,000 MNIST test images. Pixels are normalized
    by the mean and standard deviation of the whole train split, unusual images included.
    """

    def __init__(self, train_size: int = 12_000, unusual_fraction: float = 0.01, seed: int = 0,
                 batch_size: int = BATCH_SIZE) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._train: ImageArrayDataset | None = None
        self._test: ImageArrayDataset | None = None
        self.unusual_indices = np.zeros(0, dtype=np.int64)
        self.unusual_kind = np.zeros(0, dtype="<U8")

    def setup(self, stage: str | None = None) -> None:
        """Build both splits on the first call. Later calls do nothing."""
        if self._train is not None:
            return
        train_size = self.hparams.train_size
        images, labels = load_mnist("train")
        rng = np.random.default_rng(self.hparams.seed)
        n_unusual = round(self.hparams.unusual_fraction * train_size)
        n_inverted = n_unusual // 2
        if train_size + n_inverted > len(labels):
            raise ValueError(f"train_size={train_size} leaves fewer than {n_inverted} MNIST images to invert.")
        donors = rng.choice(np.arange(train_size, len(labels)), size=n_inverted, replace=False)
        inverted = 255 - images[donors]
        noise = rng.integers(0, 256, size=(n_unusual - n_inverted, 28, 28), dtype=np.uint8)
        unusual_labels = rng.integers(0, NUM_CLASSES, size=n_unusual)

        train_images = np.concatenate([images[:train_size], inverted, noise])
        train_labels = np.concatenate([labels[:train_size], unusual_labels]).astype(np.int64)
        scaled = train_images.astype(np.float32) / 255.0
        mean, std = float(scaled.mean()), float(scaled.std())
        test_images, test_labels = load_mnist("test")
        self._train = ImageArrayDataset(train_images, train_labels, mean=mean, std=std)
        self._test = ImageArrayDataset(test_images, test_labels, mean=mean, std=std)
        self.unusual_indices = np.arange(train_size, train_size + n_unusual, dtype=np.int64)
        self.unusual_kind = np.array(["inverted"] * n_inverted + ["noise"] * (n_unusual - n_inverted))

    def trace_dataset(self, split: str = "train") -> ImageArrayDataset:
        """Return the train or test split in a fixed order, without augmentation."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        self.setup()
        return self._train if split == "train" else self._test

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.trace_dataset("train"), batch_size=self.hparams.batch_size, shuffle=True)


# ---------------------------------------------------------------------------------------------
# Training


def build_model(kind: str) -> pl.LightningModule:
    """Build the demo SmallCNN or MLP with the benchmark's optimizer settings."""
    settings = dict(lr=0.1, momentum=0.0, lr_step_size=2, lr_gamma=0.5)
    return SmallCNN(**settings) if kind == "cnn" else MLP(hidden=128, **settings)


def make_trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=callbacks,
    )


def train_run(kind: str, datamodule: pl.LightningDataModule, directory: Path, seed: int, epochs: int,
              mid_epoch: bool) -> tuple[pl.LightningModule, list[Checkpoint], list[Checkpoint]]:
    """Train one model; return it with its epoch-end checkpoints and its mid-epoch checkpoints.

    ``directory`` is emptied first, so checkpoints of an earlier run never mix in. The
    mid-epoch list is empty unless ``mid_epoch``. Its checkpoints come from a second
    ``TracInCheckpoint`` that saves every ``steps_per_epoch // 2`` steps. For each epoch
    the one closest to the middle of the epoch is kept, so an odd number of steps per
    epoch still gives one checkpoint per epoch.
    """
    shutil.rmtree(directory, ignore_errors=True)
    pl.seed_everything(seed, verbose=False)
    model = build_model(kind)
    datamodule.setup("fit")
    steps_per_epoch = len(datamodule.train_dataloader())
    callbacks = [TracInCheckpoint(dirpath=directory / "epochs", every_n_epochs=1)]
    if mid_epoch:
        callbacks.append(TracInCheckpoint(dirpath=directory / "mid_epochs",
                                          every_n_train_steps=max(1, steps_per_epoch // 2), save_on_train_end=False))
    make_trainer(epochs, callbacks).fit(model, datamodule)

    epoch_end = discover_checkpoints(directory / "epochs")
    mid = []
    if mid_epoch:
        candidates = discover_checkpoints(directory / "mid_epochs")
        epoch_starts = [0] + [checkpoint.step for checkpoint in epoch_end[:-1]]
        for start, checkpoint in zip(epoch_starts, epoch_end):
            middle = (start + checkpoint.step) / 2
            inside = [c for c in candidates if start < c.step < checkpoint.step]
            if inside:
                mid.append(min(inside, key=lambda candidate: abs(candidate.step - middle)))
    return model, epoch_end, mid


def accuracy_on(model: nn.Module, dataset: Dataset) -> float:
    """Return the fraction of ``dataset`` that ``model`` classifies correctly in eval mode."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=1000):
            correct += int((model(x).argmax(dim=1) == y).sum())
    return correct / len(dataset)


# ---------------------------------------------------------------------------------------------
# Scores other than tracin's store


def last_layer_inputs(model: nn.Module, checkpoints: list[Checkpoint], dataset: Dataset
                      ) -> tuple[np.ndarray, np.ndarray]:
    r"""Return ``‖h‖^2`` and ``‖p - e_y‖^2`` at each checkpoint, both of shape ``(N, C)``.

    ``h`` is the input of the model's last ``nn.Linear``, captured by a forward hook in
    eval mode, and ``p`` the softmax of the outputs. For cross-entropy the last layer's
    per-example gradient is :math:`(p - e_y) \otimes [h, 1]`, so its squared norm is
    :math:`\lVert p - e_y \rVert^2 (\lVert h \rVert^2 + 1)`.
    """
    copy_of_model = copy.deepcopy(model).eval()
    last_linear = [module for module in copy_of_model.modules() if isinstance(module, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    handle = last_linear.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    labels = torch.as_tensor(np.asarray(dataset.labels))
    feature_norm = np.zeros((len(dataset), len(checkpoints)))
    residual_norm = np.zeros((len(dataset), len(checkpoints)))
    try:
        for column, checkpoint in enumerate(checkpoints):
            state = torch.load(checkpoint.path, map_location="cpu", weights_only=True)["state_dict"]
            copy_of_model.load_state_dict(state)
            start = 0
            with torch.no_grad():
                for x, y in DataLoader(dataset, batch_size=1000):
                    captured.clear()
                    probabilities = F.softmax(copy_of_model(x).double(), dim=1)
                    features = captured[0].double().flatten(1)
                    stop = start + len(y)
                    feature_norm[start:stop, column] = (features**2).sum(dim=1).numpy()
                    residual = probabilities - F.one_hot(labels[start:stop], NUM_CLASSES).double()
                    residual_norm[start:stop, column] = (residual**2).sum(dim=1).numpy()
                    start = stop
    finally:
        handle.remove()
    return feature_norm, residual_norm


def input_norms(dataset: Dataset) -> np.ndarray:
    """Return the squared norm of each normalized input image, shape ``(N,)``."""
    return torch.cat([(x.double() ** 2).flatten(1).sum(dim=1) for x, _ in DataLoader(dataset, batch_size=1000)]).numpy()


def captum_self_influence(model: nn.Module, checkpoints: list[Checkpoint], dataset: Dataset) -> np.ndarray:
    """Return Captum's TracInCP self-influence on the same checkpoints and learning rates, shape ``(N,)``.

    Captum's sample-wise gradients cover ``nn.Linear`` and ``nn.Conv2d`` only (captum 0.9.0,
    ``captum/_utils/sample_gradient.py``); other parameters, such as BatchNorm's, are left out.
    """
    from captum.influence import TracInCP

    learning_rates = {str(c.path): float(c.lr[0]) for c in checkpoints}

    def load(target: nn.Module, path: str) -> float:
        target.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        target.eval()
        return learning_rates[path]

    tracer = TracInCP(copy.deepcopy(model), dataset, [str(c.path) for c in checkpoints], checkpoints_load_func=load,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=256, sample_wise_grads_per_batch=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
        return tracer.self_influence(show_progress=False).double().numpy()


def cross_validated_probabilities(kind: str, dataset: Dataset, seed: int, epochs: int) -> np.ndarray:
    """Return out-of-sample softmax probabilities ``(N, 10)`` from stratified 3-fold retraining."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(dataset.labels)
    probabilities = np.zeros((len(labels), NUM_CLASSES))
    folds = StratifiedKFold(CROSS_VALIDATION_FOLDS, shuffle=True, random_state=seed)
    for fold, (fit_rows, held_out) in enumerate(folds.split(np.zeros(len(labels)), labels)):
        pl.seed_everything(seed * 100 + fold, verbose=False)
        model = build_model(kind)
        loader = DataLoader(Subset(dataset, fit_rows), batch_size=BATCH_SIZE, shuffle=True)
        make_trainer(epochs, []).fit(model, train_dataloaders=loader)
        model.eval()
        with torch.no_grad():
            outputs = torch.cat([model(x) for x, _ in DataLoader(Subset(dataset, held_out), batch_size=1000)])
        probabilities[held_out] = F.softmax(outputs.double(), dim=1).numpy()
    return probabilities


def confident_learning_order(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return cleanlab's flagged label issues first, then the other rows by label quality, and the flags."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    flagged = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    rest = np.setdiff1d(np.argsort(quality, kind="stable"), flagged, assume_unique=True)
    rest = rest[np.argsort(quality[rest], kind="stable")]
    return np.concatenate([flagged, rest]).astype(np.int64), flagged


# ---------------------------------------------------------------------------------------------
# One run: train, trace and collect every score


@dataclass
class RunScores:
    """Every per-example score of one trained model; arrays of shape ``(N,)`` or ``(N, C)``."""

    labels: np.ndarray
    self_influence: np.ndarray        # (N, C) lr_c * ‖g_c‖^2, all parameters, epoch-end checkpoints
    last_layer: np.ndarray            # (N, C) the same for the last nn.Linear only
    loss: np.ndarray                  # (N, C)
    margin: np.ndarray                # (N, C)
    feature_norm: np.ndarray          # (N, C) ‖h‖^2 of the last nn.Linear's input
    residual_norm: np.ndarray         # (N, C) ‖p - e_y‖^2
    input_norm: np.ndarray            # (N,) ‖x‖^2 of the normalized input image
    prediction: np.ndarray            # (N,) argmax of the outputs at the last checkpoint
    learning_rates: np.ndarray        # (C,)
    mid_self_influence: np.ndarray | None = None   # (N, C_mid) at the mid-epoch checkpoints
    captum: np.ndarray | None = None
    confident_learning: np.ndarray | None = None   # an order, not a score
    flagged: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    test_accuracy: float = float("nan")


def score_run(kind: str, datamodule: pl.LightningDataModule, directory: Path, seed: int, options: argparse.Namespace,
              run_captum: bool) -> RunScores:
    """Train one model and compute every score that the rankings need."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model, checkpoints, mid = train_run(kind, datamodule, directory, seed, options.epochs, options.mid_epoch)
    train = datamodule.trace_dataset("train")
    accuracy = accuracy_on(model, datamodule.trace_dataset("test"))
    timings["train"] = time.perf_counter() - started

    started = time.perf_counter()
    full = trace_self_influence(model, checkpoints, train, directory / "self_influence.h5", overwrite=True,
                                batch_size=options.trace_batch_size).run.train
    timings["trace"] = time.perf_counter() - started

    started = time.perf_counter()
    last = trace_self_influence(model, checkpoints, train, directory / "last_layer.h5", overwrite=True,
                                batch_size=options.trace_batch_size, params=last_linear_parameters(model)).run.train
    timings["trace last layer"] = time.perf_counter() - started

    started = time.perf_counter()
    feature_norm, residual_norm = last_layer_inputs(model, checkpoints, train)
    timings["last-layer inputs"] = time.perf_counter() - started

    scores = RunScores(
        labels=full["label"], self_influence=full["checkpoint_self_influence"],
        last_layer=last["checkpoint_self_influence"], loss=full["loss"], margin=full["margin"],
        feature_norm=feature_norm, residual_norm=residual_norm, input_norm=input_norms(train),
        prediction=full["prediction"],
        learning_rates=np.array([c.lr[0] for c in checkpoints]), timings=timings, test_accuracy=accuracy,
    )
    if mid:
        started = time.perf_counter()
        scores.mid_self_influence = trace_self_influence(
            model, mid, train, directory / "mid_epoch.h5", overwrite=True, batch_size=options.trace_batch_size,
        ).run.train["checkpoint_self_influence"]
        timings["trace mid-epoch"] = time.perf_counter() - started
    if run_captum:
        started = time.perf_counter()
        scores.captum = captum_self_influence(model, checkpoints, train)
        timings["captum"] = time.perf_counter() - started
    if options.cleanlab:
        started = time.perf_counter()
        probabilities = cross_validated_probabilities(kind, train, seed, options.epochs)
        scores.confident_learning, scores.flagged = confident_learning_order(scores.labels, probabilities)
        timings["confident learning"] = time.perf_counter() - started
    return scores


# ---------------------------------------------------------------------------------------------
# Rankings


def descending(score: np.ndarray) -> np.ndarray:
    """Order rows by decreasing score; NaN counts as most suspicious."""
    return np.argsort(-np.nan_to_num(score, nan=np.inf), kind="stable")


def mean_rank(*orders: np.ndarray) -> np.ndarray:
    """Order rows by the mean of their positions in several orders."""
    positions = np.zeros(len(orders[0]))
    for order in orders:
        positions[order] += np.arange(len(order))
    return np.argsort(positions, kind="stable")


def main_rankings(scores: RunScores, seed: int) -> dict[str, np.ndarray]:
    """Row orders, most suspicious first, of the rankings the benchmark compares."""
    orders = {
        "TracInCP self-influence": descending(scores.self_influence.sum(axis=1)),
        "loss at last checkpoint": descending(scores.loss[:, -1]),
        "area under the margin": descending(-scores.margin.sum(axis=1)),
        "last-layer TracInCP": descending(scores.last_layer.sum(axis=1)),
    }
    if scores.captum is not None:
        orders["Captum TracInCP"] = descending(scores.captum)
    if scores.confident_learning is not None:
        orders["confident learning (cleanlab)"] = scores.confident_learning
    orders["random"] = np.random.default_rng(seed).permutation(len(scores.labels))
    return orders


def variant_rankings(scores: RunScores) -> dict[str, np.ndarray]:
    """Row orders of self-influence variants, with loss and AUM for reference."""
    columns = scores.self_influence
    n_columns = columns.shape[1]
    last_half = slice(n_columns // 2, n_columns)
    first_half = slice(0, max(1, n_columns // 2))

    # [h, 1] is the last layer's input with the bias's constant 1 appended.
    normalized = columns / (scores.feature_norm + 1.0)
    residual = scores.residual_norm * scores.learning_rates
    self_influence = descending(columns.sum(axis=1))
    area_under_margin = descending(-scores.margin.sum(axis=1))
    loss = descending(scores.loss[:, -1])

    orders = {
        "self-influence, all checkpoints (default)": self_influence,
        "self-influence, last checkpoint": descending(columns[:, -1]),
        "self-influence, last half of checkpoints": descending(columns[:, last_half].sum(axis=1)),
        "self-influence, first half of checkpoints": descending(columns[:, first_half].sum(axis=1)),
    }
    if scores.mid_self_influence is not None:
        total = columns.sum(axis=1) + scores.mid_self_influence.sum(axis=1)
        n_total = n_columns + scores.mid_self_influence.shape[1]
        orders[f"self-influence, {n_total} checkpoints (epoch ends and mid-epoch)"] = descending(total)

    orders.update({
        "self-influence, each checkpoint scaled to mean 1": descending((columns / columns.mean(axis=0)).sum(axis=1)),
        "self-influence / ‖[h,1]‖², all checkpoints": descending(normalized.sum(axis=1)),
        "self-influence / ‖[h,1]‖², last half": descending(normalized[:, last_half].sum(axis=1)),
        "self-influence / ‖[h,1]‖², last checkpoint": descending(normalized[:, -1]),
        "last-layer self-influence": descending(scores.last_layer.sum(axis=1)),
        "last-layer self-influence / ‖[h,1]‖² (= Σ lr ‖p - e_y‖²)": descending(residual.sum(axis=1)),
        "Σ lr ‖p - e_y‖², last half": descending(residual[:, last_half].sum(axis=1)),
        "mean rank of self-influence and AUM": mean_rank(self_influence, area_under_margin),
        "mean rank of self-influence / ‖[h,1]‖² and AUM": mean_rank(descending(normalized.sum(axis=1)),
                                                                      area_under_margin),
        "mean rank of self-influence and loss": mean_rank(self_influence, loss),
        "loss, summed over checkpoints": descending(scores.loss.sum(axis=1)),
        "loss at last checkpoint (reference)": loss,
        "area under the margin (reference)": area_under_margin,
    })
    return orders


# ---------------------------------------------------------------------------------------------
# Metrics


def recall_curve(order: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Return the fraction of ``positives`` among the first k rows of ``order`` for k = 0..N, shape ``(N + 1,)``."""
    hits = np.isin(order, positives)
    return np.concatenate([[0.0], np.cumsum(hits) / max(1, len(positives))])


def curve_metrics(order: np.ndarray, positives: np.ndarray) -> dict[str, float | list[float]]:
    curve = recall_curve(order, positives)
    n_rows = len(order)
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    return {
        "auc": float(np.trapezoid(curve, dx=1.0 / n_rows)),
        "recall@10%": float(curve[int(round(0.1 * n_rows))]),
        "recall@20%": float(curve[int(round(0.2 * n_rows))]),
        "curve": np.interp(grid, np.arange(n_rows + 1) / n_rows, curve).tolist(),
    }


def top_counts(order: np.ndarray, unusual: np.ndarray, kind: np.ndarray) -> dict[str, int]:
    """Count unusual images, by kind, in the top 1% and top 2% of an order."""
    counts = {}
    for percent in (1, 2):
        top = order[: int(round(percent / 100 * len(order)))]
        found = np.isin(unusual, top)
        counts[f"top {percent}%"] = int(found.sum())
        for name in ("inverted", "noise"):
            counts[f"top {percent}% {name}"] = int(found[kind == name].sum())
    return counts


def diagnostics(scores: RunScores, flipped: np.ndarray) -> dict[str, float]:
    """Measure how input and feature norms shape self-influence, on one run with flipped labels.

    ``h`` is the input of the last ``nn.Linear``, ``x`` the normalized image and ``p`` the
    softmax output, all at the last checkpoint unless a name says otherwise.
    """
    is_flipped = np.zeros(len(scores.labels), dtype=bool)
    is_flipped[flipped] = True
    clean = ~is_flipped
    feature = scores.feature_norm[:, -1]
    residual = scores.residual_norm[:, -1]
    loss = scores.loss[:, -1]
    total = scores.self_influence.sum(axis=1)
    last_layer = scores.last_layer.sum(axis=1)

    # The traced last-layer self-influence against lr * ‖p - e_y‖^2 * (‖h‖^2 + 1).
    closed_form = scores.learning_rates * scores.residual_norm * (scores.feature_norm + 1.0)
    relative_error = np.abs(closed_form - scores.last_layer) / np.maximum(scores.last_layer, 1e-30)

    top_rows = descending(total)[: int(round(0.1 * len(total)))]
    found = np.isin(flipped, top_rows)
    return {
        "spearman ‖h‖², self-influence (clean)": _spearman(feature, total, clean),
        "spearman ‖h‖², self-influence (flipped)": _spearman(feature, total, is_flipped),
        "spearman ‖p-e_y‖², self-influence (clean)": _spearman(residual, total, clean),
        "spearman ‖p-e_y‖², self-influence (flipped)": _spearman(residual, total, is_flipped),
        "spearman ‖h‖², loss (clean)": _spearman(feature, loss, clean),
        "spearman ‖x‖², self-influence (clean)": _spearman(scores.input_norm, total, clean),
        "median ‖p-e_y‖² at last checkpoint (flipped; at most 2)": float(np.median(residual[is_flipped])),
        "median ‖h‖² flipped / clean": float(np.median(feature[is_flipped]) / np.median(feature[clean])),
        "median ‖h‖² of flipped missed / found by self-influence top 10%": float(
            np.median(feature[flipped[~found]]) / np.median(feature[flipped[found]])),
        "‖h‖² 90th / 10th percentile (clean)": float(np.percentile(feature[clean], 90)
                                                      / np.percentile(feature[clean], 10)),
        "median last-layer share of self-influence": float(np.median(last_layer / total)),
        "max relative error of the (p-e_y)⊗[h,1] closed form": float(relative_error.max()),
        "recall@10% of ‖h‖² alone": curve_metrics(descending(feature), flipped)["recall@10%"],
    }


def _spearman(first: np.ndarray, second: np.ndarray, rows: np.ndarray) -> float:
    return float(spearmanr(first[rows], second[rows]).statistic)


# ---------------------------------------------------------------------------------------------
# Settings


def flip_setting(options: argparse.Namespace, fraction: float, seed: int) -> dict:
    datamodule = ImageClassificationDataModule(dataset="mnist", flip_fraction=fraction, seed=seed,
                                               batch_size=BATCH_SIZE, train_size=options.train_size)
    directory = options.workdir / options.model / f"flip{fraction:g}_seed{seed}"
    run_captum = options.captum == "all" or (options.captum == "first" and seed == 0)
    scores = score_run(options.model, datamodule, directory, seed, options, run_captum)
    flipped = datamodule.flipped_indices
    result = {
        "setting": f"flip {fraction:g}", "seed": seed, "timings": scores.timings,
        "test_accuracy": scores.test_accuracy,
        "rankings": {name: curve_metrics(order, flipped) for name, order in main_rankings(scores, seed).items()},
        "variants": {name: curve_metrics(order, flipped) for name, order in variant_rankings(scores).items()},
        "diagnostics": diagnostics(scores, flipped),
    }
    for entry in list(result["variants"].values()):
        entry.pop("curve")
    if scores.captum is not None:
        result["captum_spearman"] = float(spearmanr(scores.captum, scores.self_influence.sum(axis=1)).statistic)
    if scores.flagged is not None:
        hits = np.isin(scores.flagged, flipped).sum()
        result["cleanlab_flagged"] = {"flagged": len(scores.flagged), "precision": hits / max(1, len(scores.flagged)),
                                      "recall": hits / len(flipped)}
    return result


def group_medians(scores: RunScores, unusual: np.ndarray, kind: np.ndarray) -> dict[str, dict[str, float]]:
    """Median scores of the MNIST images, the misclassified ones among them, and each kind of unusual image."""
    mnist = np.setdiff1d(np.arange(len(scores.labels)), unusual)
    groups = {
        "MNIST images": mnist,
        "MNIST images misclassified at the last checkpoint": mnist[scores.prediction[mnist] != scores.labels[mnist]],
        "inverted digits": unusual[kind == "inverted"],
        "uniform noise": unusual[kind == "noise"],
    }
    values = {
        "count": lambda rows: float(len(rows)),
        "self-influence": lambda rows: float(np.median(scores.self_influence[rows].sum(axis=1))),
        "loss at last checkpoint": lambda rows: float(np.median(scores.loss[rows, -1])),
        "‖p - e_y‖² at last checkpoint": lambda rows: float(np.median(scores.residual_norm[rows, -1])),
        "‖h‖² at last checkpoint": lambda rows: float(np.median(scores.feature_norm[rows, -1])),
        "‖x‖²": lambda rows: float(np.median(scores.input_norm[rows])),
    }
    return {group: {name: value(rows) for name, value in values.items()} for group, rows in groups.items()}


def unusual_setting(options: argparse.Namespace, seed: int) -> dict:
    datamodule = UnusualImagesDataModule(train_size=options.train_size, unusual_fraction=options.unusual_fraction,
                                         seed=seed)
    datamodule.setup()
    directory = options.workdir / options.model / f"unusual_seed{seed}"
    run_captum = options.captum == "all" or (options.captum == "first" and seed == 0)
    scores = score_run(options.model, datamodule, directory, seed, options, run_captum)
    unusual, kind = datamodule.unusual_indices, datamodule.unusual_kind
    result = {
        "setting": "unusual", "seed": seed, "timings": scores.timings, "test_accuracy": scores.test_accuracy,
        "n_unusual": len(unusual), "n_train": len(scores.labels),
        "counts": {name: top_counts(order, unusual, kind) for name, order in main_rankings(scores, seed).items()},
        "variant_counts": {name: top_counts(order, unusual, kind) for name, order in variant_rankings(scores).items()},
        "medians": group_medians(scores, unusual, kind),
    }
    if scores.captum is not None:
        result["captum_spearman"] = float(spearmanr(scores.captum, scores.self_influence.sum(axis=1)).statistic)
    return result


# ---------------------------------------------------------------------------------------------
# Report


def mean_std(values: list[float], digits: int = 3, style: str = "f") -> str:
    """Format the mean and sample standard deviation of ``values``, or the single value."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.{digits}{style}}"
    return f"{values.mean():.{digits}{style}} ± {values.std(ddof=1):.{digits}{style}}"


def ranking_table(results: list[dict], key: str) -> list[str]:
    names = list(dict.fromkeys(name for result in results for name in result[key]))
    lines = ["| ranking | seeds | AUC | recall@10% | recall@20% |", "| --- | --- | --- | --- | --- |"]
    for name in names:
        runs = [result[key][name] for result in results if name in result[key]]
        cells = [mean_std([run[metric] for run in runs]) for metric in ("auc", "recall@10%", "recall@20%")]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def variant_table(results: list[dict]) -> list[str]:
    """Variants over all runs with flipped labels, with the count of runs each one wins."""
    default = "self-influence, all checkpoints (default)"
    lines = ["| variant | " + " | ".join(f"recall@10%, {fraction}" for fraction in _fractions(results))
             + " | beats default (recall@10%) | beats default (AUC) | beats loss and AUM (recall@10%) |",
             "| --- |" + " --- |" * (len(_fractions(results)) + 3)]
    for name in results[0]["variants"]:
        cells = []
        for fraction in _fractions(results):
            runs = [r["variants"][name]["recall@10%"] for r in results if r["setting"] == fraction]
            cells.append(mean_std(runs))
        wins_default = sum(r["variants"][name]["recall@10%"] > r["variants"][default]["recall@10%"] for r in results)
        wins_auc = sum(r["variants"][name]["auc"] > r["variants"][default]["auc"] for r in results)
        wins_baselines = sum(
            r["variants"][name]["recall@10%"] > max(r["variants"]["loss at last checkpoint (reference)"]["recall@10%"],
                                                    r["variants"]["area under the margin (reference)"]["recall@10%"])
            for r in results)
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {wins_default}/{len(results)} | {wins_auc}/{len(results)} | {wins_baselines}/{len(results)} |")
    return lines


def _fractions(results: list[dict]) -> list[str]:
    return list(dict.fromkeys(result["setting"] for result in results))


def diagnostics_table(results: list[dict]) -> list[str]:
    lines = ["| quantity | " + " | ".join(_fractions(results)) + " |", "| --- |" + " --- |" * len(_fractions(results))]
    for name in results[0]["diagnostics"]:
        cells = [mean_std([r["diagnostics"][name] for r in results if r["setting"] == fraction], 3, "g")
                 for fraction in _fractions(results)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def unusual_table(results: list[dict], key: str) -> list[str]:
    """Unusual images in the top 1% and 2% of each ranking, and the seeds where it beats self-influence."""
    lines = ["| ranking | seeds | in top 1% | inverted | noise | in top 2% | inverted | noise "
             "| beats self-influence (top 1%) |", "| --- |" + " --- |" * 8]
    names = list(dict.fromkeys(name for result in results for name in result[key]))
    columns = ("top 1%", "top 1% inverted", "top 1% noise", "top 2%", "top 2% inverted", "top 2% noise")
    for name in names:
        runs = [r for r in results if name in r[key]]
        cells = [mean_std([r[key][name][column] for r in runs], digits=1) for column in columns]
        wins = sum(r[key][name]["top 1%"] > r["counts"]["TracInCP self-influence"]["top 1%"] for r in runs)
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {wins}/{len(runs)} |")
    return lines


def medians_table(results: list[dict]) -> list[str]:
    groups = list(results[0]["medians"])
    quantities = list(results[0]["medians"][groups[0]])
    lines = ["| group | " + " | ".join(quantities) + " |", "| --- |" + " --- |" * len(quantities)]
    for group in groups:
        cells = [mean_std([r["medians"][group][quantity] for r in results], *((0, "f") if quantity == "count" else (3, "g")))
                 for quantity in quantities]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return lines


def timing_lines(results: list[dict]) -> list[str]:
    phases = list(dict.fromkeys(phase for result in results for phase in result["timings"]))
    lines = ["| phase | runs | mean seconds per run |", "| --- | --- | --- |"]
    for phase in phases:
        values = [r["timings"][phase] for r in results if phase in r["timings"]]
        lines.append(f"| {phase} | {len(values)} | {np.mean(values):.0f} |")
    return lines


def write_report(options: argparse.Namespace, flip_results: list[dict], unusual_results: list[dict],
                 wall_time: float) -> str:
    lines = [f"Model: {options.model}; train size {options.train_size}; {options.epochs} epochs; "
             f"wall time {wall_time / 60:.1f} minutes.", ""]
    for fraction in _fractions(flip_results):
        runs = [r for r in flip_results if r["setting"] == fraction]
        accuracy = mean_std([r["test_accuracy"] for r in runs])
        lines += [f"### {fraction}: flipped labels found (test accuracy {accuracy})", "", *ranking_table(runs, "rankings"), ""]
        cleanlab = [r["cleanlab_flagged"] for r in runs if "cleanlab_flagged" in r]
        if cleanlab:
            lines += [f"cleanlab flagged {mean_std([c['flagged'] for c in cleanlab], 0)} examples, precision "
                      f"{mean_std([c['precision'] for c in cleanlab])}, recall {mean_std([c['recall'] for c in cleanlab])}.", ""]
        captum = [r["captum_spearman"] for r in runs if "captum_spearman" in r]
        if captum:
            lines += [f"Spearman correlation of Captum's and tracin's self-influence: {mean_std(captum, 6)}.", ""]
    if flip_results:
        lines += ["### Variants: recall@10% and wins over all runs with flipped labels", "", *variant_table(flip_results), ""]
        lines += ["### Variants: all metrics", ""]
        for fraction in _fractions(flip_results):
            runs = [r for r in flip_results if r["setting"] == fraction]
            lines += [f"#### {fraction}", "", *ranking_table(runs, "variants"), ""]
        lines += ["### Why self-influence trails the loss", "", *diagnostics_table(flip_results), ""]
    if unusual_results:
        accuracy = mean_std([r["test_accuracy"] for r in unusual_results])
        first = unusual_results[0]
        lines += [f"### Unusual images (test accuracy {accuracy})", "",
                  f"{first['n_unusual']} unusual images among {first['n_train']} train images; top 1% = "
                  f"{round(0.01 * first['n_train'])} rows, top 2% = {round(0.02 * first['n_train'])} rows.", "",
                  *unusual_table(unusual_results, "counts"), "", "Variants:", "",
                  *unusual_table(unusual_results, "variant_counts"), ""]
        lines += ["Medians by group:", "", *medians_table(unusual_results), ""]
        captum = [r["captum_spearman"] for r in unusual_results if "captum_spearman" in r]
        if captum:
            lines += [f"Spearman correlation of Captum's and tracin's self-influence: {mean_std(captum, 6)}.", ""]
    lines += ["### Wall time per phase", "", *timing_lines(flip_results + unusual_results), ""]
    return "\n".join(lines)


def plot_curves(results: list[dict], path: Path, title: str) -> None:
    """Draw the seed-averaged recall curve of each ranking, over the whole train set and its first 30%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    flipped_fraction = float(results[0]["setting"].removeprefix("flip "))
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    names = list(dict.fromkeys(name for result in results for name in result["rankings"]))
    for axis, limit in zip(axes, (1.0, 0.3)):
        axis.plot(grid, np.minimum(1.0, grid / flipped_fraction), "--", color="0.6", label="perfect ranking")
        for name in names:
            curves = np.array([r["rankings"][name]["curve"] for r in results if name in r["rankings"]])
            label = name if len(curves) == len(results) else f"{name} ({len(curves)} seed)"
            style = ":" if name in ("Captum TracInCP", "random") else "-"
            axis.plot(grid, curves.mean(axis=0), style, label=label)
        axis.set_xlim(0, limit)
        axis.set_ylim(0, 1.01)
        axis.set_xlabel("fraction of train set checked, most suspicious first")
        axis.set_ylabel("fraction of flipped labels found")
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].set_title("zoom on the first 30%")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_first_setting(flip_results: list[dict], path: Path, model: str, train_size: int) -> None:
    """Plot the recall curves of the first flip fraction of ``flip_results``."""
    first = _fractions(flip_results)[0]
    runs = [r for r in flip_results if r["setting"] == first]
    flipped_fraction = float(first.removeprefix("flip "))
    plot_curves(runs, path, f"MNIST, first {train_size} train images, {flipped_fraction:.0%} of labels flipped "
                            f"({model}, {'mean of ' + str(len(runs)) + ' seeds' if len(runs) > 1 else 'one seed'})")


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn", help="demo SmallCNN (default) or MLP")
    parser.add_argument("--train-size", type=int, default=12_000, help="first N MNIST train images (default 12000)")
    parser.add_argument("--flip-fractions", type=float, nargs="*", default=[0.1, 0.2],
                        help="fractions of labels to flip, one setting each (default 0.1 0.2)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per setting (default 3)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs, one checkpoint each (default 4)")
    parser.add_argument("--unusual-fraction", type=float, default=0.01,
                        help="unusual images added in the separate setting, as a fraction of the train size; "
                             "0 skips that setting (default 0.01)")
    parser.add_argument("--captum", choices=("first", "all", "none"), default="first",
                        help="run Captum's TracInCP for the first seed of each setting, every seed, or none "
                             "(default first)")
    parser.add_argument("--cleanlab", action=argparse.BooleanOptionalAction, default=True,
                        help="confident learning with 3-fold cross-validation retraining (default on)")
    parser.add_argument("--mid-epoch", action=argparse.BooleanOptionalAction, default=True,
                        help="also trace checkpoints saved in the middle of each epoch (default on)")
    parser.add_argument("--trace-batch-size", type=int, default=256, help="batch size of tracing (default 256)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on 2 cores shared with other jobs, a training step "
                             "with 2 threads took 11 times as long as with 1)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/mislabel_benchmark"),
                        help="checkpoints, stores, report.md and results.json (default runs/mislabel_benchmark)")
    parser.add_argument("--plot", default="docs/mislabel_recall.png",
                        help="PNG of the recall curves of the first flip fraction; '' for none "
                             "(default docs/mislabel_recall.png)")
    parser.add_argument("--replot", type=Path, metavar="RESULTS_JSON",
                        help="only redraw --plot from the results.json of an earlier run, without training")
    return parser.parse_args(argv)


def quiet_libraries() -> None:
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("tracin").setLevel(logging.WARNING)
    # The datamodule defined here lives in __main__, so the manifest cannot rebuild it. The
    # benchmark traces through the Python API and never rebuilds from the manifest.
    warnings.filterwarnings("ignore", message=".*cannot be imported by path.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")


def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(argv)
    if options.replot is not None:
        saved = json.loads(options.replot.read_text())
        plot_first_setting(saved["flip"], Path(options.plot), saved["options"]["model"],
                           int(saved["options"]["train_size"]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    torch.set_num_threads(options.threads)
    options.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    flip_results = []
    for fraction in options.flip_fractions:
        for seed in range(options.seeds):
            flip_results.append(flip_setting(options, fraction, seed))
            ranking = flip_results[-1]["rankings"]
            logger.info("flip %g seed %d: recall@10%% self-influence %.3f, loss %.3f (%.0f s so far)", fraction, seed,
                        ranking["TracInCP self-influence"]["recall@10%"],
                        ranking["loss at last checkpoint"]["recall@10%"], time.perf_counter() - started)
    unusual_results = []
    if options.unusual_fraction > 0:
        for seed in range(options.seeds):
            unusual_results.append(unusual_setting(options, seed))
            logger.info("unusual seed %d done (%.0f s so far)", seed, time.perf_counter() - started)

    wall_time = time.perf_counter() - started
    report = write_report(options, flip_results, unusual_results, wall_time)
    (options.workdir / "report.md").write_text(report + "\n")
    (options.workdir / "results.json").write_text(json.dumps(
        {"options": {key: str(value) for key, value in vars(options).items()},
         "wall_time_s": wall_time, "flip": flip_results, "unusual": unusual_results}, indent=1))
    if options.plot and flip_results:
        plot_first_setting(flip_results, Path(options.plot), options.model, options.train_size)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
