"""Small image classifiers for the demo, trained with plain SGD and an epoch-interval StepLR."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from tracin.errors import ConfigurationError

logger = logging.getLogger(__name__)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigurationError(f"{name} must be positive, got {value!r}.")


class _ImageClassifier(pl.LightningModule):
    """Shared training logic: mean cross-entropy, accuracy logging, SGD with StepLR.

    Subclasses build ``self.net``, which maps images of shape
    ``(batch, in_channels, image_size, image_size)`` to logits of shape
    ``(batch, num_classes)``, and call ``self.save_hyperparameters()``.
    """

    net: nn.Module

    def __init__(
        self,
        lr: float,
        momentum: float,
        lr_step_size: int,
        lr_gamma: float,
        in_channels: int,
        num_classes: int,
        image_size: int,
    ) -> None:
        super().__init__()
        _check_positive("lr", lr)
        if momentum < 0:
            raise ConfigurationError(f"momentum must be 0 or more, got {momentum!r}.")
        if lr_step_size < 1:
            raise ConfigurationError(f"lr_step_size must be at least 1 epoch, got {lr_step_size!r}.")
        _check_positive("lr_gamma", lr_gamma)
        if in_channels < 1:
            raise ConfigurationError(f"in_channels must be at least 1, got {in_channels!r}.")
        if num_classes < 2:
            raise ConfigurationError(f"num_classes must be at least 2, got {num_classes!r}.")
        if image_size < 1:
            raise ConfigurationError(f"image_size must be at least 1 pixel, got {image_size!r}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images of shape ``(batch, in_channels, image_size, image_size)`` to logits ``(batch, num_classes)``."""
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{prefix}_loss", loss, prog_bar=True)
        self.log(f"{prefix}_acc", accuracy, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=self.hparams.lr_step_size, gamma=self.hparams.lr_gamma
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class SmallCNN(_ImageClassifier):
    """Two convolution blocks and a linear head, for 28x28 MNIST or 8x8 digits.

    Layers: conv 3x3 (``in_channels`` to ``channels1``) + BatchNorm2d + ReLU + max pool 2,
    conv 3x3 (``channels1`` to ``channels2``) + ReLU + max pool 2, adaptive average
    pooling to ``min(4, image_size // 4)`` pixels a side, then a linear layer to
    ``num_classes`` logits. The adaptive pooling fixes the head's input size, so one
    architecture fits both image sizes: MNIST's 7x7 feature maps become 4x4, and the
    2x2 maps of digits stay 2x2.

    BatchNorm uses batch statistics in train mode, so per-example gradients are only
    independent of the rest of the batch in eval mode.

    Args:
        lr: Learning rate of SGD.
        momentum: Momentum of SGD. 0 gives plain SGD.
        lr_step_size: Epochs between two learning-rate decays of StepLR.
        lr_gamma: Factor applied to the learning rate every ``lr_step_size`` epochs.
            1.0 keeps it constant.
        in_channels: Channels of the input images.
        num_classes: Number of classes, the width of the logits.
        image_size: Height and width of the input images in pixels, at least 4.
        channels1: Output channels of the first convolution.
        channels2: Output channels of the second convolution.

    Raises:
        ConfigurationError: If an argument is out of range.
    """

    def __init__(
        self,
        lr: float = 0.05,
        momentum: float = 0.0,
        lr_step_size: int = 1,
        lr_gamma: float = 1.0,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        channels1: int = 8,
        channels2: int = 16,
    ) -> None:
        super().__init__(lr, momentum, lr_step_size, lr_gamma, in_channels, num_classes, image_size)
        if image_size < 4:
            raise ConfigurationError(
                f"SmallCNN pools twice by 2, so image_size must be at least 4, got {image_size!r}."
            )
        if channels1 < 1 or channels2 < 1:
            raise ConfigurationError(
                f"channels1 and channels2 must be at least 1, got {channels1!r} and {channels2!r}."
            )
        self.save_hyperparameters()

        pooled_size = min(4, image_size // 4)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels1, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels1, channels2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(pooled_size),
            nn.Flatten(),
            nn.Linear(channels2 * pooled_size * pooled_size, num_classes),
        )


class MLP(_ImageClassifier):
    """Flatten, one hidden layer with ReLU, and a linear layer to the logits.

    Args:
        lr: Learning rate of SGD.
        momentum: Momentum of SGD. 0 gives plain SGD.
        lr_step_size: Epochs between two learning-rate decays of StepLR.
        lr_gamma: Factor applied to the learning rate every ``lr_step_size`` epochs.
            1.0 keeps it constant.
        in_channels: Channels of the input images.
        num_classes: Number of classes, the width of the logits.
        image_size: Height and width of the input images in pixels.
        hidden: Width of the hidden layer.

    Raises:
        ConfigurationError: If an argument is out of range.
    """

    def __init__(
        self,
        lr: float = 0.05,
        momentum: float = 0.0,
        lr_step_size: int = 1,
        lr_gamma: float = 1.0,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        hidden: int = 128,
    ) -> None:
        super().__init__(lr, momentum, lr_step_size, lr_gamma, in_channels, num_classes, image_size)
        if hidden < 1:
            raise ConfigurationError(f"hidden must be at least 1, got {hidden!r}.")
        self.save_hyperparameters()

        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
