"""Self-influence traced by several processes, on one or several nodes, with Lightning Fabric.

Each process (rank) traces one contiguous shard of the train set into its own
store, and global rank 0 merges the shards into the run's store::

    RUN.h5.rank0-of-2.partial   rank 0, dataset indices [0, a), while it is being written
    RUN.h5.rank0-of-2           rank 0's shard once complete
    RUN.h5.rank1-of-2           rank 1, dataset indices [a, N)
    RUN.h5                      the merged store, written by rank 0; the shard files are then deleted

Shards consist of whole batches of the one-process trace, so every example is
traced in the same batch as in one process. The merged store therefore has the
same datasets and attributes as a one-process run with the same options, apart
from its ``created`` time. A shard store records its dataset indices in its
fingerprint, so a rerun with the same options resumes each shard from its own
partial file, reuses complete shards and only merges what is missing.

Launching uses Lightning's ``ddp`` strategy: ``fabric.launch`` runs the current
command again in ``devices - 1`` child processes per node, with ``LOCAL_RANK``
set (Lightning's script launcher). The command must therefore be one that can
be run again as is: ``tracin score ...`` or the user's own script. Under
``torchrun`` or SLURM, the cluster starts the processes and ``fabric.launch``
only joins them. On several nodes, run the same command on every node with
``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` set; the output directory
must be on a file system that every node shares.

Failures: a rank that raises an exception logs it and reports it at the one
collective step after tracing (``all_gather_object``). Once every rank has
reached that step, rank 0 raises :class:`~tracin.errors.DistributedError`
naming the failed ranks, and the finished shards stay on disk for the rerun.
When a rank dies (``kill -9``, out of memory), the others fail at that step
with a connection error, and Lightning's launcher kills every process of a node
when one of its child processes exits with an error. Waiting at that step
times out after ``timeout_s`` seconds.

NOTE: the connection error on a dead rank was seen with gloo on CPU. With NCCL
only the timeout is relied upon, which has not been tested on GPUs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed
from lightning_fabric import Fabric
from lightning_fabric.strategies import DDPStrategy
from lightning_fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from tracin.checkpoints import Checkpoint
from tracin.errors import ConfigurationError, DistributedError, StoreError, TracInError, TracInWarning
from tracin.losses import PerExampleLoss
from tracin.passes import ProgressCallback
from tracin.store import TRAIN_COLUMNS, RunMetadata, ScoreWriter, check_output_path, fingerprint_differences, read_run
from tracin.tracer import (
    TracePlan,
    TraceStatistics,
    TraceSummary,
    plan_trace,
    run_trace,
    summarize_trace,
    trace_self_influence,
)

logger = logging.getLogger(__name__)

STRATEGIES = ("ddp",)
DEFAULT_TIMEOUT_S = 1800.0
"""Seconds a rank waits for the others: 30 minutes, the default process group timeout of torch 2.x and Lightning."""

ROW_DATASETS = ("index", "label", "prediction")


def shard_ranges(n_examples: int, world_size: int, batch_size: int) -> list[range]:
    """Split dataset indices ``0 .. n_examples - 1`` into one contiguous range per rank.

    Ranges consist of whole batches of size ``batch_size`` (the last batch may be
    shorter), and the numbers of batches per rank differ by at most one. Ranks
    beyond the number of batches get an empty range.

    Returns:
        ``world_size`` ranges, in rank order, that are disjoint and together cover every index.
    """
    if n_examples < 0 or world_size < 1 or batch_size < 1:
        raise ConfigurationError(
            f"cannot shard {n_examples} examples over {world_size} ranks in batches of {batch_size}; "
            "the world size and batch size must be positive."
        )
    n_batches = math.ceil(n_examples / batch_size)
    per_rank, remainder = divmod(n_batches, world_size)
    ranges = []
    first_batch = 0
    for rank in range(world_size):
        count = per_rank + (1 if rank < remainder else 0)
        start = min(first_batch * batch_size, n_examples)
        stop = min((first_batch + count) * batch_size, n_examples)
        ranges.append(range(start, stop))
        first_batch += count
    return ranges


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Return the store that ``rank`` of ``world_size`` writes its shard to, next to ``out``."""
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}-of-{world_size}")


def parse_devices(text: str) -> int | str:
    """Convert a ``--devices`` value to what Lightning expects: an int, or a string such as ``auto`` or ``0,1``."""
    try:
        return int(text)
    except ValueError:
        return text


def make_fabric(
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = 1,
    num_nodes: int = 1,
    strategy: str = "ddp",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Fabric:
    """Build the Fabric that launches and connects the ranks; arguments have Lightning's meanings.

    Raises:
        ConfigurationError: the strategy is not supported, the timeout is not positive, or
            Lightning rejects the accelerator, devices or number of nodes.
    """
    if strategy not in STRATEGIES:
        raise ConfigurationError(
            f"strategy {strategy!r} is not supported; choose one of {list(STRATEGIES)}. tracin starts its "
            "processes with Lightning's script launcher, which runs the same command again on every device."
        )
    if not timeout_s > 0:
        raise ConfigurationError(f"timeout {timeout_s!r} s is invalid; pass a positive number of seconds.")
    try:
        return Fabric(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=DDPStrategy(start_method="popen", timeout=timedelta(seconds=timeout_s)),
        )
    except (MisconfigurationException, RuntimeError, TypeError, ValueError) as error:
        raise ConfigurationError(
            f"Lightning Fabric rejected accelerator={accelerator!r}, devices={devices!r}, num_nodes={num_nodes!r}: "
            f"{error}"
        ) from error


@dataclass
class _ShardedTrace:
    """The inputs and options of a multi-process trace, passed to every rank."""

    model: nn.Module
    checkpoints: Any
    train_data: Dataset | DataLoader
    out: Path
    overwrite: bool
    timeout_s: float
    progress: ProgressCallback | None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class _ShardStatus:
    """The result of one rank's shard, exchanged between all ranks."""

    error: str | None = None
    max_squared_norm: float = 0.0
    resumed: bool = False


def trace_self_influence_distributed(
    model: nn.Module,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Checkpoint],
    train_data: Dataset | DataLoader,
    out: str | os.PathLike,
    *,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = 1,
    num_nodes: int = 1,
    strategy: str = "ddp",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    loss: PerExampleLoss | nn.Module | None = None,
    params: str | Sequence[str] | None = None,
    lr: float | Sequence[float] | None = None,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    run_info: dict[str, str] | None = None,
    method: str = "auto",
) -> TraceSummary | None:
    """Trace self-influence with one process per device and write one store, as one process would.

    Call it in every process of the run: in a script started once per node, Lightning
    starts the other processes by running the script again. Arguments not listed here
    are those of :func:`tracin.tracer.trace_self_influence`. The device of each rank
    comes from Fabric.

    Args:
        accelerator: ``"cpu"``, ``"gpu"`` or ``"auto"``, as in Lightning.
        devices: Processes per node, or which devices, as in Lightning.
        num_nodes: Number of nodes.
        strategy: ``"ddp"``, the only supported strategy.
        timeout_s: Seconds a rank waits for the other ranks before it fails. Ranks
            wait once, after their shard, so this must exceed the difference between the
            ranks' tracing times (large when one rank resumes a nearly finished shard).
        progress: Called on global rank 0 only, with (examples done, total) of its shard.

    Returns:
        The summary of the merged store on global rank 0, None on every other rank.
        With one process in total this is :func:`trace_self_influence` on Fabric's device.

    Raises:
        ConfigurationError: Lightning rejects the launch options; see :func:`make_fabric`.
        DistributedError: on global rank 0 when a rank failed, and on any rank whose wait
            for the others failed or timed out.
    """
    out = Path(out)
    check_output_path(out, overwrite)
    fabric = make_fabric(accelerator, devices, num_nodes, strategy, timeout_s)
    options = {"loss": loss, "params": params, "lr": lr, "batch_size": batch_size, "dtype": dtype,
               "run_info": run_info, "method": method}
    if fabric.world_size == 1:
        return trace_self_influence(model, checkpoints, train_data, out, device=fabric.device, overwrite=overwrite,
                                    progress=progress, **options)
    request = _ShardedTrace(model, checkpoints, train_data, out, overwrite, timeout_s, progress, options)
    return fabric.launch(_trace_rank, request)


def _trace_rank(fabric: Fabric, request: _ShardedTrace) -> TraceSummary | None:
    """Trace this rank's shard, exchange results with the other ranks and, on rank 0, merge."""
    rank, world_size = fabric.global_rank, fabric.world_size
    own_error = None
    try:
        with warnings.catch_warnings():
            if rank != 0:
                # Every rank gets the same inputs, so rank 0's warnings are enough.
                warnings.simplefilter("ignore", TracInWarning)
            plan = plan_trace(request.model, request.checkpoints, request.train_data, device=fabric.device,
                              **request.options)
        shards = shard_ranges(len(plan.loader.dataset), world_size, _loader_batch_size(plan.loader))
        status = _trace_shard(plan, request, rank, shards)
    except Exception as error:  # reported to every rank below, then raised on rank 0
        own_error = error
        status = _ShardStatus(error=f"{type(error).__name__}: {error}")
        if rank == 0:
            logger.error("rank 0 of %d failed; it raises the error once the other ranks have finished their shards",
                         world_size)
        else:
            logger.error("rank %d of %d failed: %s", rank, world_size, status.error,
                         exc_info=None if isinstance(error, TracInError) else error)

    statuses = _gather_statuses(status, rank, world_size, request.timeout_s)
    torch.distributed.destroy_process_group()
    if rank != 0:
        # Return normally even after a failure: Lightning's launcher kills every process of the
        # node when a child exits with an error, which could stop rank 0 before it reports.
        return None
    if own_error is not None:
        raise own_error
    failed = [f"rank {position}: {other.error}" for position, other in enumerate(statuses) if other.error]
    if failed:
        raise DistributedError(
            f"{len(failed)} of {world_size} ranks failed, so {request.out} was not written: {'; '.join(failed)}. "
            "Fix the cause and rerun the same command; finished shards are kept and resumed."
        )
    return _merge_shards(plan, request, shards, statuses)


def _loader_batch_size(loader: DataLoader) -> int:
    if loader.batch_size is None:
        raise ConfigurationError(
            "the train DataLoader has no batch_size (it was built with a batch_sampler), so it cannot be split "
            "into shards of whole batches. Pass the dataset, or DataLoader(dataset, batch_size=B, shuffle=False)."
        )
    return loader.batch_size


def _shard_loader(loader: DataLoader, shard: range) -> DataLoader:
    """Return a loader of ``shard`` with the batch size, workers and collate function of ``loader``."""
    return DataLoader(
        Subset(loader.dataset, shard),
        batch_size=loader.batch_size,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


def _shard_metadata(metadata: RunMetadata, shard: range) -> RunMetadata:
    return replace(metadata, fingerprint={**metadata.fingerprint, "shard": [shard.start, shard.stop]})


def _trace_shard(plan: TracePlan, request: _ShardedTrace, rank: int, shards: list[range]) -> _ShardStatus:
    """Trace one rank's shard into its own store, resuming a partial one and reusing a complete one."""
    world_size = len(shards)
    shard = shards[rank]
    if not shard:
        logger.info("rank %d of %d has no train examples: the %d examples make fewer batches than ranks",
                    rank, world_size, len(plan.loader.dataset))
        return _ShardStatus()
    path = shard_path(request.out, rank, world_size)
    metadata = _shard_metadata(plan.metadata, shard)
    if path.exists():
        differing = fingerprint_differences(json.loads(read_run(path).attrs["fingerprint"]), metadata.fingerprint)
        if differing:
            raise StoreError(
                f"shard store {path} was written for a different run; these fields differ: {', '.join(differing)}. "
                f"Delete {path} to start over, or rerun with the original checkpoints, data and options."
            )
        logger.info("rank %d of %d: reusing the complete shard store %s", rank, world_size, path)
        return _ShardStatus(resumed=True)

    logger.info("rank %d of %d: tracing train examples %d to %d on %s",
                rank, world_size, shard.start, shard.stop - 1, plan.device)
    shard_plan = replace(plan, loader=_shard_loader(plan.loader, shard), metadata=metadata, index_offset=shard.start)
    writer = ScoreWriter(path, metadata, plan.checkpoint_attrs, n_batches=len(shard_plan.loader))
    try:
        statistics = run_trace(shard_plan, writer, request.progress if rank == 0 else None)
        writer.finalize()
    except BaseException:
        writer.close()
        raise
    return _ShardStatus(max_squared_norm=statistics.max_squared_norm, resumed=writer.resumed)


def _gather_statuses(status: _ShardStatus, rank: int, world_size: int, timeout_s: float) -> list[_ShardStatus]:
    """Send this rank's status to every rank and return all of them, in rank order."""
    statuses: list[Any] = [None] * world_size
    try:
        torch.distributed.all_gather_object(statuses, status)
    except RuntimeError as error:  # torch.distributed's errors, timeouts included, subclass RuntimeError
        raise DistributedError(
            f"rank {rank} of {world_size} failed while waiting for the other ranks: {error}. Another rank died "
            f"(see its output) or was still tracing after the timeout of {timeout_s:g} s; if the ranks were only "
            "slow, rerun the same command with a larger timeout."
        ) from error
    return statuses


def _merge_shards(plan: TracePlan, request: _ShardedTrace, shards: list[range],
                  statuses: list[_ShardStatus]) -> TraceSummary:
    """Copy every shard store into the run's store, then delete the shards."""
    world_size = len(shards)
    batch_size = _loader_batch_size(plan.loader)
    writer = ScoreWriter(request.out, plan.metadata, plan.checkpoint_attrs, n_batches=len(plan.loader),
                         overwrite=request.overwrite)
    try:
        for rank, shard in enumerate(shards):
            if shard:
                _copy_shard(writer, shard_path(request.out, rank, world_size), shard, batch_size)
        path = writer.finalize()
    except BaseException:
        writer.close()
        raise
    for rank in range(world_size):
        shard_path(request.out, rank, world_size).unlink(missing_ok=True)
    logger.info("merged the shards of %d ranks into %s", world_size, path)

    statistics = TraceStatistics(max_squared_norm=max(status.max_squared_norm for status in statuses))
    resumed = writer.resumed or any(status.resumed for status in statuses)
    return summarize_trace(read_run(path), statistics, plan.zero_lr, resumed)


def _copy_shard(writer: ScoreWriter, path: Path, shard: range, batch_size: int) -> None:
    train = read_run(path).train
    if not np.array_equal(train["index"], np.arange(shard.start, shard.stop)):
        raise StoreError(
            f"shard store {path} does not contain dataset indices {shard.start} to {shard.stop - 1} in order. "
            f"Delete {path} and rerun."
        )
    first_batch = shard.start // batch_size
    writer.write_rows(
        shard.start,
        {name: train[name] for name in TRAIN_COLUMNS},
        {name: train[name] for name in ROW_DATASETS},
        range(first_batch, first_batch + math.ceil(len(shard) / batch_size)),
    )


def merge_top_k(
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
    k: int,
    largest: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge top-K lists of disjoint shards of the train set into the top-K of the whole set.

    The result is exact when each shard's list contains its own top ``min(k, shard size)``.
    Equal scores are ordered by train index, and NaN scores come last.

    Args:
        parts: ``(indices, scores)`` of each shard, both of shape ``(n_test, k_shard)``, with
            train indices of the whole set.
        k: Length of the merged lists; at most the total length of the shards' lists.
        largest: True for proponents (largest score first), False for opponents (smallest first).

    Returns:
        ``(indices, scores)``, each of shape ``(n_test, k)``, best first.
    """
    if not parts:
        raise ConfigurationError("merge_top_k needs at least one shard's (indices, scores).")
    indices = np.concatenate([np.asarray(part_indices) for part_indices, _ in parts], axis=1)
    scores = np.concatenate([np.asarray(part_scores) for _, part_scores in parts], axis=1)
    if indices.shape != scores.shape:
        raise ConfigurationError(
            f"indices of shape {indices.shape} and scores of shape {scores.shape} do not match; each shard "
            "needs one index per score."
        )
    if not 1 <= k <= scores.shape[1]:
        raise ConfigurationError(f"top K {k} is invalid for lists of {scores.shape[1]} entries in total.")
    sort_key = -scores if largest else scores
    sort_key = np.where(np.isnan(sort_key), np.inf, sort_key)
    # np.lexsort sorts by the last key first, so ties in the score go to the smaller train index.
    order = np.lexsort((indices, sort_key), axis=-1)[:, :k]
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(scores, order, axis=1)
