"""Retrain a recorded run from scratch, without some train examples, and evaluate the result.

A retraining rebuilds the LightningModule and datamodule from the run's manifest
(see :func:`tracin.rebuild.rebuild_run`). It wraps the dataset behind the
datamodule's ``train_dataloader()`` in a :class:`torch.utils.data.Subset` of every
train example except the removed ones. A fresh ``pl.Trainer`` then fits on it with
the Trainer settings that :class:`tracin.callbacks.TracInCheckpoint` recorded, and
with logging, checkpointing and validation off.

``pl.seed_everything(seed)`` runs before the model is built and again before
``fit``, and the subset loader shuffles with a generator seeded by the same seed,
so two retrainings with one seed differ only by the examples they leave out.
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import AcceleratorRegistry
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from tracin.data import labels_of, move_batch, ordered_loader
from tracin.errors import ConfigurationError
from tracin.losses import check_per_example, resolve_loss
from tracin.manifest import MANIFEST_NAME, Manifest
from tracin.rebuild import RebuiltRun, rebuild_run
from tracin.selection import check_indices

logger = logging.getLogger(__name__)

TRAINER_KEYS = (
    "max_epochs",
    "max_steps",
    "limit_train_batches",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "precision",
    "accelerator",
)
"""Settings passed from the manifest's ``trainer`` record to ``pl.Trainer``. Its other keys are only reported."""


@dataclass
class Retrained:
    """A model retrained without some train examples.

    Attributes:
        model: The LightningModule after ``fit``.
        loader: The loader it was trained on. ``loader.dataset`` is a ``Subset`` whose
            ``indices`` are the remaining train indices, in increasing order.
        removed: The removed train indices, sorted, shape ``(K,)``.
    """

    model: nn.Module
    loader: DataLoader
    removed: np.ndarray


def trainer_settings(
    manifest: Manifest | None,
    run_dir: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the ``pl.Trainer`` keyword arguments that a retraining of the run uses.

    Args:
        manifest: The run's manifest, or None when the run directory has none.
        run_dir: The run's checkpoint directory, for messages.
        overrides: Settings that replace the recorded ones, e.g. ``{"accelerator": "cpu"}``.

    Raises:
        ConfigurationError: the manifest records no Trainer settings and ``overrides``
            gives no ``max_epochs`` or ``max_steps``, a key is unknown, or the accelerator
            is not available on this machine.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(TRAINER_KEYS))
    if unknown:
        raise ConfigurationError(
            f"trainer settings {unknown} are not supported for retraining. Pass only {list(TRAINER_KEYS)}."
        )
    recorded = manifest.trainer if manifest is not None else None
    if recorded is None and "max_epochs" not in overrides and "max_steps" not in overrides:
        raise ConfigurationError(
            f"{Path(run_dir) / MANIFEST_NAME} records no Trainer settings, so tracin cannot retrain the run "
            "the way it was trained. Train again with this version of TracInCheckpoint, or pass the settings "
            "from Python, e.g. settings={'max_epochs': 10}."
        )
    recorded = dict(recorded or {})
    devices = int(recorded.get("num_devices", 1)) * int(recorded.get("num_nodes", 1))
    if devices > 1:
        logger.warning(
            "The run trained on %d devices, but retraining uses one, so each optimizer step sees %d times "
            "fewer examples than in the run. Compare the retrainings with each other, not with the run.",
            devices,
            devices,
        )
    settings = {key: recorded[key] for key in TRAINER_KEYS if key in recorded}
    settings.update(overrides)
    settings = {key: value for key, value in settings.items() if value is not None}
    _check_accelerator(settings.get("accelerator", "auto"), overridden="accelerator" in overrides)
    return settings


def _check_accelerator(name: str, overridden: bool = False) -> None:
    """Check that ``pl.Trainer`` accepts the accelerator and that this machine has it.

    ``gpu`` is Lightning's alias for whichever of ``cuda`` and ``mps`` is present.
    """
    source = "passed" if overridden else "recorded for the run"
    if name == "auto":
        return
    if name == "gpu":
        if not any(AcceleratorRegistry[alias]["accelerator"].is_available() for alias in ("cuda", "mps")):
            raise ConfigurationError(
                f"accelerator 'gpu' ({source}) needs CUDA or MPS, which this machine lacks. Retrain on the CPU "
                "with --accelerator cpu, or settings={'accelerator': 'cpu'} from Python."
            )
        return
    if not isinstance(name, str) or name not in AcceleratorRegistry:
        raise ConfigurationError(
            f"accelerator {name!r} ({source}) is not one that pl.Trainer accepts: gpu, auto or one of "
            f"{sorted(AcceleratorRegistry)}. Pass another accelerator, e.g. --accelerator cpu."
        )
    if not AcceleratorRegistry[name]["accelerator"].is_available():
        raise ConfigurationError(
            f"accelerator {name!r} ({source}) is not available here. Retrain on another one "
            "with --accelerator cpu, or settings={'accelerator': 'cpu'} from Python. All retrainings then use "
            "it, so they stay comparable with each other."
        )


def kept_indices(n_train: int, removed: Sequence[int] | np.ndarray) -> np.ndarray:
    """Return the train indices that remain after removing ``removed``, sorted, shape ``(n_train - K,)``.

    Raises:
        SelectionError: an index is out of range.
        ConfigurationError: an index is repeated, or nothing would remain.
    """
    removed = np.asarray(removed, dtype=np.int64).reshape(-1)
    if removed.size:
        check_indices(removed, n_train, what="train")
    if len(np.unique(removed)) != removed.size:
        raise ConfigurationError(f"removed train indices {removed.tolist()} contain duplicates. Pass each index once.")
    if removed.size >= n_train:
        raise ConfigurationError(
            f"removing {removed.size} of {n_train} train examples leaves none to train on. Remove fewer than {n_train}."
        )
    keep = np.ones(n_train, dtype=bool)
    keep[removed] = False
    return np.flatnonzero(keep)


def subset_loader(loader: DataLoader, indices: np.ndarray, seed: int) -> DataLoader:
    """Return a loader like ``loader`` over the examples of its dataset at ``indices``, reshuffled each epoch.

    The new loader keeps the batch size, collate function, workers, ``drop_last`` and
    ``pin_memory`` of ``loader``, and shuffles with a generator seeded by ``seed``.

    Raises:
        ConfigurationError: ``loader`` batches with a custom ``batch_sampler``, so it has no batch size.
    """
    if loader.batch_size is None:
        raise ConfigurationError(
            f"the datamodule's train_dataloader() uses the batch sampler {type(loader.batch_sampler).__name__} "
            "instead of a batch size, so tracin cannot rebuild it over a subset. Give the DataLoader a batch_size."
        )
    return DataLoader(
        Subset(loader.dataset, indices.tolist()),
        batch_size=loader.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        worker_init_fn=loader.worker_init_fn,
        drop_last=loader.drop_last,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.num_workers > 0 and loader.persistent_workers,
    )


def retrain(
    run_dir: str | os.PathLike,
    removed: Sequence[int] | np.ndarray,
    seed: int,
    *,
    config_text: str | None = None,
    settings: Mapping[str, Any] | None = None,
    callbacks: Sequence[pl.Callback] = (),
    enable_progress_bar: bool = True,
) -> Retrained:
    """Train the run's model from scratch without the ``removed`` train examples.

    Args:
        run_dir: The run's checkpoint directory, with the manifest.
        removed: Train indices to leave out, shape ``(K,)``. Pass an empty array for a baseline.
        seed: Seed of the model initialization, the shuffling and every other random draw.
        config_text: A LightningCLI config that overrides the manifest's classes, as a store records it.
        settings: ``pl.Trainer`` settings from :func:`trainer_settings`; None reads them from the manifest.
        callbacks: Extra callbacks for the Trainer.
        enable_progress_bar: Show Lightning's progress bar during ``fit``.

    Returns:
        The trained model, the loader it trained on, and the removed indices.

    Raises:
        ConfigurationError: the run cannot be rebuilt, has no datamodule, or ``removed`` is invalid.
        KeyboardInterrupt: the fit was interrupted, e.g. by Ctrl-C, which Lightning catches.
    """
    pl.seed_everything(seed, verbose=False)
    run = rebuild_run(run_dir, config_text=config_text)
    if settings is None:
        settings = trainer_settings(run.manifest, run_dir)
    loader = train_loader(run, run_dir)
    removed = np.sort(np.asarray(removed, dtype=np.int64).reshape(-1))
    loader = subset_loader(loader, kept_indices(len(loader.dataset), removed), seed)

    # NOTE: fitting on a loader instead of the datamodule skips datamodule hooks such as
    # on_before_batch_transfer. The demo datamodule defines none.
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        **settings,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=enable_progress_bar,
        callbacks=list(callbacks),
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        # Retraining skips validation on purpose, so Lightning's hint about a missing
        # val_dataloader does not apply.
        warnings.filterwarnings("ignore", message=r".*validation_step.* but have no .*val_dataloader")
        _fit_or_interrupt(trainer, run.model, loader, seed)
    return Retrained(model=run.model, loader=loader, removed=removed)


def _fit_or_interrupt(trainer: pl.Trainer, model: pl.LightningModule, loader: DataLoader, seed: int) -> None:
    """Run ``trainer.fit`` and raise KeyboardInterrupt if Ctrl-C stopped it.

    Lightning catches Ctrl-C inside ``fit``, ignores SIGINT from then on and calls
    ``sys.exit(1)`` (older versions return normally instead). Either way a half-trained
    model must not count as a retraining, so both become a KeyboardInterrupt, and the
    SIGINT handler from before the fit is restored.
    """
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(model, train_dataloaders=loader)
    except SystemExit:
        if not trainer.interrupted:
            raise
    if trainer.interrupted:
        signal.signal(signal.SIGINT, handler)
        raise KeyboardInterrupt(f"retraining with seed {seed} was interrupted")


def train_loader(run: RebuiltRun, run_dir: str | os.PathLike) -> DataLoader:
    """Return the datamodule's ``train_dataloader()`` after ``setup("fit")``.

    Raises:
        ConfigurationError: the run records no datamodule.
    """
    if run.datamodule is None:
        raise ConfigurationError(
            f"the run in {run_dir} records no datamodule, so tracin cannot rebuild its train loader for "
            "retraining. Train with trainer.fit(model, datamodule=...) so the manifest records one."
        )
    run.datamodule.setup("fit")
    return run.datamodule.train_dataloader()


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the loss and correctness of each example of ``dataset`` under ``model`` in eval mode.

    The loss is the one tracin traces with by default: ``model.per_example_loss`` when
    the model defines it, else cross-entropy.

    Args:
        model: The model to evaluate, on the device it is on.
        dataset: The split, in dataset order.
        indices: Dataset indices to evaluate, shape ``(n,)``, or None for every example.
        batch_size: Examples per forward pass.

    Returns:
        ``(losses, correct)``, each of shape ``(n,)``: float64 losses, and float64
        correctness (1.0 when the argmax of the outputs equals the label, 0.0 when
        not, NaN when the batch has no integer labels or the outputs are not 2-D logits).
    """
    if indices is None:
        indices = np.arange(len(dataset))
    indices = check_indices(indices, len(dataset))
    loader = ordered_loader(Subset(dataset, indices.tolist()), batch_size)
    loss = resolve_loss(None, model)
    parameter = next(model.parameters())
    losses: list[np.ndarray] = []
    correct: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                batch = move_batch(batch, parameter.device, parameter.dtype)
                result = loss(model, batch)
                batch_losses, outputs = result if isinstance(result, tuple) else (result, None)
                check_per_example(batch_losses, _batch_size(batch), loss)
                labels = labels_of(batch)
                losses.append(batch_losses.double().cpu().numpy())
                if labels is None or outputs is None or outputs.dim() != 2:
                    correct.append(np.full(len(batch_losses), np.nan))
                else:
                    correct.append((outputs.argmax(dim=1) == labels).double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(losses), np.concatenate(correct)


def _batch_size(batch: Any) -> int:
    """Return the length of the first tensor in a batch, the number of examples in it."""
    tensors = [leaf for leaf in torch.utils._pytree.tree_leaves(batch) if isinstance(leaf, torch.Tensor)]
    if not tensors:
        raise ConfigurationError(f"a test batch of type {type(batch).__name__} contains no tensor to evaluate.")
    return len(tensors[0])
