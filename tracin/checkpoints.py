"""Find checkpoints, read their learning rates and load their weights safely.

Two layouts are read:

* a directory written by :class:`tracin.callbacks.TracInCheckpoint`, whose
  manifest lists the checkpoints in order with the learning rate of each
  optimizer param group as used by the last optimizer step before the save;
* any other directory of ``*.ckpt``/``*.pt`` files, such as those of Lightning's
  ``ModelCheckpoint(save_top_k=-1, every_n_epochs=1)``. Their learning rate comes
  from the param groups in ``optimizer_states``. A file with no learning rate is
  an error unless the caller passes one: the rate is never assumed to be 1.0.

Every file is opened with ``torch.load(weights_only=True)``, so a file that
needs arbitrary code to unpickle is rejected and nothing in it runs.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tracin.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    MissingLearningRateError,
    UnsafeCheckpointError,
)
from tracin.manifest import read_manifest

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: where its weights are and the learning rate in force for its step.

    Attributes:
        path: File with the weights.
        step: Optimizer updates applied before the save, when known.
        epoch: Training epoch of the save, when known.
        lr: Learning rate of each optimizer param group, or None when unknown.
        param_groups: Parameter names of each param group, when known. With several
            groups, each parameter gets the rate of its own group.
    """

    path: Path
    step: int | None = None
    epoch: int | None = None
    lr: tuple[float, ...] | None = None
    param_groups: tuple[tuple[str, ...], ...] | None = None

    def parameter_lr(self, names: Sequence[str]) -> list[float]:
        """Return the learning rate of each named parameter.

        Raises:
            MissingLearningRateError: the checkpoint records no learning rate.
            CheckpointError: param groups have different rates but their parameter
                names are unknown, or a name is in no group.
        """
        if self.lr is None:
            raise MissingLearningRateError(
                f"checkpoint {self.path} records no learning rate. Pass the rate used for the steps "
                "before it explicitly (lr=0.01 in Python, --lr 0.01 on the command line), one value "
                "for all checkpoints or one per checkpoint."
            )
        if len(set(self.lr)) == 1:
            return [self.lr[0]] * len(names)
        if self.param_groups is None:
            raise CheckpointError(
                f"checkpoint {self.path} has param groups with different learning rates {list(self.lr)} "
                "but does not record which parameters belong to each group. Save with TracInCheckpoint, "
                "or pass one learning rate explicitly."
            )
        group_of = {name: group for group, members in enumerate(self.param_groups) for name in members}
        missing = [name for name in names if name not in group_of]
        if missing:
            raise CheckpointError(
                f"checkpoint {self.path}: tracked parameters {missing} are in no optimizer param group, "
                "so their learning rate is unknown. Track only optimized parameters (--params) or pass "
                "a learning rate explicitly."
            )
        return [self.lr[group_of[name]] for name in names]


def discover_checkpoints(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    lr: float | Sequence[float] | None = None,
) -> list[Checkpoint]:
    """List the checkpoints of a run in training order.

    Args:
        source: A checkpoint directory, or a list of checkpoint files in any order.
        lr: An explicit learning rate: one float for every checkpoint, or one per
            checkpoint in training order. It replaces the recorded rates.

    Raises:
        CheckpointNotFoundError: the directory or a file does not exist, or contains no checkpoint.
        ConfigurationError: ``lr`` has a different length than the list of checkpoints.
    """
    if isinstance(source, (str, os.PathLike)):
        checkpoints = _discover_in_directory(Path(source))
    else:
        checkpoints = _sorted_by_step([_read_checkpoint_metadata(Path(path)) for path in source])
        if not checkpoints:
            raise CheckpointNotFoundError("the list of checkpoint files is empty. Pass at least one file.")
    return apply_explicit_lr(checkpoints, lr)


def _discover_in_directory(directory: Path) -> list[Checkpoint]:
    if not directory.exists():
        raise CheckpointNotFoundError(
            f"checkpoint directory {directory} does not exist. Pass the dirpath of TracInCheckpoint "
            "or of ModelCheckpoint from your training run."
        )
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{directory} is not a directory. Pass the directory that contains the checkpoints.")
    manifest = read_manifest(directory)
    if manifest is not None and manifest.checkpoints:
        checkpoints = []
        for entry in manifest.checkpoints:
            path = directory / entry.file
            if not path.is_file():
                raise CheckpointNotFoundError(
                    f"the manifest in {directory} lists {entry.file}, which does not exist. Restore the file "
                    "or remove its entry from tracin_manifest.json."
                )
            groups = tuple(tuple(group) for group in entry.param_groups) if entry.param_groups else None
            lr = tuple(float(value) for value in entry.lr) if entry.lr is not None else None
            checkpoints.append(Checkpoint(path, entry.step, entry.epoch, lr, groups))
        return checkpoints

    files = sorted(path for path in directory.iterdir() if path.suffix in CHECKPOINT_SUFFIXES and path.is_file())
    if not files:
        raise CheckpointNotFoundError(
            f"checkpoint directory {directory} contains no checkpoint (no tracin_manifest.json and no "
            f"{'/'.join(CHECKPOINT_SUFFIXES)} files). Train with TracInCheckpoint(dirpath=...) or "
            "ModelCheckpoint(save_top_k=-1, every_n_epochs=1) first."
        )
    return _sorted_by_step([_read_checkpoint_metadata(path) for path in files])


def _sorted_by_step(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    def key(checkpoint: Checkpoint) -> tuple:
        return (checkpoint.step is None, checkpoint.step or 0, checkpoint.epoch or 0, checkpoint.path.name)

    return sorted(checkpoints, key=key)


def apply_explicit_lr(checkpoints: list[Checkpoint], lr: float | Sequence[float] | None) -> list[Checkpoint]:
    """Replace the checkpoints' learning rates with ``lr``, one value or one per checkpoint.

    Raises:
        ConfigurationError: ``lr`` has a different length than ``checkpoints`` or a negative value.
    """
    if lr is None:
        return checkpoints
    rates = [float(lr)] * len(checkpoints) if isinstance(lr, (int, float)) else [float(value) for value in lr]
    if len(rates) != len(checkpoints):
        raise ConfigurationError(
            f"got {len(rates)} learning rates {rates} for {len(checkpoints)} checkpoints. Pass one rate for "
            "all checkpoints or exactly one per checkpoint, in training order."
        )
    for rate in rates:
        if not rate >= 0:
            raise ConfigurationError(f"learning rate {rate} is invalid; learning rates must be >= 0.")
    return [replace(checkpoint, lr=(rate,), param_groups=None) for checkpoint, rate in zip(checkpoints, rates)]


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file needs arbitrary code to unpickle.
        CheckpointError: the file is not a checkpoint torch can read.
    """
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file {path} does not exist.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():
            raise CheckpointError(
                f"checkpoint {path} is not a file that torch.save wrote (its content does not unpickle). Remove it "
                "from the checkpoint directory or pass only real checkpoint files."
            ) from error
        detail = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), "an unsupported global")
        raise UnsafeCheckpointError(
            f"checkpoint {path} was not loaded because unpickling it would run arbitrary code "
            f"(torch.load with weights_only=True found {detail}). "
            "Re-save only the weights, e.g. torch.save({'state_dict': model.state_dict()}, path), "
            "from an environment you trust."
        ) from error
    except (RuntimeError, EOFError, OSError, IndexError, KeyError, ValueError, TypeError, AttributeError) as error:
        # torch.load raises many types on files it did not write, some with an empty message.
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise CheckpointError(
            f"checkpoint {path} could not be read by torch.load ({reason}). Remove it from the checkpoint "
            "directory or pass only files written by torch.save."
        ) from error
    if not isinstance(content, dict):
        raise CheckpointError(
            f"checkpoint {path} contains a {type(content).__name__}, expected a dict of tensors or a dict "
            "with a 'state_dict' entry."
        )
    return content


def _read_checkpoint_metadata(path: Path) -> Checkpoint:
    content = load_checkpoint_file(path)
    step = content.get("global_step")
    epoch = content.get("epoch")
    lr = _learning_rates(content)
    groups = content.get("param_groups") if "tracin_format_version" in content else None
    if groups is not None:
        groups = tuple(tuple(group) for group in groups)
    return Checkpoint(path, step, epoch, lr, groups)


def _learning_rates(content: dict[str, Any]) -> tuple[float, ...] | None:
    if content.get("lr") is not None:
        return tuple(float(value) for value in content["lr"])
    optimizer_states = content.get("optimizer_states")
    if not optimizer_states:
        return None
    rates = []
    for state in optimizer_states:
        for group in state.get("param_groups", []):
            if "lr" in group:
                rates.append(float(group["lr"]))
    if content.get("lr_schedulers"):
        logger.warning(
            "checkpoint at step %s has an LR scheduler; the rate in its optimizer state is the one after the "
            "last scheduler step, which can be the next epoch's. TracInCheckpoint records the rate that "
            "each step used.",
            content.get("global_step"),
        )
    return tuple(rates) or None


def state_dict_of(content: dict[str, Any], path: Path) -> dict[str, Tensor]:
    """Return the weights of a loaded checkpoint, unwrapped from a 'state_dict' entry when present."""
    state = content.get("state_dict", content)
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise CheckpointError(
            f"checkpoint {path} has no dict of tensors under 'state_dict' or at its top level. Save "
            "model.state_dict(), or a dict with a 'state_dict' entry."
        )
    return state


def match_state_dict(model: nn.Module, state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Map checkpoint tensors to the model's parameter and buffer names, checking every shape.

    Prefixes that wrappers add (``module.`` for DataParallel and DDP, ``_orig_mod.``
    for ``torch.compile``) are removed when the model's own names lack them.

    Raises:
        CheckpointError: a tensor the model needs is missing, or a shape differs. The message
            names the tensor and both shapes.
    """
    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    state = _strip_wrapper_prefixes(state, expected)
    missing = [name for name in expected if name not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is missing tensor {missing[0]!r}"
            + (f" and {len(missing) - 1} more ({missing[1:6]})" if len(missing) > 1 else "")
            + f" that {type(model).__name__} needs. Check that the checkpoint comes from this model."
        )
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint {path}: parameter {name!r} has shape {tuple(state[name].shape)} in the checkpoint "
                f"but {tuple(tensor.shape)} in {type(model).__name__}. The checkpoint comes from a different "
                "architecture; build the model with the hyperparameters it was trained with."
            )
    return {name: state[name] for name in expected}


def _strip_wrapper_prefixes(state: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, Tensor]:
    # Wrappers nest in either order: torch.compile(DDP(model)) saves "_orig_mod.module.*",
    # DDP(torch.compile(model)) saves "module._orig_mod.*".
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(key.startswith(prefix) for key in state) and not any(key.startswith(prefix) for key in expected):
                state = {key[len(prefix):]: value for key, value in state.items()}
                stripped = True
    return state


def load_weights(model: nn.Module, checkpoint: Checkpoint) -> dict[str, Tensor]:
    """Load a checkpoint's parameters and buffers for ``model`` without modifying the model."""
    content = load_checkpoint_file(checkpoint.path)
    return match_state_dict(model, state_dict_of(content, checkpoint.path), checkpoint.path)
