"""Rebuild a training run's model and datasets from its checkpoint directory.

The model and datamodule come from the manifest that ``TracInCheckpoint``
writes, or from a LightningCLI config file, which takes precedence.

Datasets for tracing must be read in a fixed order and without random
augmentation, or scores become noisy. A datamodule provides them by defining
``trace_dataset(split)`` with ``split`` in ``{"train", "test"}``; without it,
tracin falls back to ``setup("fit")`` and the dataset behind
``train_dataloader()`` (or ``setup("test")`` and ``test_dataloader()``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from tracin.config import RunConfig, instantiate, read_config
from tracin.errors import ConfigurationError
from tracin.manifest import Manifest, read_manifest

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass
class RebuiltRun:
    """A training run's model and data, rebuilt from its manifest or config.

    Attributes:
        model: The LightningModule (or other ``nn.Module``) with its initial weights.
        datamodule: The datamodule, or None when the run had none.
        manifest: The checkpoint directory's manifest, or None.
        config_text: The config file's text, or an empty string.
    """

    model: nn.Module
    datamodule: Any
    manifest: Manifest | None
    config_text: str = ""

    def dataset(self, split: str = "train") -> Dataset:
        """Return the un-augmented ``split`` dataset in dataset order."""
        if split not in SPLITS:
            raise ConfigurationError(f"split {split!r} is invalid; expected one of {SPLITS}.")
        for source in (self.datamodule, self.model):
            if source is not None and callable(getattr(source, "trace_dataset", None)):
                return source.trace_dataset(split)
        if self.datamodule is None:
            raise ConfigurationError(
                f"the run records no datamodule, so tracin cannot find its {split} data. Pass --config with a "
                "'data' section, or define trace_dataset(split) on the LightningModule."
            )
        stage = "fit" if split == "train" else "test"
        self.datamodule.setup(stage)
        loader = self.datamodule.train_dataloader() if split == "train" else self.datamodule.test_dataloader()
        logger.warning(
            "%s has no trace_dataset(split); using the dataset behind its %s_dataloader(), which must not "
            "apply random augmentation.",
            type(self.datamodule).__name__,
            split,
        )
        return loader.dataset


def rebuild_run(
    checkpoint_dir: str | os.PathLike,
    config: str | os.PathLike | None = None,
    config_text: str | None = None,
) -> RebuiltRun:
    """Build the model and datamodule of the run whose checkpoints are in ``checkpoint_dir``.

    Args:
        checkpoint_dir: Directory with the checkpoints and, usually, the manifest.
        config: A LightningCLI YAML file; its sections take precedence over the manifest.
        config_text: The text of such a file, as a store records it, instead of ``config``.

    Raises:
        ConfigurationError: neither a manifest nor ``config`` names the model, or a class
            cannot be built.
    """
    manifest = read_manifest(checkpoint_dir)
    if config_text:
        run_config = read_config("<config stored in the run>", text=config_text)
    elif config is not None:
        run_config = read_config(config)
        config_text = Path(config).read_text()
    else:
        run_config = RunConfig(module=None)
    module_spec = run_config.module or (manifest.module if manifest else None)
    if module_spec is None:
        raise ConfigurationError(
            f"{checkpoint_dir} has no tracin_manifest.json naming the model. Pass --config with the "
            "LightningCLI YAML you trained with (a 'model' section with class_path and init_args)."
        )
    datamodule_spec = run_config.datamodule or (manifest.datamodule if manifest else None)
    model = instantiate(module_spec)
    datamodule = instantiate(datamodule_spec) if datamodule_spec is not None else None
    return RebuiltRun(model=model, datamodule=datamodule, manifest=manifest, config_text=config_text or "")
