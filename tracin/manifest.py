r"""The manifest that :class:`tracin.callbacks.TracInCheckpoint` writes next to its checkpoints.

``DIR/tracin_manifest.json`` lists the checkpoints in training order and records
how to rebuild the model and the training data::

    {
      "format_version": 1,
      "module": {"class_path": "pkg.mod.MyModule", "init_args": {...}},
      "datamodule": {"class_path": "pkg.data.MyData", "init_args": {...}} | null,
      "trainer": {"max_epochs": 10, "max_steps": -1, "accumulate_grad_batches": 1, ...} | null,
      "checkpoints": [
        {"file": "step=00000120.pt", "step": 120, "epoch": 1,
         "lr": [0.1, 0.01], "param_groups": [["layer.weight", ...], [...]]},
        ...
      ]
    }

``step`` is the number of optimizer updates applied before the save. ``lr`` has
one entry per optimizer param group: the rate that the last optimizer step
before the save used. ``param_groups`` lists the parameter names of each group,
so a tracer can give each parameter the rate of its own group. ``trainer``
contains the Trainer settings that ``tracin verify`` retrains with. Manifests
written before it existed have none.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tracin.errors import CheckpointError

MANIFEST_NAME = "tracin_manifest.json"
MANIFEST_FORMAT_VERSION = 1


@dataclass
class ManifestEntry:
    """One checkpoint in the manifest."""

    file: str
    step: int
    epoch: int
    lr: list[float] | None
    param_groups: list[list[str]] | None = None


@dataclass
class ClassSpec:
    """Import path and constructor arguments of a class, in LightningCLI's form."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """Checkpoints of one training run, the classes needed to rebuild it, and its Trainer settings."""

    checkpoints: list[ManifestEntry] = field(default_factory=list)
    module: ClassSpec | None = None
    datamodule: ClassSpec | None = None
    trainer: dict[str, Any] | None = None
    format_version: int = MANIFEST_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=json_fallback)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        version = data.get("format_version")
        if version != MANIFEST_FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has format_version {version!r}, but this tracin reads version "
                f"{MANIFEST_FORMAT_VERSION}. Upgrade tracin or retrain with the installed version."
            )
        entries = [ManifestEntry(**entry) for entry in data.get("checkpoints", [])]
        module = ClassSpec(**data["module"]) if data.get("module") else None
        datamodule = ClassSpec(**data["datamodule"]) if data.get("datamodule") else None
        return cls(checkpoints=entries, module=module, datamodule=datamodule, trainer=data.get("trainer"))


def json_fallback(value: Any) -> Any:
    """Convert values that json cannot encode: tensors and numpy scalars to lists, the rest to repr."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


def read_manifest(directory: str | os.PathLike) -> Manifest | None:
    """Read ``DIR/tracin_manifest.json``, or return None when the directory has none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"manifest {path} is not valid JSON ({error}). Restore it from the training run "
            "or delete it to trace the checkpoint files without a manifest."
        ) from error
    return Manifest.from_dict(data, source=str(path))


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    """Write the manifest atomically: to a temporary name first, then rename it into place."""
    path = Path(directory) / MANIFEST_NAME
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(manifest.to_json())
    os.replace(temporary, path)
    return path
