"""Accuracy of projected gradients against exact ones on MNIST, for several projection dimensions.

Command (about 10 minutes on 2 CPU cores)::

    python benchmarks/projection_error.py --n-train 2000 --n-test 100 --dims 256 1024 4096

It trains an MLP 784-1024-256-10 (about 1.07M parameters) for one epoch on the
first 10,000 MNIST train images, saving 2 checkpoints with ``TracInCheckpoint``.
For ``--n-train`` train and ``--n-test`` test images it then computes exact
influence (per-example gradients formed batch by batch, never stored) and the
same with train gradients stored projected to k dimensions per parameter, and
reports for each k:

* the relative error of projected against exact influence, ``||A - E|| / ||E||``
  over the ``(n_test, n_train)`` matrix, and the median relative error per entry;
* the Spearman correlation of self-influence rankings (exact ``sum lr ||g||^2``
  against ``sum lr ||P g||^2``);
* the mean overlap of the top-10 proponents.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from scipy.stats import spearmanr
from torch.utils.data import Subset

from tracin import discover_checkpoints, trace_self_influence
from tracin.callbacks import TracInCheckpoint
from tracin.demo.datamodule import ImageClassificationDataModule
from tracin.demo.models import MLP
from tracin.influence import InfluenceContext, ensure_train_gradients, influence_matrix, test_gradients
from tracin.projection import ProjectionSpec
from tracin.store import GradientReader


def train_wide_mlp(directory: Path) -> tuple[MLP, ImageClassificationDataModule]:
    pl.seed_everything(0)
    datamodule = ImageClassificationDataModule(dataset="mnist", train_size=10_000, batch_size=128)
    model = MLP(hidden=1024, lr=0.05)
    # A second hidden layer makes the model about 1M parameters, like the speed benchmark's wide MLP.
    model.net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256),
        torch.nn.ReLU(), torch.nn.Linear(256, 10),
    )
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[TracInCheckpoint(dirpath=directory, every_n_train_steps=40,
                                                     save_on_train_end=True)])
    trainer.fit(model, datamodule)
    return model, datamodule


def exact_influence(context: InfluenceContext, train, test, n_test: int, block: int = 250) -> np.ndarray:
    """Exact influence (n_test, n_train) with formed gradients, one train block at a time."""
    test_grads, _, _ = test_gradients(context, test, np.arange(n_test))
    matrix = np.zeros((n_test, len(train)))
    for start in range(0, len(train), block):
        indices = np.arange(start, min(start + block, len(train)))
        train_grads, _, _ = test_gradients(context, train, indices)
        for position, (test_block, train_block) in enumerate(zip(test_grads, train_grads)):
            weighted = test_block.double() * context.lr_vector(position)
            matrix[:, indices] += (weighted @ train_block.double().T).numpy()
    return matrix


def projected_self_influence(store: Path, context: InfluenceContext) -> np.ndarray:
    with GradientReader(store) as reader:
        n_train = reader.group["0000"].shape[0]
        scores = np.zeros(n_train)
        for position in range(reader.n_checkpoints):
            grads = torch.from_numpy(reader.block(position, 0, n_train)).double()
            scores += ((grads * grads) @ context.lr_vector(position)).numpy()
    return scores


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    top_a = np.argsort(-a, axis=1)[:, :k]
    top_b = np.argsort(-b, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        model, datamodule = train_wide_mlp(scratch / "checkpoints")
        checkpoints = discover_checkpoints(scratch / "checkpoints")
        train = Subset(datamodule.trace_dataset("train"), range(args.n_train))
        test = datamodule.trace_dataset("test")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"trained MLP with {n_params} parameters, {len(checkpoints)} checkpoints "
              f"in {time.perf_counter() - started:.0f} s")

        exact_store = scratch / "exact.h5"
        summary = trace_self_influence(model, checkpoints, train, exact_store, batch_size=250)
        exact_self = summary.run.train["self_influence"]
        context = InfluenceContext.build(model, checkpoints, batch_size=250)
        started = time.perf_counter()
        exact = exact_influence(context, train, test, args.n_test)
        print(f"exact influence {exact.shape} in {time.perf_counter() - started:.0f} s")

        print("| k per parameter | stored dimensions | relative error of influence (matrix) | median relative error "
              "per entry | Spearman of self-influence | top-10 proponent overlap | time (s) |")
        print("|---|---|---|---|---|---|---|")
        for dim in args.dims:
            store = scratch / f"projected-{dim}.h5"
            trace_self_influence(model, checkpoints, train, store, batch_size=250)
            projected_context = InfluenceContext.build(model, checkpoints, batch_size=250,
                                                       projection=ProjectionSpec(dim, seed=0))
            started = time.perf_counter()
            ensure_train_gradients(store, projected_context, train)
            approx = influence_matrix(store, projected_context, test, range(args.n_test))
            elapsed = time.perf_counter() - started
            relative = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
            per_entry = np.median(np.abs(approx - exact) / np.maximum(np.abs(exact), 1e-12))
            rho = spearmanr(projected_self_influence(store, projected_context), exact_self).statistic
            overlap = top_overlap(approx, exact)
            print(f"| {dim} | {sum(projected_context.gradient_sizes())} | {relative:.3f} | {per_entry:.3f} | "
                  f"{rho:.4f} | {overlap:.2f} | {elapsed:.0f} |")


if __name__ == "__main__":
    main()
