r"""Influence of train examples on test examples: proponents, opponents and net importance.

The influence of train example z on test example z' is

.. math:: \mathrm{TracInCP}(z, z') = \sum_c \eta_c \, \nabla\ell(w_c, z) \cdot \nabla\ell(w_c, z').

Sign convention: a **proponent** has positive influence. A gradient step on it,
:math:`w \leftarrow w - \eta \nabla\ell(w, z)`, lowers the test example's loss by
about :math:`\eta \nabla\ell(w, z) \cdot \nabla\ell(w, z')`. An **opponent** has
negative influence: a step on it raised the test loss.

Train gradients are computed once per checkpoint and stored in the run's HDF5
file. A query then costs the test gradients plus a matrix product, done in
blocks of train examples with a running top-K, so memory is bounded by the block
size.

With ``normalize=True`` each gradient is divided by its norm at each checkpoint,
so scores are learning-rate-weighted cosine similarities. Raw dot products favor
train examples with large gradients (often mislabeled ones), which then show up
as top opponents of almost every test example.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from tracin.checkpoints import Checkpoint
from tracin.data import labels_of, ordered_loader
from tracin.errors import ConfigurationError, StorageOverflowWarning
from tracin.gradients import make_gradient_computer
from tracin.losses import PerExampleLoss, resolve_loss
from tracin.params import select_parameters
from tracin.passes import ProgressCallback, flatten_gradients, gradient_passes, resolve_device, tracing_mode
from tracin.selection import check_indices
from tracin.projection import Projector, ProjectionSpec
from tracin.store import GradientReader, GradientWriter, StoredRun, gradient_info, read_run

logger = logging.getLogger(__name__)

DEFAULT_MAX_GRADIENT_BYTES = 16 * 2**30
"""Largest store of full-dimension train gradients, over all checkpoints, that tracin writes by default.

Every query reads all of it once, so its size sets the floor of a query's time.
At sequential read speeds of 0.5 to 2 GB/s (an estimate for local SSDs, not
measured here), 16 GiB takes about 10 to 35 seconds. Above the limit, gradients
are projected.
"""

DEFAULT_PROJECTION_DIM = 1024
"""Projected dimension per parameter when full gradients exceed the size limit."""

STORAGE_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16}
TRAIN_BLOCK = 4096


@dataclass
class TopInfluence:
    """Top-K proponents and opponents of each test example.

    Attributes:
        test_index: Dataset indices of the test examples, shape ``(n_test,)``.
        test_label: Their given labels, ``(n_test,)``, -1 when unknown.
        test_prediction: Predicted labels at the last checkpoint, ``(n_test,)``, -1 when unknown.
        proponent_index: Dataset indices of the K most positive train examples, ``(n_test, K)``,
            best first.
        proponent_score: Their influence, ``(n_test, K)``.
        opponent_index: Dataset indices of the K most negative train examples, ``(n_test, K)``,
            most negative first.
        opponent_score: Their influence, ``(n_test, K)``.
        normalize: Scores are cosine similarities rather than dot products.
    """

    test_index: np.ndarray
    test_label: np.ndarray
    test_prediction: np.ndarray
    proponent_index: np.ndarray
    proponent_score: np.ndarray
    opponent_index: np.ndarray
    opponent_score: np.ndarray
    normalize: bool = False


@dataclass
class InfluenceContext:
    """Model, checkpoints, loss, tracked parameters and projection that influence queries need besides the store."""

    model: nn.Module
    checkpoints: list[Checkpoint]
    loss: PerExampleLoss
    tracked: list[str]
    lr_table: np.ndarray
    device: torch.device
    dtype: torch.dtype
    batch_size: int = 64
    method: str = "auto"
    projection: ProjectionSpec | None = None
    _projector: Projector | None = field(default=None, repr=False)

    @property
    def projector(self) -> Projector | None:
        """The projector of ``projection``, or None for full-dimension gradients."""
        if self.projection is None:
            return None
        if self._projector is None or self._projector.spec != self.projection:
            self._projector = Projector(self.model, self.tracked, self.projection)
        return self._projector

    def computer(self):
        """Return a gradient computer for this context's method and projection."""
        return make_gradient_computer(self.model, self.loss, self.tracked, self.method, self.projector)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        checkpoints: list[Checkpoint],
        *,
        loss: PerExampleLoss | nn.Module | None = None,
        params: str | Sequence[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        method: str = "auto",
        projection: ProjectionSpec | None = None,
    ) -> InfluenceContext:
        """Select the tracked parameters and look up each one's learning rate at each checkpoint."""
        tracked = select_parameters(model, params)
        lr_table = np.array([checkpoint.parameter_lr(tracked) for checkpoint in checkpoints], dtype=np.float64)
        return cls(model, checkpoints, resolve_loss(loss, model), tracked, lr_table,
                   resolve_device(device), dtype, batch_size, method, projection)

    @classmethod
    def from_store(
        cls,
        run: StoredRun,
        model: nn.Module,
        *,
        loss: PerExampleLoss | nn.Module | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 64,
        projection: ProjectionSpec | None = None,
    ) -> InfluenceContext:
        """Use the checkpoints, learning rates, tracked parameters and dtype that a stored run was traced with.

        Without ``projection``, the projection of the store's train gradients is used, if any.
        """
        tracked = list(run.attrs["params"])
        select_parameters(model, tracked)
        checkpoints = [
            Checkpoint(Path(info["path"]), info["step"], info["epoch"], tuple(info["lr"]) or None)
            for info in run.checkpoints
        ]
        lr_table = np.array([info["parameter_lr"] for info in run.checkpoints], dtype=np.float64)
        if dtype is None:
            stored = json.loads(run.attrs.get("fingerprint", "{}")).get("dtype", "torch.float32")
            dtype = torch.float64 if stored == "torch.float64" else torch.float32
        if projection is None:
            info = gradient_info(run.path)
            if info and info.get("projection_dim", 0) > 0:
                projection = ProjectionSpec(int(info["projection_dim"]), int(info["projection_seed"]))
        return cls(model, checkpoints, resolve_loss(loss, model), tracked, lr_table,
                   resolve_device(device), dtype, batch_size, projection=projection)

    def gradient_sizes(self) -> list[int]:
        """Length of each tracked parameter's block in a flattened (possibly projected) gradient."""
        if self.projector is not None:
            return self.projector.sizes()
        parameters = dict(self.model.named_parameters())
        return [parameters[name].numel() for name in self.tracked]

    def lr_vector(self, checkpoint: int) -> Tensor:
        """Learning rate of each element of a flattened gradient, shape ``(P,)``."""
        rates = torch.as_tensor(self.lr_table[checkpoint], dtype=torch.float64)
        return torch.repeat_interleave(rates, torch.as_tensor(self.gradient_sizes()))


def ensure_train_gradients(
    store: str | os.PathLike,
    context: InfluenceContext,
    train_data: Dataset | DataLoader,
    *,
    storage_dtype: str = "float32",
    max_bytes: int = DEFAULT_MAX_GRADIENT_BYTES,
    progress: ProgressCallback | None = None,
) -> None:
    """Compute and store the train gradients of every checkpoint, unless the store already has them.

    Full-dimension gradients are stored while they fit in ``max_bytes``. Above it,
    and when ``context.projection`` is None, they are projected to
    ``DEFAULT_PROJECTION_DIM`` per parameter (``context.projection`` is set to that).

    Raises:
        ConfigurationError: the gradients would exceed ``max_bytes`` even projected, or
            ``storage_dtype`` is unknown.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise ConfigurationError(f"storage dtype {storage_dtype!r} is invalid; choose one of {sorted(STORAGE_DTYPES)}.")
    dtype = np.dtype(STORAGE_DTYPES[storage_dtype])
    loader = ordered_loader(train_data, context.batch_size)
    n_examples = len(loader.dataset)
    stored_labels = read_run(store).train["label"]
    if n_examples != len(stored_labels):
        raise ConfigurationError(
            f"the train set has {n_examples} examples but {store} was traced on {len(stored_labels)}. Pass the "
            "train set that 'tracin score' traced, in the same order."
        )
    needed = n_examples * sum(context.gradient_sizes()) * len(context.checkpoints) * dtype.itemsize
    if needed > max_bytes and context.projection is None:
        context.projection = ProjectionSpec(DEFAULT_PROJECTION_DIM)
        logger.warning(
            "full train gradients need %.2f GiB, over the limit of %.2f GiB; projecting them to %d dimensions "
            "per parameter (seed 0). Pass a projection dimension explicitly to choose another.",
            needed / 2**30, max_bytes / 2**30, DEFAULT_PROJECTION_DIM,
        )
        needed = n_examples * sum(context.gradient_sizes()) * len(context.checkpoints) * dtype.itemsize
    n_params = sum(context.gradient_sizes())
    if needed > max_bytes:
        raise ConfigurationError(
            f"train gradients need {needed / 2**30:.2f} GiB ({n_examples} examples x {n_params} dimensions x "
            f"{len(context.checkpoints)} checkpoints x {dtype.itemsize} bytes), over the limit of "
            f"{max_bytes / 2**30:.2f} GiB. Raise the limit (--max-gradient-gib), project to fewer dimensions "
            "(--project-dim), track fewer parameters, or use float16 storage."
        )
    attrs = {
        "projection_dim": context.projection.dim if context.projection else 0,
        "projection_seed": context.projection.seed if context.projection else 0,
    }
    info = gradient_info(store)
    if info and info.get("complete") and info.get("n_params") == n_params and info.get("dtype") == dtype.name \
            and all(info.get(key) == value for key, value in attrs.items()):
        return
    writer = GradientWriter(store, len(context.checkpoints), n_examples, n_params, len(loader), dtype, attrs)
    try:
        with tracing_mode(context.model, context.device):
            computer = context.computer()
            passes = gradient_passes(context.model, context.checkpoints, loader, computer, context.device,
                                     context.dtype, writer.is_done, progress)
            for block in passes:
                _check_labels(block, stored_labels, store)
                writer.write_block(block.checkpoint, block.batch, block.start,
                                   to_storage(flatten_gradients(block.gradients), dtype))
        writer.finish()
    except BaseException:
        writer.close()
        raise


def _check_labels(block, stored_labels: np.ndarray, store) -> None:
    """Raise ConfigurationError when a batch's labels differ from the labels the store recorded for its rows."""
    labels = labels_of(block.inputs)
    if labels is None:
        return
    expected = stored_labels[block.start:block.start + len(labels)]
    mismatch = np.flatnonzero(labels.cpu().numpy() != expected)
    if mismatch.size:
        first = block.start + int(mismatch[0])
        raise ConfigurationError(
            f"train example {first} has label {int(labels[mismatch[0]])}, but {store} recorded label "
            f"{int(expected[mismatch[0]])} for it: this is not the train set that 'tracin score' traced, or "
            "not in the same order. Pass the same dataset."
        )


def to_storage(gradients: Tensor, dtype: np.dtype) -> np.ndarray:
    """Cast gradients to the storage dtype, warning about values too large for it instead of storing inf."""
    values = gradients.detach().cpu().numpy()
    with np.errstate(over="ignore"):
        stored = values.astype(dtype)
    overflow = np.isinf(stored) & np.isfinite(values)
    if overflow.any():
        warnings.warn(
            f"{int(overflow.sum())} gradient values exceed the range of {dtype.name} (largest magnitude "
            f"{float(np.abs(values[np.isfinite(values)]).max()):.3g}); they are stored as NaN, not inf. "
            "Use float32 storage for these gradients.",
            StorageOverflowWarning,
            stacklevel=2,
        )
        stored[overflow] = np.nan
    return stored


def test_gradients(
    context: InfluenceContext,
    test_data: Dataset,
    indices: np.ndarray,
) -> tuple[list[Tensor], np.ndarray, np.ndarray]:
    """Return test gradients per checkpoint, each ``(n_test, P)``, with labels and last-checkpoint predictions."""
    loader = ordered_loader(Subset(test_data, indices.tolist()), context.batch_size)
    per_checkpoint: list[list[Tensor]] = [[] for _ in context.checkpoints]
    labels = np.full(len(indices), -1, dtype=np.int64)
    predictions = np.full(len(indices), -1, dtype=np.int64)
    last = len(context.checkpoints) - 1
    with tracing_mode(context.model, context.device):
        computer = context.computer()
        for block in gradient_passes(context.model, context.checkpoints, loader, computer, context.device, context.dtype):
            per_checkpoint[block.checkpoint].append(flatten_gradients(block.gradients).cpu())
            if block.checkpoint == last:
                rows = slice(block.start, block.start + len(block.gradients.losses))
                batch_labels = labels_of(block.inputs)
                if batch_labels is not None:
                    labels[rows] = batch_labels.cpu().numpy()
                if block.gradients.outputs is not None and block.gradients.outputs.dim() == 2:
                    predictions[rows] = block.gradients.outputs.argmax(dim=1).cpu().numpy()
    return [torch.cat(blocks) for blocks in per_checkpoint], labels, predictions


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _unit_rows(matrix: Tensor) -> Tensor:
    norms = matrix.norm(dim=1, keepdim=True)
    return matrix / torch.where(norms > 0, norms, torch.ones_like(norms))


def influence_blocks(
    store: str | os.PathLike,
    context: InfluenceContext,
    test_grads: list[Tensor],
    normalize_test: bool = False,
    normalize_train: bool = False,
    block_size: int = TRAIN_BLOCK,
):
    """Yield ``(start, scores)`` for blocks of train examples, ``scores`` of shape ``(n_test, block)``.

    Args:
        test_grads: Test gradients per checkpoint, each ``(n_test, P)``.
        normalize_test: Divide each test gradient by its norm at each checkpoint.
        normalize_train: Divide each train gradient by its norm at each checkpoint.
    """
    with GradientReader(store) as reader:
        n_train = reader.group["0000"].shape[0]
        dtype = _accumulation_dtype(context.dtype, test_grads[0].dtype)
        weighted = []
        for position, grads in enumerate(test_grads):
            grads = grads.to(dtype)
            if normalize_test:
                grads = _unit_rows(grads)
            weighted.append(grads * context.lr_vector(position).to(dtype))
        for start in range(0, n_train, block_size):
            stop = min(start + block_size, n_train)
            scores = torch.zeros(len(test_grads[0]), stop - start, dtype=dtype)
            for position in range(len(test_grads)):
                train = torch.from_numpy(reader.block(position, start, stop)).to(dtype)
                if normalize_train:
                    train = _unit_rows(train)
                scores += weighted[position] @ train.T
            yield start, scores


def top_k_influence(
    store: str | os.PathLike,
    context: InfluenceContext,
    test_data: Dataset,
    test_indices: Sequence[int] | np.ndarray,
    k: int = 10,
    normalize: bool = False,
    block_size: int = TRAIN_BLOCK,
) -> TopInfluence:
    """Find the top-K proponents and opponents of each test example, exactly, with a running top-K.

    Args:
        store: A store with train gradients (see :func:`ensure_train_gradients`).
        context: Model, checkpoints, loss and tracked parameters of the run.
        test_data: The test split, in dataset order.
        test_indices: Dataset indices of the test examples.
        k: Number of proponents and of opponents per test example.
        normalize: Use cosine similarities instead of dot products.
        block_size: Train examples per block; memory grows with ``n_test * block_size``.

    Returns:
        A :class:`TopInfluence`; index and score arrays have shape ``(n_test, K)``.
    """
    indices = check_indices(test_indices, len(test_data))
    n_train = len(read_run(store).train["index"])
    if not 1 <= k <= n_train:
        raise ConfigurationError(f"top K {k} is invalid for {n_train} train examples; pass 1 <= K <= {n_train}.")
    test_grads, labels, predictions = test_gradients(context, test_data, indices)
    best = worst = None
    for start, scores in influence_blocks(store, context, test_grads, normalize, normalize, block_size):
        columns = torch.arange(start, start + scores.shape[1]).expand_as(scores)
        best = _merge_top(best, scores.nan_to_num(nan=-torch.inf), columns, k, largest=True)
        worst = _merge_top(worst, scores.nan_to_num(nan=torch.inf), columns, k, largest=False)
    return TopInfluence(
        test_index=indices,
        test_label=labels,
        test_prediction=predictions,
        proponent_index=best[1].numpy(),
        proponent_score=best[0].double().numpy(),
        opponent_index=worst[1].numpy(),
        opponent_score=worst[0].double().numpy(),
        normalize=normalize,
    )


def _merge_top(running, scores: Tensor, columns: Tensor, k: int, largest: bool):
    if running is not None:
        scores = torch.cat([running[0], scores], dim=1)
        columns = torch.cat([running[1], columns], dim=1)
    values, positions = scores.topk(min(k, scores.shape[1]), dim=1, largest=largest, sorted=True)
    return values, columns.gather(1, positions)


def influence_matrix(
    store: str | os.PathLike,
    context: InfluenceContext,
    test_data: Dataset,
    test_indices: Sequence[int] | np.ndarray,
    normalize: bool = False,
) -> np.ndarray:
    """Return the full influence matrix of shape ``(n_test, n_train)``; for small problems and checks."""
    indices = check_indices(test_indices, len(test_data))
    test_grads, _, _ = test_gradients(context, test_data, indices)
    blocks = [scores for _, scores in influence_blocks(store, context, test_grads, normalize, normalize)]
    return torch.cat(blocks, dim=1).double().numpy()


def importance(
    store: str | os.PathLike,
    context: InfluenceContext,
    against: Dataset,
    normalize: bool = False,
) -> np.ndarray:
    """Return each train example's influence summed over every example of ``against``, shape ``(n_train,)``.

    Positive means the train example helped the loss on ``against`` go down. The sum
    over test examples is taken over their gradients first, so the cost is one pass
    over ``against`` and one over the stored train gradients.
    """
    loader = ordered_loader(against, context.batch_size)
    dtype = _accumulation_dtype(context.dtype)
    sums = [torch.zeros(1, sum(context.gradient_sizes()), dtype=dtype) for _ in context.checkpoints]
    with tracing_mode(context.model, context.device):
        computer = context.computer()
        for block in gradient_passes(context.model, context.checkpoints, loader, computer, context.device, context.dtype):
            grads = flatten_gradients(block.gradients).cpu().to(dtype)
            if normalize:
                grads = _unit_rows(grads)
            sums[block.checkpoint] += grads.sum(dim=0, keepdim=True)
    blocks = influence_blocks(store, context, sums, normalize_test=False, normalize_train=normalize)
    return torch.cat([scores for _, scores in blocks], dim=1)[0].double().numpy()
