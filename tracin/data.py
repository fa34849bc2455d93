"""Read a train set in dataset order, so that row i of every result is dataset index i."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from tracin.errors import DataOrderError, SelectionError


def ordered_loader(data: Dataset | DataLoader, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Return a loader that visits ``data`` in dataset order.

    Args:
        data: A map-style dataset, or a DataLoader with a sequential sampler. A given
            DataLoader keeps its batch size, workers and collate function.
        batch_size: Batch size when ``data`` is a dataset.
        num_workers: Loader processes when ``data`` is a dataset.

    Raises:
        DataOrderError: the DataLoader shuffles or uses a custom sampler.
        SelectionError: the train set is empty.
    """
    if batch_size < 1:
        raise SelectionError(f"batch size {batch_size} is invalid; pass a positive integer.")
    if isinstance(data, DataLoader):
        sampler = data.batch_sampler.sampler if isinstance(data.batch_sampler, BatchSampler) else data.sampler
        if not isinstance(sampler, SequentialSampler):
            raise DataOrderError(
                f"the DataLoader uses {type(sampler).__name__}, so its rows would not follow dataset indices. "
                "Pass the dataset itself, or DataLoader(dataset, shuffle=False) without a custom sampler."
            )
        loader = data
    else:
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise DataOrderError(
                f"{type(data).__name__} is not a map-style dataset (it needs __len__ and __getitem__), so "
                "examples have no dataset index. Wrap it in a Dataset that supports indexing."
            )
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if len(loader.dataset) == 0:
        raise SelectionError("the train set is empty. Pass a dataset with at least one example.")
    return loader


def labels_of(batch: Any) -> Tensor | None:
    """Return the integer labels of an ``(inputs, labels)`` batch, or None when it has none."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        labels = batch[1]
        if isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point():
            return labels
    if isinstance(batch, dict):
        for key in ("label", "labels", "target", "targets", "y"):
            value = batch.get(key)
            if isinstance(value, Tensor) and value.dim() == 1 and not value.is_floating_point():
                return value
    return None


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move every tensor of a batch to ``device``, casting floating-point tensors to ``dtype``."""

    def move(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        if value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device=device)

    return torch.utils._pytree.tree_map(move, batch)
