r"""Exact per-example gradients with ``torch.func``.

For a batch of B examples, :func:`per_example_gradients` returns, for each
tracked parameter, a tensor of shape ``(B, *param.shape)``: the gradient of that
example's loss alone. ``vmap`` maps ``grad`` over the batch, and each example
runs through the model as a batch of one, so batch size, a partial last batch
and the reduction of the user's training loss cannot change the result.

The weights come from a checkpoint and reach the model through
``functional_call``; the model's own parameters are never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from tracin.losses import PerExampleLoss, check_per_example


class _LossModule(nn.Module):
    """Wraps model and loss so ``functional_call`` can swap in checkpoint weights for a loss call."""

    def __init__(self, model: nn.Module, loss: PerExampleLoss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        result = self.loss(self.model, batch)
        if isinstance(result, tuple):
            losses, outputs = result[0], result[1]
        else:
            losses, outputs = result, None
        return losses, outputs


@dataclass
class BatchGradients:
    """Per-example results for one batch at one checkpoint.

    Attributes:
        grads: Tracked parameter name to gradient of shape ``(B, *param.shape)``.
        losses: Loss of each example, shape ``(B,)``.
        outputs: Model outputs of shape ``(B, ...)``, or None when the loss does not return them.
        squared_norms: Squared gradient norm per tracked parameter, ``(B, n_tracked)``, when
            computed without forming ``grads``.
    """

    grads: dict[str, Tensor]
    losses: Tensor
    outputs: Tensor | None
    squared_norms: Tensor | None = None

    def parameter_squared_norms(self) -> Tensor:
        """Return the squared gradient norm per tracked parameter, shape ``(B, n_tracked)``."""
        if self.squared_norms is not None:
            return self.squared_norms
        return torch.stack([grad.flatten(1).pow(2).sum(dim=1) for grad in self.grads.values()], dim=1)


class GradientComputer:
    """Computes per-example gradients of a per-example loss with ``vmap``, for any model and parameters.

    Args:
        model: The model, in eval mode while gradients are computed.
        loss: Per-example loss ``(model, batch) -> (B,)`` or ``((B,), outputs)``.
        tracked: Names of the parameters to differentiate.
    """

    def __init__(self, model: nn.Module, loss: PerExampleLoss, tracked: list[str]):
        self.wrapper = _LossModule(model, loss)
        self.loss = loss
        self.tracked = list(tracked)
        self.projector = None
        self._checked = False

        def example_loss(tracked_weights: dict[str, Tensor], other_weights: dict[str, Tensor], example: Any):
            batch_of_one = tree_map(lambda value: value.unsqueeze(0), example)
            weights = {**other_weights, **tracked_weights}
            losses, outputs = functional_call(self.wrapper, weights, (batch_of_one,))
            output = outputs[0] if isinstance(outputs, Tensor) else torch.zeros(())
            return losses.reshape(()), (losses.reshape(()).detach(), output.detach())

        self._per_example = vmap(grad(example_loss, has_aux=True), in_dims=(None, None, 0))

    def prepare(self, weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Split checkpoint weights into tracked and other tensors, prefixed for the wrapper module."""
        tracked = {f"model.{name}": weights[name].detach() for name in self.tracked}
        others = {f"model.{name}": value.detach() for name, value in weights.items() if name not in self.tracked}
        return tracked, others

    def __call__(self, prepared: tuple[dict[str, Tensor], dict[str, Tensor]], batch: Any) -> BatchGradients:
        """Compute per-example gradients, losses and outputs of one batch."""
        tracked, others = prepared
        if not self._checked:
            self._check_loss(tracked, others, batch)
        grads, (losses, outputs) = self._per_example(tracked, others, batch)
        grads = {name[len("model."):]: value for name, value in grads.items()}
        if self.projector is not None:
            grads = {name: self.projector.project(name, value) for name, value in grads.items()}
        return BatchGradients(grads=grads, losses=losses, outputs=outputs if outputs.dim() > 1 else None)

    def start_checkpoint(self, position: int) -> None:
        """Select the projection matrices of checkpoint ``position``, when projecting."""
        if self.projector is not None:
            self.projector.start_checkpoint(position)

    def squared_norms(self, prepared: tuple[dict[str, Tensor], dict[str, Tensor]], batch: Any) -> BatchGradients:
        """Compute per-example gradients and return them with their squared norms per parameter."""
        result = self(prepared, batch)
        result.squared_norms = result.parameter_squared_norms()
        return result

    def _check_loss(self, tracked: dict[str, Tensor], others: dict[str, Tensor], batch: Any) -> None:
        """Call the loss once on the whole batch to check it returns one value per example."""
        with torch.no_grad():
            losses, _ = functional_call(self.wrapper, {**others, **tracked}, (batch,))
        check_per_example(losses, batch_size(batch), self.loss)
        self._checked = True


def batch_size(batch: Any) -> int:
    """Return the number of examples in a batch of tensors: the first dimension of its first tensor."""
    leaves = []
    tree_map(lambda value: leaves.append(value) if isinstance(value, Tensor) else None, batch)
    if not leaves:
        raise TypeError(f"batch of type {type(batch).__name__} contains no tensor.")
    return leaves[0].shape[0]


GRADIENT_METHODS = ("auto", "vmap")


def make_gradient_computer(model: nn.Module, loss: PerExampleLoss, tracked: list[str], method: str = "auto",
                           projector=None):
    """Return the gradient computer for ``method``.

    ``"auto"`` uses closed forms for Linear, Conv1d, Conv2d and BatchNorm layers and
    ``vmap`` for every other parameter; ``"vmap"`` uses ``vmap`` for all parameters.
    With a :class:`tracin.projection.Projector`, gradients come out projected.
    """
    if method == "vmap":
        computer = GradientComputer(model, loss, tracked)
        computer.projector = projector
        return computer
    if method == "auto":
        from tracin.layer_gradients import LayerGradientComputer

        return LayerGradientComputer(model, loss, tracked, projector)
    from tracin.errors import ConfigurationError

    raise ConfigurationError(f"gradient method {method!r} is invalid; choose one of {GRADIENT_METHODS}.")
