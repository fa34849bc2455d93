"""Run the demo: train on MNIST with flipped labels, trace self-influence, and score the ranking.

Usage: ``python -m tracin.demo [--config configs/mnist_demo.yaml] [--epochs N] [--train-size N]``

It trains the config's LightningModule with ``TracInCheckpoint``, runs the real
``tracin score`` command on the checkpoints, and reports how many of the truly
flipped labels each ranking puts in its top 10% and top 20%: self-influence,
area under the margin, loss at the last checkpoint, and a random ranking.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from tracin.config import import_class, instantiate, read_config
from tracin.errors import ConfigurationError
from tracin.store import read_run

DEFAULT_CONFIG = Path("configs/mnist_demo.yaml")


def recall_at(order: np.ndarray, flipped: np.ndarray, fraction: float) -> float:
    """Return the fraction of flipped examples among the first ``fraction`` of ``order``."""
    checked = order[: int(round(fraction * len(order)))]
    return float(np.isin(flipped, checked).mean()) if len(flipped) else float("nan")


def rankings(train: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """Return row orders, most suspicious first, for each ranking the demo compares."""
    scores = np.nan_to_num(train["self_influence"], nan=np.inf)
    area_under_margin = np.nan_to_num(train["margin"].sum(axis=1), nan=-np.inf)
    last_loss = np.nan_to_num(train["loss"][:, -1], nan=np.inf)
    return {
        "self-influence (TracInCP)": np.argsort(-scores, kind="stable"),
        "area under the margin": np.argsort(area_under_margin, kind="stable"),
        "loss at last checkpoint": np.argsort(-last_loss, kind="stable"),
        "random": np.random.default_rng(seed).permutation(len(scores)),
    }


def train(config_path: Path, epochs: int | None, train_size: int | None) -> tuple[Path, object]:
    """Train the config's model with its callbacks and return the checkpoint directory and datamodule."""
    import pytorch_lightning as pl

    config = read_config(config_path)
    raw = yaml.safe_load(config_path.read_text())
    pl.seed_everything(int(raw.get("seed_everything", 0)), workers=True)
    trainer_args = copy.deepcopy(config.trainer)
    callback_specs = trainer_args.pop("callbacks", []) or []
    if epochs is not None:
        trainer_args["max_epochs"] = epochs
    if train_size is not None:
        config.datamodule.init_args["train_size"] = train_size
    callbacks = [instantiate(_spec(spec)) for spec in callback_specs]
    tracin_callbacks = [c for c in callbacks if type(c).__name__ == "TracInCheckpoint"]
    if not tracin_callbacks:
        raise ConfigurationError(f"{config_path} lists no tracin.callbacks.TracInCheckpoint under trainer.callbacks.")
    model = instantiate(config.module)
    datamodule = instantiate(config.datamodule)
    trainer = pl.Trainer(callbacks=callbacks, logger=False, enable_checkpointing=False, **trainer_args)
    trainer.fit(model, datamodule)
    return Path(tracin_callbacks[0].dirpath), datamodule


def _spec(raw: dict):
    from tracin.manifest import ClassSpec

    import_class(raw["class_path"])
    return ClassSpec(class_path=raw["class_path"], init_args=dict(raw.get("init_args") or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracin.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"LightningCLI YAML (default {DEFAULT_CONFIG})")
    parser.add_argument("--epochs", type=int, help="override trainer.max_epochs")
    parser.add_argument("--train-size", type=int, help="train on the first N train images only")
    parser.add_argument("--top", type=int, default=20, help="rows in the outlier table (default 20)")
    args = parser.parse_args(argv)
    console = Console()

    started = time.perf_counter()
    checkpoint_dir, datamodule = train(args.config, args.epochs, args.train_size)
    trained = time.perf_counter()
    store = checkpoint_dir.parent / "tracin.h5"
    picture = checkpoint_dir.parent / "top_outliers.png"
    command = [sys.executable, "-m", "tracin.cli", "score", str(checkpoint_dir), "--out", str(store),
               "--overwrite", "--top", str(args.top), "--png", str(picture), "--batch-size", "256"]
    console.print(f"\n$ tracin score {checkpoint_dir} --out {store} --overwrite --top {args.top} --png {picture}")
    status = subprocess.run(command).returncode
    if status != 0:
        return status
    scored = time.perf_counter()

    run = read_run(store)
    flipped_rows = np.flatnonzero(np.isin(run.train["index"], datamodule.flipped_indices))
    table = Table(title=f"Recall of flipped labels: {len(flipped_rows)} of {len(run.train['index'])} train labels were flipped")
    table.add_column("ranking")
    table.add_column("top 10% of the ranking", justify="right")
    table.add_column("top 20% of the ranking", justify="right")
    for name, order in rankings(run.train).items():
        table.add_row(name, f"{recall_at(order, flipped_rows, 0.1):.1%}", f"{recall_at(order, flipped_rows, 0.2):.1%}")
    console.print(table)
    n_train = len(run.train["index"])
    top_decile = rankings(run.train)["self-influence (TracInCP)"][: int(round(0.1 * n_train))]
    truly = int(np.isin(top_decile, flipped_rows).sum())
    console.print(
        f"Of the {len(top_decile)} examples in the top 10% of the self-influence ranking, {truly} are truly flipped "
        f"({truly / max(len(top_decile), 1):.1%}). Training took {trained - started:.0f} s, tracing "
        f"{scored - trained:.0f} s. Contact sheet: {picture}"
    )
    console.print(
        "Next, ask which train images made the model predict what it did for test images, and check the "
        "answer by retraining:\n"
        f"  tracin influence {store} --test 0:3 --top 8 --png {checkpoint_dir.parent / 'influence.png'}\n"
        f"  tracin verify {checkpoint_dir} --store {store} --test 0 --remove 500 --seeds 3",
        soft_wrap=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
