"""Shared parts of the speed benchmarks: models, data, Captum adapters, the baseline pass and timing.

The benchmark scripts import this module as ``common``. Run them from the
repository root as ``python benchmarks/NAME.py``, because the checkpoint
directories below are relative to it.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from tracin import discover_checkpoints
from tracin.checkpoints import Checkpoint, load_checkpoint_file, state_dict_of
from tracin.demo.datamodule import ImageClassificationDataModule
from tracin.demo.models import MLP
from tracin.rebuild import rebuild_run

DEMO_CHECKPOINTS = Path("runs/mnist_demo/checkpoints")
WIDE_MLP_CHECKPOINTS = Path("runs/mlp_wide/checkpoints")


@dataclass
class Workload:
    """A model, its checkpoints and the MNIST splits that a benchmark traces."""

    name: str
    model: nn.Module
    checkpoints: list[Checkpoint]
    train: Dataset
    test: Dataset


def machine_description() -> dict[str, Any]:
    """Return CPU model, core count, torch and captum versions, threads and the current load average."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import captum

    return {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "captum": captum.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def load_demo_workload(checkpoint_dir: Path = DEMO_CHECKPOINTS) -> Workload:
    """Rebuild the MNIST demo's SmallCNN and data from its checkpoint directory.

    Raises:
        SystemExit: the directory does not exist. The message gives the command that creates it.
    """
    if not checkpoint_dir.is_dir():
        raise SystemExit(f"{checkpoint_dir} does not exist. Train the demo first: python -m tracin.demo")
    run = rebuild_run(checkpoint_dir)
    return Workload("SmallCNN", run.model, discover_checkpoints(checkpoint_dir),
                    run.dataset("train"), run.dataset("test"))


class WideMLP(MLP):
    """MLP 784-1024-256-10 (1,068,810 parameters): large enough that per-example gradients cost memory.

    It reuses the demo MLP's training logic and replaces its network with two hidden layers.
    """

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr=lr, hidden=1024)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 1024),
            nn.ReLU(),
            nn.Linear(1024, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )


def load_wide_mlp_workload(checkpoint_dir: Path = WIDE_MLP_CHECKPOINTS) -> Workload:
    """Train WideMLP for one epoch on the demo's MNIST train set, unless its checkpoints exist.

    The data are the demo's: 60,000 train images with 10% of the labels flipped
    (seed 0). SGD with lr 0.05 and batch size 128 runs 469 steps, and
    ``TracInCheckpoint`` saves at step 235 and at the end of training, so there
    are 2 checkpoints.
    """
    import pytorch_lightning as pl

    from tracin.callbacks import TracInCheckpoint

    datamodule = ImageClassificationDataModule(dataset="mnist", flip_fraction=0.1, seed=0, batch_size=128)
    model = WideMLP()
    if not (checkpoint_dir / "tracin_manifest.json").is_file():
        pl.seed_everything(0)
        callback = TracInCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=235)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
        started = time.perf_counter()
        trainer.fit(model, datamodule)
        print(f"trained WideMLP for 1 epoch in {time.perf_counter() - started:.0f} s; checkpoints in {checkpoint_dir}")
    return Workload("WideMLP", model, discover_checkpoints(checkpoint_dir),
                    datamodule.trace_dataset("train"), datamodule.trace_dataset("test"))


def first(dataset: Dataset, count: int | None) -> Dataset:
    """Return the first ``count`` examples of ``dataset``, or all of it when ``count`` is None or too large."""
    if count is None or count >= len(dataset):
        return dataset
    return Subset(dataset, range(count))


def captum_parameter_names(model: nn.Module) -> list[str]:
    """Return the parameters that Captum's ``sample_wise_grads_per_batch`` computes: those of Conv2d and Linear.

    Captum 0.9.0 (``captum/_utils/sample_gradient.py``, ``SUPPORTED_MODULES``)
    hooks only ``nn.Conv2d`` and ``nn.Linear`` and silently leaves every other
    parameter, such as BatchNorm's weight and bias, out of its gradients.
    """
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            names.extend(f"{module_name}.{local}" for local, _ in module.named_parameters(recurse=False))
    return names


class CaptumCheckpointLoader:
    """``checkpoints_load_func`` for Captum: loads a tracin checkpoint into the model and returns its rate.

    Weights are read from disk once per file and then kept in memory, so Captum,
    which reloads a checkpoint for every train batch in ``influence``, pays no
    file reading. This favors Captum slightly.
    """

    def __init__(self, checkpoints: Sequence[Checkpoint]):
        self.rates: dict[str, float] = {}
        for checkpoint in checkpoints:
            if checkpoint.lr is None or len(set(checkpoint.lr)) != 1:
                raise SystemExit(f"{checkpoint.path} needs one learning rate for Captum, got {checkpoint.lr}.")
            self.rates[str(checkpoint.path)] = float(checkpoint.lr[0])
        self._weights: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def paths(self) -> list[str]:
        return list(self.rates)

    def __call__(self, model: nn.Module, path: str) -> float:
        weights = self._weights.get(path)
        if weights is None:
            weights = state_dict_of(load_checkpoint_file(Path(path)), Path(path))
            self._weights[path] = weights
        model.load_state_dict(weights)
        return self.rates[path]


def captum_model(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` in eval mode for Captum, which loads checkpoints into the model it gets."""
    copied = copy.deepcopy(model)
    copied.eval()
    return copied


def captum_tracincp(workload: Workload, train: Dataset, batch_size: int):
    """Build Captum's TracInCP with per-batch sample-wise gradients and a sum-reduced cross-entropy.

    ``sample_wise_grads_per_batch=True`` requires a loss with reduction "sum" or
    "mean" (Captum 0.9.0, ``_check_loss_fn``); "sum" gives each example's own
    gradient without rescaling.
    """
    from captum.influence import TracInCP

    loader = CaptumCheckpointLoader(workload.checkpoints)
    return TracInCP(
        captum_model(workload.model),
        train,
        checkpoints=loader.paths,
        checkpoints_load_func=loader,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=batch_size,
        sample_wise_grads_per_batch=True,
    )


def plain_backward_pass(workload: Workload, train: Dataset, batch_size: int) -> None:
    """Run the baseline: for every checkpoint, one batched forward and backward of the summed loss per batch.

    The model runs in eval mode, as the tracers run it, and the weights are
    loaded once per checkpoint.
    """
    model = captum_model(workload.model)
    loader = DataLoader(train, batch_size=batch_size, shuffle=False)
    for checkpoint in workload.checkpoints:
        model.load_state_dict(state_dict_of(load_checkpoint_file(checkpoint.path), checkpoint.path))
        for inputs, targets in loader:
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs), targets, reduction="sum")
            loss.backward()


@dataclass
class Timings:
    """Wall times, per-example time ratios to the baseline, and 1-minute load averages, per method."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    load: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def run(self, name: str, function: Callable[[], Any]) -> Any:
        """Time ``function`` once, print the wall time and load average, and return its result."""
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        result = function()
        elapsed = time.perf_counter() - started
        load_after = os.getloadavg()[0]
        self.seconds.setdefault(name, []).append(elapsed)
        self.load.setdefault(name, []).append((load_before, load_after))
        print(f"  {name}: {elapsed:.1f} s (1-minute load average {load_before:.1f} -> {load_after:.1f})", flush=True)
        return result

    def add_ratio(self, name: str, seconds: float, baseline_seconds: float) -> None:
        self.ratios.setdefault(name, []).append(seconds / baseline_seconds)

    def median_seconds(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def median_ratio(self, name: str) -> float:
        return statistics.median(self.ratios[name])


def relative_error(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Return ``|values - reference| / |reference|`` elementwise, with 0/0 counted as 0."""
    values = np.asarray(values, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    difference = np.abs(values - reference)
    scale = np.abs(reference)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(difference == 0, 0.0, difference / scale)


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a Markdown table, ready to paste into docs/benchmarks.md."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
