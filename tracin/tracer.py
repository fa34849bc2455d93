r"""Self-influence of every train example, traced across checkpoints into an HDF5 store.

TracInCP (Pruthi et al., "Estimating Training Data Influence by Tracing
Gradient Descent", NeurIPS 2020) estimates how much a gradient step on train
example z changed the loss on example z' by summing, over saved checkpoints c
with learning rate :math:`\eta_c`,

.. math:: \mathrm{TracInCP}(z, z') = \sum_c \eta_c \, \nabla\ell(w_c, z) \cdot \nabla\ell(w_c, z').

Self-influence is the case z' = z, :math:`\sum_c \eta_c \lVert \nabla\ell(w_c, z) \rVert^2`.
It is large for examples the model keeps fighting: mislabeled and unusual ones.
With several optimizer param groups, each parameter's share of the dot product
is weighted by the rate of its own group.

The loop runs checkpoints outermost, so each checkpoint is loaded once, and
keeps one batch of per-example gradients in memory at a time.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from tracin.checkpoints import Checkpoint, apply_explicit_lr, discover_checkpoints
from tracin.data import labels_of, ordered_loader
from tracin.errors import (
    NonFiniteScoreWarning,
    ZeroGradientWarning,
    ZeroLearningRateWarning,
)
from tracin.gradients import BatchGradients, batch_size, make_gradient_computer
from tracin.losses import PerExampleLoss, loss_name, resolve_loss
from tracin.params import select_parameters
from tracin.passes import ProgressCallback, gradient_passes, resolve_device, tracing_mode
from tracin.store import RunMetadata, ScoreWriter, StoredRun, read_run

logger = logging.getLogger(__name__)

@dataclass
class TraceSummary:
    """Findings of a trace besides the scores.

    Attributes:
        run: The complete store, read back.
        nonfinite: Dataset indices of examples whose self-influence is NaN or infinite.
        all_zero_gradients: Every tracked gradient of every example was exactly zero.
        zero_lr_checkpoints: Positions of checkpoints whose learning rate is 0.
        resumed: The run continued a partial file left by an interrupted run.
    """

    run: StoredRun
    nonfinite: list[int]
    all_zero_gradients: bool
    zero_lr_checkpoints: list[int]
    resumed: bool


def trace_self_influence(
    model: nn.Module,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Checkpoint],
    train_data: Dataset | DataLoader,
    out: str | os.PathLike,
    *,
    loss: PerExampleLoss | nn.Module | None = None,
    params: str | Sequence[str] | None = None,
    lr: float | Sequence[float] | None = None,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    run_info: dict[str, str] | None = None,
    method: str = "auto",
) -> TraceSummary:
    """Compute the self-influence of every train example and write it to an HDF5 store.

    Args:
        model: The model, built with the architecture of the checkpoints. Its own weights,
            buffers, flags and hooks are left as they were.
        checkpoints: A checkpoint directory, a list of checkpoint files, or :class:`Checkpoint`
            objects, in any order; they are traced in training order.
        train_data: A map-style dataset, or a DataLoader that does not shuffle.
        out: Path of the ``.h5`` store to write.
        loss: Per-example loss; see :func:`tracin.losses.resolve_loss`. Defaults to
            cross-entropy on ``(inputs, targets)`` batches.
        params: Names or globs of the tracked parameters; default every parameter with
            ``requires_grad``.
        lr: Explicit learning rate, one for all checkpoints or one per checkpoint. Required
            when a checkpoint records none.
        batch_size: Examples per batch; results do not depend on it.
        dtype: Compute dtype of weights, inputs and gradients. Scores are stored in float64.
        device: Where to compute; default CUDA when available, else CPU.
        overwrite: Replace an existing store at ``out``.
        progress: Called after each batch with (examples done, total).
        run_info: Extra root attributes, e.g. ``checkpoint_dir`` and ``config``.
        method: ``"auto"`` computes gradient norms of Linear, Conv and BatchNorm layers in
            closed form and uses ``vmap`` for other parameters; ``"vmap"`` uses ``vmap`` for all.
            Both are exact.

    Returns:
        A :class:`TraceSummary` with the store read back; ``summary.run.train["self_influence"]``
        has shape ``(N,)``.
    """
    plan = plan_trace(model, checkpoints, train_data, loss=loss, params=params, lr=lr, batch_size=batch_size,
                      dtype=dtype, device=device, run_info=run_info, method=method)
    writer = ScoreWriter(out, plan.metadata, plan.checkpoint_attrs, n_batches=len(plan.loader), overwrite=overwrite)
    try:
        statistics = run_trace(plan, writer, progress)
        path = writer.finalize()
    except BaseException:
        writer.close()
        raise
    return summarize_trace(read_run(path), statistics, plan.zero_lr, writer.resumed)


@dataclass
class TracePlan:
    """The checked inputs of a trace and the metadata of its store.

    Attributes:
        model: The model.
        checkpoints: Checkpoints in training order.
        loader: The traced examples in dataset order.
        loss: Per-example loss.
        tracked: Names of the tracked parameters.
        lr_table: Learning rate of each tracked parameter at each checkpoint, shape ``(C, n_tracked)``.
        zero_lr: Positions of checkpoints whose learning rate is 0.
        device: Where to compute.
        dtype: Compute dtype.
        method: ``"auto"`` or ``"vmap"``; see :func:`trace_self_influence`.
        metadata: Root attributes of the store.
        checkpoint_attrs: Attributes of each checkpoint in the store.
        index_offset: Dataset index of the loader's first example. It is nonzero when the loader
            reads one shard of a multi-process trace.
    """

    model: nn.Module
    checkpoints: list[Checkpoint]
    loader: DataLoader
    loss: PerExampleLoss
    tracked: list[str]
    lr_table: np.ndarray
    zero_lr: list[int]
    device: torch.device
    dtype: torch.dtype
    method: str
    metadata: RunMetadata
    checkpoint_attrs: list[dict[str, Any]]
    index_offset: int = 0


def plan_trace(
    model: nn.Module,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Checkpoint],
    train_data: Dataset | DataLoader,
    *,
    loss: PerExampleLoss | nn.Module | None = None,
    params: str | Sequence[str] | None = None,
    lr: float | Sequence[float] | None = None,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    run_info: dict[str, str] | None = None,
    method: str = "auto",
) -> TracePlan:
    """Check the inputs of a trace and build its store metadata; arguments as in :func:`trace_self_influence`."""
    checkpoint_list = _as_checkpoints(checkpoints, lr)
    loader = ordered_loader(train_data, batch_size)
    loss_fn = resolve_loss(loss, model)
    tracked = select_parameters(model, params)
    lr_table = np.array([checkpoint.parameter_lr(tracked) for checkpoint in checkpoint_list], dtype=np.float64)
    zero_lr = [position for position, rates in enumerate(lr_table) if not rates.any()]
    if zero_lr:
        warnings.warn(
            f"checkpoints {[str(checkpoint_list[p].path) for p in zero_lr]} have learning rate 0 "
            "(as at the start of a warmup), so they contribute nothing to any score.",
            ZeroLearningRateWarning,
            stacklevel=3,
        )
    n_examples = len(loader.dataset)
    metadata = _run_metadata(model, tracked, loss_fn, checkpoint_list, n_examples, loader, dtype, run_info)
    checkpoint_attrs = [_checkpoint_attrs(checkpoint, rates) for checkpoint, rates in zip(checkpoint_list, lr_table)]
    return TracePlan(model, checkpoint_list, loader, loss_fn, tracked, lr_table, zero_lr, resolve_device(device),
                     dtype, method, metadata, checkpoint_attrs)


def run_trace(plan: TracePlan, writer: ScoreWriter, progress: ProgressCallback | None = None) -> TraceStatistics:
    """Trace every block of ``plan`` that ``writer`` has not stored yet; the caller finalizes or closes ``writer``."""
    with tracing_mode(plan.model, plan.device):
        computer = make_gradient_computer(plan.model, plan.loss, plan.tracked, plan.method)
        return _trace_passes(plan.model, plan.checkpoints, plan.loader, writer, computer, plan.lr_table, plan.device,
                             plan.dtype, progress, plan.index_offset)


def _as_checkpoints(checkpoints: Any, lr: float | Sequence[float] | None) -> list[Checkpoint]:
    if isinstance(checkpoints, (list, tuple)) and checkpoints and all(isinstance(c, Checkpoint) for c in checkpoints):
        return apply_explicit_lr(list(checkpoints), lr)
    return discover_checkpoints(checkpoints, lr)


def _checkpoint_attrs(checkpoint: Checkpoint, parameter_lr: np.ndarray) -> dict[str, Any]:
    return {
        "path": str(checkpoint.path.resolve()),
        "step": checkpoint.step,
        "epoch": checkpoint.epoch,
        "lr": np.array(checkpoint.lr if checkpoint.lr is not None else [], dtype=np.float64),
        "parameter_lr": parameter_lr,
    }


def _run_metadata(
    model: nn.Module,
    tracked: list[str],
    loss_fn: PerExampleLoss,
    checkpoints: list[Checkpoint],
    n_examples: int,
    loader: DataLoader,
    dtype: torch.dtype,
    run_info: dict[str, str] | None,
) -> RunMetadata:
    parameters = dict(model.named_parameters())
    model_path = f"{type(model).__module__}.{type(model).__qualname__}"
    fingerprint = {
        "model": model_path,
        "params": tracked,
        "loss": loss_name(loss_fn),
        "checkpoints": [
            [str(c.path), c.step, list(c.lr or []), c.path.stat().st_size, c.path.stat().st_mtime_ns]
            for c in checkpoints
        ],
        "n_examples": n_examples,
        "batch_size": loader.batch_size,
        "dtype": str(dtype),
    }
    info = run_info or {}
    return RunMetadata(
        model=model_path,
        params=tracked,
        n_params=int(sum(parameters[name].numel() for name in tracked)),
        loss=loss_name(loss_fn),
        checkpoint_dir=info.get("checkpoint_dir", ""),
        config=info.get("config", ""),
        fingerprint=json.loads(json.dumps(fingerprint)),
    )


@dataclass
class TraceStatistics:
    """Findings of the gradient passes besides the stored scores: the largest finite squared gradient norm."""

    max_squared_norm: float = 0.0


def _trace_passes(
    model: nn.Module,
    checkpoints: list[Checkpoint],
    loader: DataLoader,
    writer: ScoreWriter,
    computer: Any,
    lr_table: np.ndarray,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressCallback | None,
    index_offset: int = 0,
) -> TraceStatistics:
    statistics = TraceStatistics()
    last = len(checkpoints) - 1
    passes = gradient_passes(model, checkpoints, loader, computer, device, dtype, writer.is_done, progress,
                             squared_norms=True)
    for block in passes:
        lr = torch.as_tensor(lr_table[block.checkpoint], dtype=torch.float64, device=device)
        size = batch_size(block.inputs)
        columns, rows = _batch_columns(block.gradients, block.inputs, lr, block.start, size, statistics)
        if block.checkpoint != last:
            rows.pop("prediction")
        if block.checkpoint != 0:
            rows.pop("index")
            rows.pop("label")
        else:
            rows["index"] += index_offset
        writer.write_block(block.checkpoint, block.batch, block.start, columns, rows)
    return statistics


def _batch_columns(
    result: BatchGradients,
    batch: Any,
    lr: Tensor,
    start: int,
    size: int,
    statistics: TraceStatistics,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    # Squared norm per tracked parameter, shape (B, n_tracked), summed in the compute dtype and
    # weighted by each parameter's learning rate in float64.
    squared = result.parameter_squared_norms().to(torch.float64)
    finite = squared[torch.isfinite(squared)]
    if finite.numel():
        statistics.max_squared_norm = max(statistics.max_squared_norm, float(finite.max()))
    self_influence = squared @ lr

    labels = labels_of(batch)
    margin = torch.full((size,), float("nan"), dtype=torch.float64)
    prediction = torch.full((size,), -1, dtype=torch.int64)
    if result.outputs is not None and result.outputs.dim() == 2:
        logits = result.outputs.to(torch.float64)
        prediction = logits.argmax(dim=1).cpu()
        if labels is not None:
            margin = _margin(logits, labels.to(logits.device)).cpu()

    columns = {
        "checkpoint_self_influence": self_influence.cpu().numpy(),
        "loss": result.losses.to(torch.float64).cpu().numpy(),
        "margin": margin.numpy(),
    }
    rows = {
        "index": np.arange(start, start + size, dtype=np.int64),
        "label": (labels.cpu().numpy() if labels is not None else np.full(size, -1)).astype(np.int64),
        "prediction": prediction.numpy(),
    }
    return columns, rows


def _margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Return the logit of the given label minus the largest other logit, shape ``(B,)``."""
    given = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, labels.unsqueeze(1), float("-inf"))
    return given - others.max(dim=1).values


def summarize_trace(run: StoredRun, statistics: TraceStatistics, zero_lr: list[int], resumed: bool) -> TraceSummary:
    """Read the findings of a complete trace from its store, warning about NaN scores and all-zero gradients."""
    scores = run.train["self_influence"]
    nonfinite = run.train["index"][~np.isfinite(scores)].tolist()
    if nonfinite:
        warnings.warn(
            f"{len(nonfinite)} of {len(scores)} examples have NaN or infinite self-influence, dataset indices "
            f"{nonfinite[:20]}{' ...' if len(nonfinite) > 20 else ''}. Check these inputs for NaN or infinite "
            "values; the other scores are unaffected.",
            NonFiniteScoreWarning,
            stacklevel=3,
        )
    all_zero = statistics.max_squared_norm == 0.0 and not resumed
    if all_zero:
        warnings.warn(
            "every tracked gradient of every train example is zero, so every score is zero. Check the loss "
            "and the output shape: a softmax or log-softmax over a dimension of size 1, or outputs that do "
            "not depend on the tracked parameters, give zero gradients.",
            ZeroGradientWarning,
            stacklevel=3,
        )
    return TraceSummary(run, nonfinite, all_zero, zero_lr, resumed)
