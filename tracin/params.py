"""Choose the tracked parameters and leave the user's model as it was found."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from tracin.errors import ConfigurationError


def select_parameters(model: nn.Module, patterns: str | Sequence[str] | None = None) -> list[str]:
    """Return the names of the tracked parameters, in ``model.named_parameters()`` order.

    Args:
        model: The traced model.
        patterns: None to track every parameter with ``requires_grad``; otherwise names or
            shell-style globs (``"head.*"``), matched against all parameters, frozen ones included.

    Raises:
        ConfigurationError: no parameter is trainable, or a pattern matches nothing. The message
            lists the valid names.
    """
    all_names = [name for name, _ in model.named_parameters()]
    if patterns is None:
        names = [name for name, param in model.named_parameters() if param.requires_grad]
        if not names:
            raise ConfigurationError(
                f"{type(model).__name__} has no parameter with requires_grad=True, so there is nothing to "
                f"trace. Select parameters by name with params=[...]; valid names: {_format_names(all_names)}."
            )
        return names

    if isinstance(patterns, str):
        patterns = [patterns]
    selected: list[str] = []
    for pattern in patterns:
        matches = [name for name in all_names if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ConfigurationError(
                f"parameter selection {pattern!r} matches no parameter of {type(model).__name__}. "
                f"Valid names: {_format_names(all_names)}."
            )
        selected.extend(name for name in matches if name not in selected)
    return [name for name in all_names if name in selected]


def last_linear_parameters(model: nn.Module) -> list[str]:
    """Return the parameter names (weight, and bias when present) of the last ``nn.Linear`` module registered.

    Raises:
        ConfigurationError: the model has no ``nn.Linear`` module.
    """
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ConfigurationError(
            f"{type(model).__name__} has no nn.Linear module, so --last-layer has nothing to track. "
            "Select parameters with --params instead."
        )
    name, module = last
    return [f"{name}.{local}" if name else local for local, _ in module.named_parameters(recurse=False)]


def _format_names(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


@contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode and restore its flags, buffers and hooks on exit, also after an error.

    The tracer never writes checkpoint weights into the model (it passes them to
    ``torch.func.functional_call``), so parameters need no copy. Buffers are copied
    because a user's forward may update them in place even in eval mode.
    """
    training = {name: module.training for name, module in model.named_modules()}
    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    hooks = {name: _hook_snapshot(module) for name, module in model.named_modules()}
    model.eval()
    try:
        yield
    finally:
        modules = dict(model.named_modules())
        for name, flag in training.items():
            modules[name].training = flag
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad[name])
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if not torch.equal(buffer, buffers[name]):
                    buffer.copy_(buffers[name])
        for name, snapshot in hooks.items():
            _restore_hooks(modules[name], snapshot)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _hook_snapshot(module: nn.Module) -> dict[str, dict]:
    return {attr: dict(getattr(module, attr)) for attr in _HOOK_DICTS if hasattr(module, attr)}


def _restore_hooks(module: nn.Module, snapshot: dict[str, dict]) -> None:
    for attr, hooks in snapshot.items():
        current = getattr(module, attr)
        for key in [key for key in current if key not in hooks]:
            del current[key]
