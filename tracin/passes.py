"""Checkpoint passes: load each checkpoint once and yield per-example gradients batch by batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tracin.checkpoints import Checkpoint, load_weights
from tracin.data import move_batch
from tracin.gradients import BatchGradients, batch_size
from tracin.errors import ConfigurationError
from tracin.params import preserved_model_state

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called with (examples done, examples in total) over all checkpoint passes."""

WEIGHT_CACHE_BYTES = 1 << 30
"""Largest size of all checkpoints' weights together for which self-influence runs batch-outer (1 GiB)."""


@dataclass
class BatchResult:
    """Per-example gradients of one batch at one checkpoint, with where the batch sits."""

    checkpoint: int
    batch: int
    start: int
    inputs: Any
    gradients: BatchGradients


@contextmanager
def tracing_mode(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the model in eval mode on ``device`` without autograd graphs, restoring everything after."""
    original = next((tensor.device for tensor in list(model.parameters()) + list(model.buffers())), torch.device("cpu"))
    with preserved_model_state(model), torch.no_grad():
        model.to(device)
        try:
            yield
        finally:
            model.to(original)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device``, defaulting to CUDA when available, else CPU.

    Raises:
        ConfigurationError: ``device`` is not a torch device string, or names CUDA without a CUDA build and GPU.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigurationError(f"device {device!r} is invalid ({error}); pass e.g. cpu, cuda or cuda:0.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"device {device!r} needs CUDA, which this torch build or machine lacks; pass cpu.")
    return resolved


def gradient_passes(
    model: nn.Module,
    checkpoints: list[Checkpoint],
    loader: DataLoader,
    computer: Any,
    device: torch.device,
    dtype: torch.dtype,
    is_done: Callable[[int, int], bool] | None = None,
    progress: ProgressCallback | None = None,
    squared_norms: bool = False,
) -> Iterator[BatchResult]:
    """Yield per-example gradients for every (checkpoint, batch) block not yet done.

    Checkpoints are the outer loop, so each is loaded once. Call inside :func:`tracing_mode`.
    With ``squared_norms=True`` the results carry squared norms per parameter and may
    leave ``grads`` empty. Then, when the weights of all checkpoints together take at most
    :data:`WEIGHT_CACHE_BYTES`, batches are the outer loop instead, so each batch is loaded
    once for all checkpoints (see :func:`batch_outer_passes`).
    """
    if squared_norms and _weights_bytes(model, dtype) * len(checkpoints) <= WEIGHT_CACHE_BYTES:
        yield from batch_outer_passes(model, checkpoints, loader, computer, device, dtype, is_done, progress)
        return
    n_examples = len(loader.dataset)
    total = n_examples * len(checkpoints)
    done_examples = 0
    for position, checkpoint in enumerate(checkpoints):
        if is_done is not None and all(is_done(position, batch) for batch in range(len(loader))):
            done_examples += n_examples
            if progress is not None:
                progress(done_examples, total)
            continue
        weights = load_weights(model, checkpoint)
        computer.start_checkpoint(position)
        prepared = computer.prepare({name: _cast(value, device, dtype) for name, value in weights.items()})
        start = 0
        for batch_position, batch in enumerate(loader):
            size = batch_size(batch)
            if is_done is None or not is_done(position, batch_position):
                batch = move_batch(batch, device, dtype)
                compute = computer.squared_norms if squared_norms else computer
                yield BatchResult(position, batch_position, start, batch, compute(prepared, batch))
            start += size
            done_examples += size
            if progress is not None:
                progress(done_examples, total)
        logger.debug("checkpoint %d/%d done: %s", position + 1, len(checkpoints), checkpoint.path)


def batch_outer_passes(
    model: nn.Module,
    checkpoints: list[Checkpoint],
    loader: DataLoader,
    computer: Any,
    device: torch.device,
    dtype: torch.dtype,
    is_done: Callable[[int, int], bool] | None = None,
    progress: ProgressCallback | None = None,
) -> Iterator[BatchResult]:
    """Yield squared gradient norms block by block, with every checkpoint's weights held in memory.

    Each batch is loaded and moved to the device once and then run at every checkpoint
    whose block is not done. With a data loader that costs as much as the model, as with
    small image models on a CPU, this saves most of the loading time of the checkpoint-outer
    order. The blocks and their values are the same in both orders.
    """
    prepared = {}
    for position, checkpoint in enumerate(checkpoints):
        if is_done is not None and all(is_done(position, batch) for batch in range(len(loader))):
            continue
        weights = load_weights(model, checkpoint)
        prepared[position] = computer.prepare({name: _cast(value, device, dtype) for name, value in weights.items()})
    total = len(loader.dataset) * len(checkpoints)
    if not prepared:
        # Every block is done, so no batch needs loading.
        if progress is not None:
            progress(total, total)
        return
    done_examples = 0
    start = 0
    for batch_position, batch in enumerate(loader):
        size = batch_size(batch)
        todo = [position for position in prepared if is_done is None or not is_done(position, batch_position)]
        if todo:
            batch = move_batch(batch, device, dtype)
        for position in todo:
            computer.start_checkpoint(position)
            yield BatchResult(position, batch_position, start, batch, computer.squared_norms(prepared[position], batch))
        start += size
        done_examples += size * len(checkpoints)
        if progress is not None:
            progress(done_examples, total)


def _weights_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Return the bytes of one checkpoint's weights for ``model`` in the compute dtype."""
    item = torch.empty((), dtype=dtype).element_size()
    return sum(value.numel() * (item if value.is_floating_point() else value.element_size())
               for value in model.state_dict().values())


def _cast(value: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    value = value.to(device)
    return value.to(dtype) if value.is_floating_point() else value


def flatten_gradients(gradients: BatchGradients) -> Tensor:
    """Concatenate the tracked parameters' gradients into one row per example, shape ``(B, P)``."""
    return torch.cat([grad.flatten(1) for grad in gradients.grads.values()], dim=1)
