"""Linear datamodeling score (LDS) of TracInCP on MNIST, as defined for TRAK.

Command (about 5 to 10 minutes on 2 CPU cores)::

    python benchmarks/lds.py --n-train 5000 --n-test 200 --subsets 24 --epochs 5

Steps:

1. Train the demo MLP (784-128-10) on the first ``--n-train`` MNIST train images with
   ``TracInCheckpoint`` (one checkpoint per epoch) and compute the influence matrix
   tau of shape ``(n_test, n_train)`` for the first ``--n-test`` test images: exact, and
   with train gradients projected to k dimensions per parameter for each ``--dims``.
2. Train ``--subsets`` models from scratch, each on a random half S_j of the train
   images (the same hyperparameters and epochs, seed j), and record each test
   image's loss L_j(x).
3. The prediction for subset j is g_j(x) = -sum over i in S_j of tau(x, i): a
   proponent (tau > 0) lowers the test loss, so more proponents predict a lower
   loss. LDS(x) is the Spearman correlation over subsets of L_j(x) and g_j(x); the
   score is its mean over test images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, Subset

from tracin import discover_checkpoints, trace_self_influence
from tracin.callbacks import TracInCheckpoint
from tracin.demo.datamodule import ImageClassificationDataModule
from tracin.demo.models import MLP
from tracin.influence import InfluenceContext, ensure_train_gradients, influence_matrix
from tracin.projection import ProjectionSpec

MODEL_ARGS = {"hidden": 128, "lr": 0.05}
BATCH_SIZE = 64


def trainer(epochs: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))


def train_on(train, indices: np.ndarray, seed: int, epochs: int) -> MLP:
    pl.seed_everything(seed, verbose=False)
    model = MLP(**MODEL_ARGS)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(Subset(train, indices.tolist()), batch_size=BATCH_SIZE, shuffle=True, generator=generator)
    trainer(epochs).fit(model, train_dataloaders=loader)
    return model


def test_losses(model: MLP, test, n_test: int) -> np.ndarray:
    x, y = zip(*(test[i] for i in range(n_test)))
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(torch.stack(x)), torch.stack(y), reduction="none").numpy()


def linear_datamodeling_score(tau: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """LDS per test example: Spearman over subsets of actual loss and -sum of influence, shape ``(n_test,)``."""
    predicted = -(masks.astype(np.float64) @ tau.T)  # (n_subsets, n_test)
    return np.array([spearmanr(predicted[:, t], losses[:, t]).statistic for t in range(tau.shape[0])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--subsets", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--dims", type=int, nargs="*", default=[1024])
    args = parser.parse_args()
    started = time.perf_counter()

    datamodule = ImageClassificationDataModule(dataset="mnist", train_size=args.n_train, batch_size=BATCH_SIZE)
    train = datamodule.trace_dataset("train")
    test = datamodule.trace_dataset("test")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        pl.seed_everything(0, verbose=False)
        model = MLP(**MODEL_ARGS)
        generator = torch.Generator().manual_seed(0)
        loader = DataLoader(train, batch_size=BATCH_SIZE, shuffle=True, generator=generator)
        trainer(args.epochs, [TracInCheckpoint(dirpath=scratch / "checkpoints")]).fit(model, train_dataloaders=loader)
        checkpoints = discover_checkpoints(scratch / "checkpoints")

        variants = {"exact": None, **{f"projected k={dim}": ProjectionSpec(dim, seed=0) for dim in args.dims}}
        taus = {}
        for name, projection in variants.items():
            store = scratch / f"{name.replace(' ', '_')}.h5"
            trace_self_influence(model, checkpoints, train, store, batch_size=250)
            context = InfluenceContext.build(model, checkpoints, batch_size=250, projection=projection)
            ensure_train_gradients(store, context, train)
            taus[name] = influence_matrix(store, context, test, range(args.n_test))
        traced = time.perf_counter()

        rng = np.random.default_rng(0)
        masks = np.zeros((args.subsets, args.n_train), dtype=bool)
        losses = np.zeros((args.subsets, args.n_test))
        for subset in range(args.subsets):
            chosen = rng.choice(args.n_train, size=args.n_train // 2, replace=False)
            masks[subset, chosen] = True
            losses[subset] = test_losses(train_on(train, np.sort(chosen), seed=100 + subset, epochs=args.epochs),
                                         test, args.n_test)
        retrained = time.perf_counter()

    print(f"{args.n_train} train, {args.n_test} test images, {len(checkpoints)} checkpoints, "
          f"{args.subsets} subsets of {args.n_train // 2}")
    print("| attribution | LDS (mean over test images) | std | share of test images with LDS > 0 |")
    print("|---|---|---|---|")
    for name, tau in taus.items():
        scores = linear_datamodeling_score(tau, masks, losses)
        print(f"| TracInCP, {name} | {np.nanmean(scores):.3f} | {np.nanstd(scores):.3f} | {np.mean(scores > 0):.2f} |")
    random_tau = np.random.default_rng(1).standard_normal(taus["exact"].shape)
    scores = linear_datamodeling_score(random_tau, masks, losses)
    print(f"| random scores | {np.nanmean(scores):.3f} | {np.nanstd(scores):.3f} | {np.mean(scores > 0):.2f} |")
    print(f"tracing {traced - started:.0f} s, retraining {retrained - traced:.0f} s, "
          f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
