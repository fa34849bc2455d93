"""Per-example losses: the quantity whose gradient TracInCP takes.

A loss here is a callable ``loss(model, batch) -> Tensor`` of shape ``(B,)``,
or a pair ``(losses (B,), outputs (B, ...))`` when it also returns the model
outputs. The tracer calls it on one example at a time inside ``torch.func.vmap``,
so ``batch`` then contains a batch of size 1.

Scores do not depend on how the user's training loss was reduced: a
``torch.nn`` loss module with ``reduction="mean"`` or ``"sum"`` is converted to
``reduction="none"`` before use.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tracin.errors import LossError

PerExampleLoss = Callable[[nn.Module, Any], "Tensor | tuple[Tensor, Tensor]"]


class CrossEntropyLoss:
    """Cross-entropy of ``model(inputs)`` against integer ``targets`` for ``(inputs, targets)`` batches."""

    name = "cross_entropy"

    def __call__(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, targets = split_batch(batch)
        logits = model(inputs)
        return F.cross_entropy(logits, targets, reduction="none"), logits


class ModuleLoss:
    """A ``torch.nn`` loss module applied to ``model(inputs)`` and ``targets``, one value per example."""

    def __init__(self, loss_module: nn.Module):
        self.loss_module = copy.copy(loss_module)
        self.loss_module.reduction = "none"
        self.name = type(loss_module).__name__

    def __call__(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, targets = split_batch(batch)
        outputs = model(inputs)
        losses = self.loss_module(outputs, targets)
        if losses.dim() > 1:
            # Regression losses return one value per output element; an example's loss is their sum.
            losses = losses.flatten(1).sum(dim=1)
        return losses, outputs


class MethodLoss:
    """Calls ``model.per_example_loss(batch)``, the hook a LightningModule defines for custom losses."""

    name = "per_example_loss"

    def __call__(self, model: nn.Module, batch: Any) -> Tensor | tuple[Tensor, Tensor]:
        return model.per_example_loss(batch)


def split_batch(batch: Any) -> tuple[Any, Tensor]:
    """Split an ``(inputs, targets)`` batch, or raise LossError naming the batch type."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        raise LossError(
            f"the default loss expects (inputs, targets) batches, got a dict with keys {sorted(batch)}. "
            "Pass loss=... (a callable (model, batch) -> per-example losses of shape (B,)) or define "
            "per_example_loss(self, batch) on your LightningModule."
        )
    raise LossError(
        f"the default loss expects (inputs, targets) batches, got {type(batch).__name__}. "
        "Pass loss=... (a callable (model, batch) -> per-example losses of shape (B,))."
    )


def resolve_loss(loss: PerExampleLoss | nn.Module | None, model: nn.Module) -> PerExampleLoss:
    """Return the per-example loss to trace with.

    Args:
        loss: None for the default (``model.per_example_loss`` when the model defines it,
            else cross-entropy), a ``torch.nn`` loss module of any reduction, or a
            callable ``(model, batch) -> losses (B,)``.
        model: The traced model.

    Raises:
        LossError: ``loss`` is a loss module without a ``reduction`` attribute, or not callable.
    """
    if loss is None:
        if callable(getattr(model, "per_example_loss", None)):
            return MethodLoss()
        return CrossEntropyLoss()
    if isinstance(loss, nn.Module):
        if not hasattr(loss, "reduction"):
            raise LossError(
                f"loss module {type(loss).__name__} has no 'reduction' attribute, so tracin cannot get one "
                "value per example from it. Pass a callable (model, batch) -> per-example losses of "
                "shape (B,), or a torch.nn loss such as nn.CrossEntropyLoss()."
            )
        return ModuleLoss(loss)
    if not callable(loss):
        raise LossError(f"loss must be callable, got {type(loss).__name__} {loss!r}.")
    return loss


def loss_name(loss: PerExampleLoss) -> str:
    """Return a readable name of the loss for the store's attributes."""
    return getattr(loss, "name", None) or getattr(loss, "__qualname__", None) or type(loss).__name__


def check_per_example(losses: Any, batch_size: int, loss: PerExampleLoss) -> None:
    """Raise LossError unless ``losses`` has shape ``(batch_size,)``."""
    if not isinstance(losses, torch.Tensor):
        raise LossError(
            f"loss {loss_name(loss)} returned {type(losses).__name__}; it must return a tensor of "
            f"per-example losses of shape ({batch_size},), optionally paired with the model outputs."
        )
    if losses.shape != (batch_size,):
        hint = (
            " It looks reduced to one value: use reduction='none' or return the per-example losses."
            if losses.dim() == 0
            else ""
        )
        raise LossError(
            f"loss {loss_name(loss)} returned shape {tuple(losses.shape)} for a batch of {batch_size} "
            f"examples; expected ({batch_size},), one loss per example.{hint}"
        )
