"""Rebuild a run's LightningModule and datamodule from a manifest or a LightningCLI config.

Both use LightningCLI's ``class_path``/``init_args`` form, so a user can pass the
YAML file they trained with. jsonargparse, the parser behind LightningCLI,
resolves the class and checks the arguments against its signature.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tracin.errors import ConfigurationError
from tracin.manifest import ClassSpec


@dataclass
class RunConfig:
    """The classes of a training run: model, optional datamodule and Trainer arguments."""

    module: ClassSpec | None
    datamodule: ClassSpec | None = None
    trainer: dict[str, Any] = field(default_factory=dict)


def _class_spec(section: Any, key: str, path: Path) -> ClassSpec | None:
    if section is None:
        return None
    if not isinstance(section, dict) or "class_path" not in section:
        raise ConfigurationError(
            f"config {path}: section {key!r} must have the form "
            f"'{key}: {{class_path: package.module.Class, init_args: {{...}}}}', got {section!r}."
        )
    return ClassSpec(class_path=section["class_path"], init_args=dict(section.get("init_args") or {}))


def read_config(path: str | os.PathLike, text: str | None = None) -> RunConfig:
    """Read the ``model``, ``data`` and ``trainer`` sections of a LightningCLI YAML file.

    Args:
        path: The YAML file, also named in error messages.
        text: The file's content, when it was stored elsewhere (a store keeps its run's config).
    """
    path = Path(path)
    if text is None and not path.is_file():
        raise ConfigurationError(f"config file {path} not found. Pass the YAML file you trained with.")
    try:
        data = yaml.safe_load(text if text is not None else path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigurationError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigurationError(f"config file {path} must hold a mapping with a 'model' section.")
    return RunConfig(
        module=_class_spec(data.get("model"), "model", path),
        datamodule=_class_spec(data.get("data"), "data", path),
        trainer=dict(data.get("trainer") or {}),
    )


def import_class(class_path: str) -> type:
    """Import ``package.module.Class`` and return the class."""
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ConfigurationError(f"class_path {class_path!r} is invalid; write it as package.module.ClassName.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(
            f"could not import module {module_name!r} of class_path {class_path!r}: {error}. Install the package "
            "that defines it, or add its directory to PYTHONPATH."
        ) from error
    target = getattr(module, class_name, None)
    if not isinstance(target, type):
        raise ConfigurationError(f"module {module_name!r} defines no class {class_name!r} (class_path {class_path!r}).")
    return target


def instantiate(spec: ClassSpec) -> Any:
    """Import ``spec.class_path`` and call it with ``spec.init_args``, type-checked by jsonargparse."""
    from jsonargparse import ArgumentParser

    target = import_class(spec.class_path)
    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(target, "target")
        parsed = parser.parse_object({"target": spec.init_args})
        return parser.instantiate(parsed).target
    except Exception as error:  # jsonargparse raises several types; the message names the cause
        raise ConfigurationError(
            f"could not build {spec.class_path} with arguments {spec.init_args!r}: {error}. "
            "Check that the class is importable in this environment and that its arguments match."
        ) from error
