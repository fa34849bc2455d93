"""Tiny LightningModules, datamodules and data for the callback tests."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES = 6
N_CLASSES = 3


def make_dataset(n_examples: int, seed: int = 0) -> TensorDataset:
    """Build a dataset of random features and class labels, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_examples, N_FEATURES, generator=generator)
    labels = torch.randint(0, N_CLASSES, (n_examples,), generator=generator)
    return TensorDataset(features, labels)


def make_loader(n_examples: int, batch_size: int, seed: int = 0) -> DataLoader:
    """Build a loader in dataset order, so two runs see the same batches."""
    return DataLoader(make_dataset(n_examples, seed), batch_size=batch_size, shuffle=False)


class TinyClassifier(pl.LightningModule):
    """Two linear layers trained with plain SGD.

    Args:
        lr: Learning rate of the body, and of the head unless head_lr is given.
        head_lr: Learning rate of a second param group that contains the head.
        scheduler: None, "step" (StepLR halving the rate every epoch) or "warmup"
            (LambdaLR with factor min(1, s / 4) after s optimizer steps).
    """

    def __init__(self, hidden: int = 4, lr: float = 0.1, head_lr: float | None = None, scheduler: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Linear(N_FEATURES, hidden)
        self.head = nn.Linear(hidden, N_CLASSES)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(features)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, labels = batch
        return F.cross_entropy(self(features), labels)

    def configure_optimizers(self):
        if self.hparams.head_lr is None:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        else:
            groups = [
                {"params": self.body.parameters(), "lr": self.hparams.lr},
                {"params": self.head.parameters(), "lr": self.hparams.head_lr},
            ]
            optimizer = torch.optim.SGD(groups)

        if self.hparams.scheduler is None:
            return optimizer
        if self.hparams.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            interval = "epoch"
        elif self.hparams.scheduler == "warmup":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))
            interval = "step"
        else:
            raise ValueError(f"scheduler must be None, 'step' or 'warmup', got {self.hparams.scheduler!r}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


class TwoOptimizerClassifier(pl.LightningModule):
    """Manual optimization with one SGD optimizer for the body (lr 0.1) and one for the head (lr 0.01)."""

    def __init__(self, hidden: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.body = nn.Linear(N_FEATURES, hidden)
        self.head = nn.Linear(hidden, N_CLASSES)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        features, labels = batch
        body_optimizer, head_optimizer = self.optimizers()
        body_optimizer.zero_grad()
        head_optimizer.zero_grad()
        loss = F.cross_entropy(self.head(torch.tanh(self.body(features))), labels)
        self.manual_backward(loss)
        body_optimizer.step()
        head_optimizer.step()

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.body.parameters(), lr=0.1),
            torch.optim.SGD(self.head.parameters(), lr=0.01),
        ]


class RandomDataModule(pl.LightningDataModule):
    """Random train examples, in dataset order."""

    def __init__(self, n_examples: int = 32, batch_size: int = 8, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.hparams.n_examples, self.hparams.batch_size, self.hparams.seed)


class UnsavedDataModule(pl.LightningDataModule):
    """Datamodule with an init argument that it does not save with save_hyperparameters."""

    def __init__(self, batch_size: int = 8):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return make_loader(32, self.batch_size)


class SingleLogitClassifier(pl.LightningModule):
    """A Linear 6->1 with log_softmax over its one output: every loss is 0 and every gradient is zero.

    All labels are 0. The module defines ``trace_dataset`` itself, so ``tracin score`` can
    rebuild its data without a datamodule.
    """

    def __init__(self, n_examples: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Linear(N_FEATURES, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.body(features), dim=1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, labels = batch
        return F.cross_entropy(self(features), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def trace_dataset(self, split: str = "train") -> TensorDataset:
        features = make_dataset(self.hparams.n_examples).tensors[0]
        return TensorDataset(features, torch.zeros(len(features), dtype=torch.long))
