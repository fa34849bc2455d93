"""Tiny models, data and a brute-force TracInCP reference for the tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

# Tolerances of the exactness checks: float64 agrees to rounding, float32 to accumulated rounding.
RTOL_FLOAT64 = 1e-10
RTOL_FLOAT32 = 1e-5


class TinyMLP(nn.Module):
    def __init__(self, in_features: int = 64, hidden: int = 16, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TinyBatchNormCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.head(x.flatten(1))


class FrozenBackbone(nn.Module):
    """A frozen Linear 4->8 feeding a trainable head 8->2."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        self.backbone.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.backbone(x)))


class SharedLinear(nn.Module):
    """A single Linear 4->4 applied twice in the forward pass."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def digits_dataset(n: int = 120, image: bool = False, dtype=torch.float32) -> TensorDataset:
    """The first ``n`` sklearn 8x8 digits scaled to [0, 1], as (N, 64) or (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:n] / 16.0, dtype=dtype)
    x = x.unsqueeze(1) if image else x.flatten(1)
    return TensorDataset(x, torch.tensor(digits.target[:n], dtype=torch.long))


def random_dataset(n: int, features: int, classes: int, seed: int = 0, dtype=torch.float32) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (n,), generator=generator)
    return TensorDataset(x, y)


def save_checkpoints(model: nn.Module, directory: Path, lrs: Sequence[float], seed: int = 0) -> list[Path]:
    """Save len(lrs) checkpoints of ``model`` with perturbed weights, each with its lr, in TracIn's file format."""
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for step, lr in enumerate(lrs, start=1):
        state = {}
        for name, value in model.state_dict().items():
            if value.is_floating_point() and "running_var" not in name:
                value = value + 0.3 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
            state[name] = value.clone()
        path = directory / f"step={step:08d}.pt"
        torch.save({"tracin_format_version": 1, "state_dict": state, "global_step": step * 10,
                    "epoch": step - 1, "lr": [lr], "param_groups": None}, path)
        paths.append(path)
    return paths


def per_example_gradient(model: nn.Module, state: dict, x, y, names: list[str]) -> torch.Tensor:
    """Gradient of one example's cross-entropy, flattened over ``names``, by plain autograd in float64."""
    model = model.double()
    model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    model.eval()
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(x.double().unsqueeze(0)), y.unsqueeze(0))
    grads = torch.autograd.grad(loss, [params[name] for name in names])
    return torch.cat([g.flatten() for g in grads])


def brute_force_self_influence(model_factory, checkpoint_paths, lrs, dataset, names) -> np.ndarray:
    """Sum over checkpoints of lr * ||g||^2, one example at a time with torch.autograd.grad in float64."""
    scores = np.zeros(len(dataset))
    for path, lr in zip(checkpoint_paths, lrs):
        state = torch.load(path, weights_only=True)["state_dict"]
        model = model_factory()
        for i in range(len(dataset)):
            x, y = dataset[i]
            g = per_example_gradient(model, state, x, y, names)
            scores[i] += lr * float(g @ g)
    return scores


def brute_force_influence(model_factory, checkpoint_paths, lrs, train, test, names) -> np.ndarray:
    """Influence matrix (n_test, n_train) = sum_c lr_c g_test . g_train, one example at a time in float64."""
    matrix = np.zeros((len(test), len(train)))
    for path, lr in zip(checkpoint_paths, lrs):
        state = torch.load(path, weights_only=True)["state_dict"]
        model = model_factory()
        train_grads = torch.stack([per_example_gradient(model, state, *train[i], names) for i in range(len(train))])
        test_grads = torch.stack([per_example_gradient(model, state, *test[i], names) for i in range(len(test))])
        matrix += lr * (test_grads @ train_grads.T).numpy()
    return matrix


def train_checkpoints(model: nn.Module, dataset, directory: Path, lrs: Sequence[float], steps: int = 5,
                      batch_size: int = 16) -> list[Path]:
    """Train ``model`` with plain SGD, ``steps`` full-batch-cycle updates per lr, saving after each lr phase."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    paths = []
    step = 0
    for phase, lr in enumerate(lrs):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            for x, y in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                step += 1
        path = directory / f"step={step:08d}.pt"
        torch.save({"tracin_format_version": 1, "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
                    "global_step": step, "epoch": phase, "lr": [lr], "param_groups": None}, path)
        paths.append(path)
    return paths


class TiedOutput(nn.Module):
    """An ``embed`` Linear 6->4 whose weight is used again as the output layer, 6->4 logits.

    The closed-form gradient of ``embed.weight`` covers only its own module's call, so
    the layer path must detect the second use and compute that weight with vmap.
    """

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 4)
        self.mid = nn.Linear(4, 6)

    def forward(self, x):
        hidden = torch.tanh(self.mid(torch.tanh(self.embed(x))))
        return F.linear(hidden, self.embed.weight)


class SingleLogit(nn.Module):
    """A Linear 4->1 followed by log_softmax over its one output, so every output and gradient is zero."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return torch.log_softmax(self.fc(x), dim=1)


class HookedBatchNormMLP(nn.Module):
    """Linear 6->8, BatchNorm1d, a frozen Linear 8->8 and a head 8->3, for model-state checks."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.frozen = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.frozen(torch.relu(self.bn(self.fc(x))))))


def write_checkpoint(path: Path, state: dict, lr: float | None = 0.1, step: int = 1, **extra) -> Path:
    """Save ``state`` as a checkpoint in TracIn's file format; ``lr=None`` records no learning rate."""
    content = {"tracin_format_version": 1, "state_dict": state, "global_step": step, "epoch": 0,
               "param_groups": None, **extra}
    if lr is not None:
        content["lr"] = [lr]
    torch.save(content, path)
    return path


class GroupedStridedCNN(nn.Module):
    """Convolutions with stride, dilation and groups, and a Conv1d over image rows."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, stride=2, dilation=1, padding=1, groups=2)
        self.rows = nn.Conv1d(4 * 4, 6, 3, padding=2, dilation=2)
        self.head = nn.Linear(6 * 4, classes)

    def forward(self, x):
        x = torch.tanh(self.grouped(torch.tanh(self.conv(x))))  # (B, 4, 4, 4)
        x = torch.tanh(self.rows(x.flatten(1, 2)))  # (B, 6, 4)
        return self.head(x.flatten(1))
