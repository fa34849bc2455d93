r"""Lightning callback that saves the checkpoints a TracInCP run needs.

TracInCP sums, over checkpoints taken along training, the learning rate times the
dot product of a train gradient and a test gradient. A checkpoint is therefore
only useful together with the learning rate of the optimizer step that produced
it, and :class:`TracInCheckpoint` records that rate next to the weights::

    dirpath/
      step=00000120.pt        # torch.save of a dict that loads with weights_only=True
      step=00000240.pt
      tracin_manifest.json    # checkpoints in training order, model and datamodule classes,
                              # and the Trainer settings that `tracin verify` retrains with

Each ``.pt`` file contains::

    {"tracin_format_version": 1,
     "state_dict": {name: tensor on CPU},
     "global_step": int,                  # optimizer updates applied before the save
     "epoch": int,                        # 0-based epoch of the last of those updates
     "lr": [float, ...] | None,           # one rate per optimizer param group
     "param_groups": [[name, ...], ...]}  # parameter names of each group
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import AcceleratorRegistry
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.utilities.rank_zero import WarningCache

from tracin.errors import CheckpointError, ConfigurationError
from tracin.manifest import (
    ClassSpec,
    Manifest,
    ManifestEntry,
    json_fallback,
    read_manifest,
    write_manifest,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1


class TracInCheckpoint(Callback):
    """Callback that saves checkpoints with the learning rates of their last optimizer step, and a manifest.

    Saves are independent of validation metrics and work without a validation
    loop. The callback keeps every checkpoint and deletes none. It saves nothing at
    step 0, before the first update, and nothing under ``fast_dev_run``. Only global
    rank 0 writes files, and no hook runs a collective operation.

    The learning rate of a checkpoint is the rate of each param group as used by
    the last optimizer step before the save. Lightning steps epoch-interval
    schedulers before the epoch-end hooks run, so the callback records the rates in
    ``on_before_optimizer_step`` and never reads them at save time. With several
    optimizers (manual optimization), ``lr`` and ``param_groups`` concatenate the
    groups of ``trainer.optimizers`` in order, and ``lr`` is None until each
    optimizer has stepped at least once.

    To resume, pass the same ``dirpath`` and ``trainer.fit(..., ckpt_path=...)``.
    The manifest then continues without duplicates, and it drops checkpoints that an
    earlier run saved after the resumed step. Their files stay on disk.

    Args:
        dirpath: Directory for the checkpoint files and ``tracin_manifest.json``.
        every_n_epochs: Save at the end of every n-th training epoch. This is the
            default, with n=1, when neither interval is given.
        every_n_train_steps: Save when ``trainer.global_step``, the number of
            optimizer steps, reaches a multiple of n. With gradient accumulation,
            several batches share one step, and the step is saved once.
        save_on_train_end: Also save when training ends, unless that step is
            already saved.

    Raises:
        ConfigurationError: Both intervals are given, an interval is not a positive
            int, or ``dirpath`` is empty or an existing file.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        save_on_train_end: bool = True,
    ) -> None:
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise ConfigurationError(
                f"TracInCheckpoint(every_n_epochs={every_n_epochs!r}, "
                f"every_n_train_steps={every_n_train_steps!r}): pass only one of every_n_epochs "
                "and every_n_train_steps. Use every_n_epochs to save at epoch ends, or "
                "every_n_train_steps to save every n optimizer steps."
            )
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None:
                _check_positive_int(name, value)

        self.dirpath = _resolve_dirpath(dirpath)
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.save_on_train_end = save_on_train_end

        self._entries: list[ManifestEntry] = []
        # Rates of each optimizer's param groups at its last step, keyed by its index
        # in trainer.optimizers.
        self._last_lrs: dict[int, list[float]] = {}
        self._last_step_epoch: int | None = None
        self._step_at_previous_batch_end = 0
        self._module_spec: ClassSpec | None = None
        self._datamodule_spec: ClassSpec | None = None
        self._trainer_settings: dict[str, Any] | None = None
        self._warning_cache = WarningCache()

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a Lightning checkpoint, stable across runs with the same dirpath."""
        return self._generate_state_key(dirpath=str(self.dirpath))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Create dirpath on global rank 0 when fitting starts."""
        if stage == "fit" and trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the classes to rebuild and the Trainer settings, then reconcile the manifest with the restored state."""
        # Runs after Lightning restored the callback state and the global step, also
        # for strategies that restore after setup.
        self._step_at_previous_batch_end = trainer.global_step
        self._module_spec = self._class_spec(pl_module, "module")
        datamodule = trainer.datamodule
        self._datamodule_spec = None if datamodule is None else self._class_spec(datamodule, "datamodule")
        self._trainer_settings = _trainer_settings(trainer)
        if trainer.is_global_zero:
            self._reconcile_manifest()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Record the learning rates that the coming optimizer step uses."""
        index = self._optimizer_index(trainer, optimizer)
        if index is None:
            return
        self._last_lrs[index] = [float(group["lr"]) for group in optimizer.param_groups]
        self._last_step_epoch = trainer.current_epoch

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Save when the global step reached a multiple of every_n_train_steps during this batch."""
        step = trainer.global_step
        previous_step = self._step_at_previous_batch_end
        self._step_at_previous_batch_end = step
        if self.every_n_train_steps is None:
            return
        # Compare multiples rather than test step % n, because in manual optimization
        # one batch can apply several optimizer steps and jump over a multiple.
        if step // self.every_n_train_steps > previous_step // self.every_n_train_steps:
            self._save(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save at the end of every every_n_epochs-th epoch."""
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the final weights unless their step is already saved."""
        if self.save_on_train_end:
            self._save(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """Return the saved entries and recorded rates, for Lightning's resumable checkpoints."""
        return {
            "checkpoints": [asdict(entry) for entry in self._entries],
            "last_lrs": {index: list(lrs) for index, lrs in self._last_lrs.items()},
            "last_step_epoch": self._last_step_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the entries and rates that :meth:`state_dict` returned."""
        self._entries = [ManifestEntry(**entry) for entry in state_dict.get("checkpoints", [])]
        self._last_lrs = {int(index): list(lrs) for index, lrs in state_dict.get("last_lrs", {}).items()}
        self._last_step_epoch = state_dict.get("last_step_epoch")

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Append a manifest entry for the current step and, on global rank 0, write its files."""
        # fast_dev_run is a smoke test, and Lightning's ModelCheckpoint skips saving in it too.
        if trainer.fast_dev_run:
            return
        step = trainer.global_step
        # Weights before the first update have no learning rate and would only
        # repeat the initialization.
        if step == 0:
            return
        if self._entries and self._entries[-1].step == step:
            return

        lrs = self._recorded_lrs(trainer)
        entry = ManifestEntry(
            file=f"step={step:08d}.pt",
            step=step,
            epoch=trainer.current_epoch if self._last_step_epoch is None else self._last_step_epoch,
            lr=lrs,
            param_groups=self._param_group_names(trainer, pl_module),
        )
        # Every rank keeps the same entries, so the state in a Lightning checkpoint
        # does not depend on which rank saved it.
        self._entries.append(entry)
        if not trainer.is_global_zero:
            return

        self._write_checkpoint(entry, pl_module)
        self._write_manifest()
        logger.debug("Saved %s at step %d with lr %s", self.dirpath / entry.file, step, lrs)

    def _write_checkpoint(self, entry: ManifestEntry, pl_module: pl.LightningModule) -> None:
        """Write the checkpoint file atomically: to a temporary name first, then rename it into place."""
        # NOTE: under sharded strategies (FSDP, DeepSpeed) the state_dict of rank 0
        # contains only its shard. Only unsharded strategies such as DDP are tested.
        state_dict = {
            name: value.detach().cpu() if isinstance(value, torch.Tensor) else value
            for name, value in pl_module.state_dict().items()
        }
        payload = {
            "tracin_format_version": CHECKPOINT_FORMAT_VERSION,
            "state_dict": state_dict,
            "global_step": entry.step,
            "epoch": entry.epoch,
            "lr": entry.lr,
            "param_groups": entry.param_groups,
        }
        path = self.dirpath / entry.file
        temporary = path.with_name(path.name + ".tmp")
        torch.save(payload, temporary)
        os.replace(temporary, path)

    def _write_manifest(self) -> None:
        manifest = Manifest(
            checkpoints=list(self._entries),
            module=self._module_spec,
            datamodule=self._datamodule_spec,
            trainer=self._trainer_settings,
        )
        write_manifest(self.dirpath, manifest)

    def _reconcile_manifest(self) -> None:
        """Drop manifest entries of an abandoned run after a resume, or warn that a fresh run replaces them."""
        try:
            existing = read_manifest(self.dirpath)
        except CheckpointError as error:
            self._warning_cache.warn(f"Replacing the unreadable manifest in {self.dirpath}: {error}")
            existing = None

        if not self._entries:
            if existing is not None and existing.checkpoints:
                self._warning_cache.warn(
                    f"{self.dirpath} already has a manifest with {len(existing.checkpoints)} checkpoints "
                    "from an earlier run, and this run replaces it at its first save. To keep it, pass "
                    "another dirpath, or resume the earlier run with trainer.fit(..., ckpt_path=...)."
                )
            return

        last_step = self._entries[-1].step
        if existing is not None:
            abandoned = [entry.file for entry in existing.checkpoints if entry.step > last_step]
            if abandoned:
                logger.info(
                    "Resuming at step %d: dropping %d checkpoints saved after it by an abandoned run "
                    "from the manifest in %s (%s). Their files stay on disk.",
                    last_step,
                    len(abandoned),
                    self.dirpath,
                    ", ".join(abandoned),
                )
        self._write_manifest()

    def _optimizer_index(self, trainer: pl.Trainer, optimizer: Any) -> int | None:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        for index, candidate in enumerate(trainer.optimizers):
            if candidate is optimizer:
                return index
        self._warning_cache.warn(
            f"TracInCheckpoint received an optimizer step from {type(optimizer).__name__}, which is not "
            "in trainer.optimizers, so its learning rates are not recorded. Return every optimizer "
            "from configure_optimizers."
        )
        return None

    def _recorded_lrs(self, trainer: pl.Trainer) -> list[float] | None:
        """Concatenate the recorded rates of all optimizers, or return None if one has not stepped."""
        if not self._last_lrs:
            return None
        missing = [index for index in range(len(trainer.optimizers)) if index not in self._last_lrs]
        if missing:
            self._warning_cache.warn(
                f"Optimizers {missing} of trainer.optimizers have not stepped yet, so the checkpoint "
                "records no learning rate. Pass the learning rate to the tracer explicitly."
            )
            return None
        return [lr for index in range(len(trainer.optimizers)) for lr in self._last_lrs[index]]

    def _param_group_names(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[list[str]]:
        """List the parameter names of each optimizer param group, in the order of the recorded rates."""
        name_of = {id(parameter): name for name, parameter in pl_module.named_parameters()}
        groups: list[list[str]] = []
        for index, optimizer in enumerate(trainer.optimizers):
            # Groups added after the last step (add_param_group, e.g. for unfreezing)
            # took no part in it and have no recorded rate. Leaving them out keeps
            # one name list per rate.
            count = len(self._last_lrs[index]) if index in self._last_lrs else len(optimizer.param_groups)
            for group in optimizer.param_groups[:count]:
                names = [name_of[id(parameter)] for parameter in group["params"] if id(parameter) in name_of]
                if len(names) < len(group["params"]):
                    self._warning_cache.warn(
                        f"Optimizer {index} updates {len(group['params']) - len(names)} parameters that "
                        f"are not in {type(pl_module).__name__}.named_parameters(), so the checkpoint "
                        "has no name or weights for them."
                    )
                groups.append(names)
        return groups

    def _class_spec(self, instance: Any, role: str) -> ClassSpec:
        """Describe how to rebuild a module or datamodule: its import path and saved hyperparameters."""
        cls = type(instance)
        class_path = f"{cls.__module__}.{cls.__qualname__}"
        if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
            self._warning_cache.warn(
                f"The {role} class {class_path} cannot be imported by path, so the manifest cannot "
                "rebuild it. Define the class at the top level of an importable module."
            )
        init_args = _json_safe(dict(getattr(instance, "hparams", {})))
        if not init_args and _init_has_arguments(cls):
            self._warning_cache.warn(
                f"The {role} {class_path} saved no hyperparameters, so the manifest records no init "
                "args and it cannot be rebuilt from them. Call self.save_hyperparameters() in its "
                "__init__."
            )
        return ClassSpec(class_path=class_path, init_args=init_args)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"TracInCheckpoint({name}={value!r}): {name} must be a positive int, got {value!r}. "
            f"Pass for example {name}=1, or leave it out."
        )


def _resolve_dirpath(dirpath: str | os.PathLike[str]) -> Path:
    text = os.fspath(dirpath)
    if not text:
        raise ConfigurationError(
            "TracInCheckpoint(dirpath=''): dirpath must name a directory for the checkpoints, got ''."
        )
    # An absolute path keeps state_key the same when a resumed run starts in
    # another working directory.
    path = Path(os.path.realpath(os.path.expanduser(text)))
    if path.exists() and not path.is_dir():
        raise ConfigurationError(
            f"TracInCheckpoint(dirpath={text!r}): {path} is a file, but dirpath must be a directory. "
            "Pass a new or existing directory."
        )
    return path


def _trainer_settings(trainer: pl.Trainer) -> dict[str, Any]:
    """Return the Trainer settings that decide which updates a retraining applies, as JSON values."""
    accelerator_class = type(trainer.accelerator)
    # The registry name ("cpu", "cuda", "mps", "tpu") is what pl.Trainer(accelerator=...) accepts.
    accelerator = next(
        (name for name, entry in AcceleratorRegistry.items() if entry["accelerator"] is accelerator_class),
        f"{accelerator_class.__module__}.{accelerator_class.__qualname__}",
    )
    algorithm = trainer.gradient_clip_algorithm
    return {
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
        "limit_train_batches": trainer.limit_train_batches,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": trainer.gradient_clip_val,
        "gradient_clip_algorithm": None if algorithm is None else str(getattr(algorithm, "value", algorithm)),
        "precision": str(trainer.precision),
        "accelerator": accelerator,
        "num_devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
    }


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """Convert hyperparameters to JSON types: tensors to lists, other unknown objects to their repr."""
    return json.loads(json.dumps(values, default=json_fallback))


def _init_has_arguments(cls: type) -> bool:
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return False
    named_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(
        name != "self" and parameter.kind in named_kinds for name, parameter in signature.parameters.items()
    )
