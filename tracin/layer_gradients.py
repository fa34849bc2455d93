r"""Per-example gradients from layer inputs and output gradients, without ``vmap``.

For examples that do not interact (the model runs in eval mode), one backward
pass of the summed loss gives each example's gradient with respect to each
layer output, :math:`\delta_i = \partial \ell_i / \partial z_i`. With the layer
input :math:`a_i` saved by a forward hook, the per-example gradient follows in
closed form:

* ``nn.Linear``: :math:`\nabla W_i = \sum_t \delta_{i,t} a_{i,t}^\top` over positions t
  (one position for a plain ``(B, in)`` input), :math:`\nabla b_i = \sum_t \delta_{i,t}`;
* ``nn.Conv1d``/``nn.Conv2d``: the same after unfolding the input into patches;
* ``nn.BatchNorm1d``/``nn.BatchNorm2d`` with running statistics:
  :math:`\nabla\gamma_i = \sum_t \delta_{i,t} \hat x_{i,t}`, :math:`\nabla\beta_i = \sum_t \delta_{i,t}`.

The squared norm of :math:`\nabla W_i` needs no per-example gradient either:
:math:`\lVert \nabla W_i \rVert^2 = \sum_{t,t'} (a_t \cdot a_{t'})(\delta_t \cdot \delta_{t'})`,
which is :math:`\lVert a \rVert^2 \lVert \delta \rVert^2` at one position. The
module uses it when it costs less than forming the gradient.

At each checkpoint, the first batch is checked: the per-example gradients must
sum to the batch gradient that autograd computes. A parameter that fails the
check (say a weight also used outside its module, as in tied embeddings) moves
to the ``vmap`` path for the rest of the run, with a warning. A NaN or infinite
example makes the sums non-finite, so the check cannot run on its batch; that
batch takes the ``vmap`` path and the next batch is checked instead. Later
batches skip the check, which saves the backward pass to the weights.

NOTE: a weight used outside its module only on some batches (a data-dependent
branch) is caught only if such a batch comes first at some checkpoint, and
``method="vmap"`` makes no such assumption. Parameters of other layers take the
``vmap`` path from the start, and the log says which path each layer takes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from tracin.gradients import BatchGradients, GradientComputer, _LossModule, batch_size
from tracin.losses import PerExampleLoss, check_per_example
from tracin.projection import Projector

logger = logging.getLogger(__name__)

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, CONVOLUTIONS):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, BATCH_NORMS):
        return module.track_running_stats and module.running_mean is not None
    return False


@dataclass
class _Layer:
    name: str
    module: nn.Module
    params: list[str] = field(default_factory=list)  # local names: "weight", "bias"
    calls: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class LayerGradientComputer:
    """Computes per-example gradients with forward hooks where possible and ``vmap`` for the rest.

    It has the interface of :class:`tracin.gradients.GradientComputer`, plus
    :meth:`squared_norms`, which skips forming per-example gradients.
    """

    def __init__(self, model: nn.Module, loss: PerExampleLoss, tracked: list[str], projector: Projector | None = None):
        self.model = model
        self.loss = loss
        self.tracked = list(tracked)
        self.projector = projector
        self.wrapper = _LossModule(model, loss)
        tracked_set = set(tracked)
        self.layers: dict[str, _Layer] = {}
        for module_name, module in model.named_modules():
            if not _supported(module):
                continue
            local = [local for local, _ in module.named_parameters(recurse=False)
                     if _join(module_name, local) in tracked_set]
            if local:
                self.layers[module_name] = _Layer(module_name, module, local)
        self._fallback: list[str] = []
        self._vmap: GradientComputer | None = None
        self._set_fallback([name for name in tracked if name not in self._covered()])
        for layer in self.layers.values():
            logger.info("layer %s (%s): closed-form per-example gradients", layer.name or "<root>",
                        type(layer.module).__name__)
        self._checked = False
        # Parameters whose per-example gradients summed to autograd's batch gradient on a batch of the
        # current checkpoint. Later batches skip the check, which saves the backward pass to the weights.
        self._verified: set[str] = set()
        self._verified_at: dict[int, set[str]] = {}

    def _covered(self) -> set[str]:
        return {_join(layer.name, local) for layer in self.layers.values() for local in layer.params}

    def _set_fallback(self, names: list[str]) -> None:
        self._fallback = [name for name in self.tracked if name in set(names)]
        self._vmap = GradientComputer(self.model, self.loss, self._fallback) if self._fallback else None
        if self._vmap is not None:
            self._vmap.projector = self.projector
        if self._fallback:
            logger.info("parameters on the vmap path: %s", ", ".join(self._fallback))

    def prepare(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """Detach checkpoint weights; tracked ones get ``requires_grad`` for the batch-gradient check."""
        prepared = {}
        for name, value in weights.items():
            value = value.detach()
            prepared[name] = value.requires_grad_(True) if name in self.tracked else value
        return prepared

    def start_checkpoint(self, position: int) -> None:
        """Switch to checkpoint ``position``: its own set of checked layers, and its projection matrices.

        A checkpoint seen for the first time checks every layer again on its next batch.
        """
        self._verified = self._verified_at.setdefault(position, set())
        if self.projector is not None:
            self.projector.start_checkpoint(position)

    def __call__(self, prepared: dict[str, Tensor], batch: Any) -> BatchGradients:
        """Compute per-example gradients (projected, with a projector), losses and outputs of one batch."""
        mode = "project" if self.projector is not None else "grad"
        losses, outputs, grads = self._layer_pass(prepared, batch, mode)
        return BatchGradients(grads=grads, losses=losses, outputs=outputs)

    def squared_norms(self, prepared: dict[str, Tensor], batch: Any) -> BatchGradients:
        """Return losses, outputs and squared gradient norms ``(B, n_tracked)`` in tracked order, without ``grads``."""
        losses, outputs, norms = self._layer_pass(prepared, batch, "norm")
        squared = torch.stack([norms[name] for name in self.tracked], dim=1)
        return BatchGradients(grads={}, losses=losses, outputs=outputs, squared_norms=squared)

    def _layer_pass(self, prepared: dict[str, Tensor], batch: Any, mode: str):
        """Run one batched forward and backward; return losses, outputs and per-parameter results.

        ``mode`` is ``"grad"`` (per-example gradients), ``"norm"`` (their squared norms) or
        ``"project"`` (projected gradients, ``(B, k)`` per parameter).
        """
        handles = [layer.module.register_forward_hook(self._recorder(layer)) for layer in self.layers.values()]
        try:
            with torch.enable_grad():
                weights = {f"model.{name}": value for name, value in prepared.items()}
                losses, outputs = functional_call(self.wrapper, weights, (batch,))
                if not self._checked:
                    check_per_example(losses, batch_size(batch), self.loss)
                    self._checked = True
                covered = [name for name in self.tracked if name not in self._fallback and name not in self._verified]
                layer_outputs = [output for layer in self.layers.values() for _, output in layer.calls]
                param_inputs = [prepared[name] for name in covered]
                grads = ()
                if layer_outputs and losses.requires_grad:
                    grads = torch.autograd.grad(losses.sum(), layer_outputs + param_inputs, allow_unused=True)
                elif layer_outputs:
                    grads = tuple(None for _ in layer_outputs + param_inputs)
        finally:
            for handle in handles:
                handle.remove()
        output_grads = iter(grads[: len(layer_outputs)])
        batch_grads = dict(zip(covered, grads[len(layer_outputs):]))
        results: dict[str, Tensor] = {}
        sums: dict[str, Tensor] = {}
        for layer in self.layers.values():
            calls = []
            for inputs, output in layer.calls:
                output_grad = next(output_grads)
                calls.append((inputs, torch.zeros_like(output) if output_grad is None else output_grad))
            layer.calls.clear()
            if all(_join(layer.name, local) in self._fallback for local in layer.params):
                continue
            per_layer, per_layer_sums = self._layer_results(layer, calls, mode)
            for local, value in per_layer.items():
                name = _join(layer.name, local)
                if name not in self._fallback:
                    results[name] = value
                    sums[name] = per_layer_sums[local]
        failed, unverified = _check_sums({name: sums[name] for name in covered if name in sums}, batch_grads)
        self._verified.update(name for name in covered if name in sums and name not in failed + unverified)
        if failed:
            logger.warning(
                "per-example gradients of %s do not sum to the batch gradient (the parameter is probably also used "
                "outside its module); computing them with vmap from now on",
                ", ".join(failed),
            )
            self._set_fallback(self._fallback + failed)
            for name in failed:
                results.pop(name)
        detached = {name: value.detach() for name, value in prepared.items()}
        if self._vmap is not None:
            _add_vmap_results(self._vmap, detached, batch, mode, results)
        if unverified:
            # A NaN or infinite example makes the sums non-finite, so the check cannot test the other
            # examples of this batch. vmap computes each example on its own and needs no check.
            logger.debug("batch with non-finite gradients; computing %s with vmap for it", ", ".join(unverified))
            computer = GradientComputer(self.model, self.loss, unverified)
            computer.projector = self.projector
            _add_vmap_results(computer, detached, batch, mode, results)
        outputs = outputs.detach() if isinstance(outputs, Tensor) and outputs.dim() > 1 else None
        ordered = {name: results[name].detach() for name in self.tracked}
        return losses.detach(), outputs, ordered

    def _layer_results(self, layer: _Layer, calls: list[tuple[Tensor, Tensor]], mode: str):
        """Per-example results of one layer's parameters for ``mode``, with their batch sums."""
        name = _join(layer.name, "weight")
        kronecker = (
            mode == "project"
            and "weight" in layer.params
            and not isinstance(layer.module, BATCH_NORMS)
            and self.projector.is_kronecker(name)
        )
        # Once a layer passed the check at this checkpoint, its batch sums are not needed. For the
        # Gram and Kronecker paths they cost as much as the weight gradient of a plain backward pass.
        check = any(_join(layer.name, local) not in self._verified for local in layer.params)
        values, sums = _layer_results(layer, calls, materialize=mode != "norm", form_weight=not kronecker,
                                      check=check)
        if kronecker:
            projected = None
            for inputs, output_grad in calls:
                a, delta = _positions(layer, inputs, output_grad)
                part = self.projector.project_factors(name, a, delta)
                projected = part if projected is None else projected + part
            values["weight"] = projected
        if mode == "project":
            for local in values:
                if not (kronecker and local == "weight"):
                    values[local] = self.projector.project(_join(layer.name, local), values[local])
        return values, sums

    def _recorder(self, layer: _Layer):
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            value = inputs[0].detach()
            if isinstance(module, BATCH_NORMS):
                # Normalize now: inside functional_call the running statistics are the checkpoint's.
                shape = [1, -1] + [1] * (value.dim() - 2)
                mean = module.running_mean.detach().reshape(shape)
                variance = module.running_var.detach().reshape(shape)
                value = (value - mean) / torch.sqrt(variance + module.eps)
            layer.calls.append((value, output))

        return record


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _add_vmap_results(computer: GradientComputer, weights: dict[str, Tensor], batch: Any, mode: str,
                      results: dict[str, Tensor]) -> None:
    """Compute ``computer.tracked`` with vmap and put results for ``mode`` into ``results``."""
    extra = computer(computer.prepare(weights), batch)
    for name, value in extra.grads.items():
        results[name] = value.flatten(1).pow(2).sum(dim=1) if mode == "norm" else value


def _check_sums(sums: dict[str, Tensor], batch_grads: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Compare each parameter's summed per-example gradients with the autograd batch gradient.

    Returns:
        The parameters whose sums differ, and the parameters that this batch cannot check
        because the difference is NaN or infinite.
    """
    failed = []
    unverified = []
    for name, total in sums.items():
        expected = batch_grads.get(name)
        if expected is None:
            expected = torch.zeros_like(total)
        tolerance = (1e-9 if total.dtype == torch.float64 else 1e-4) * (float(expected.norm()) + 1e-30)
        difference = float((total - expected).norm())
        if not math.isfinite(difference):
            unverified.append(name)
        elif difference > tolerance + 1e-30 * total.numel():
            failed.append(name)
    return failed, unverified


def _positions(layer: _Layer, inputs: Tensor, output_grad: Tensor) -> tuple[Tensor, Tensor]:
    """Return inputs ``(B, T, d_in)`` and output gradients ``(B, T, d_out)`` over positions T."""
    module = layer.module
    if isinstance(module, nn.Linear):
        batch = inputs.shape[0]
        return inputs.reshape(batch, -1, inputs.shape[-1]), output_grad.reshape(batch, -1, output_grad.shape[-1])
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
    else:
        patches = F.unfold(inputs.unsqueeze(-1), (module.kernel_size[0], 1), (module.dilation[0], 1),
                           (module.padding[0], 0), (module.stride[0], 1))
    return patches.transpose(1, 2), output_grad.flatten(2).transpose(1, 2)


def _layer_results(layer: _Layer, calls: list[tuple[Tensor, Tensor]], materialize: bool, form_weight: bool = True,
                   check: bool = True):
    """Per-example gradients (or squared norms) and their batch sums for one layer, summed over its calls.

    With ``form_weight=False`` only the batch sum of the weight gradient is formed. With
    ``check=False`` that batch sum is skipped as well, and the weight's sum is None.
    """
    module = layer.module
    if isinstance(module, BATCH_NORMS):
        return _batch_norm_results(layer, calls, materialize)
    groups = getattr(module, "groups", 1)
    weight_grad = weight_sum = bias_grad = None
    single_call = len(calls) == 1
    if not single_call:
        logger.debug("layer %s runs %d times per forward pass; forming its gradients", layer.name, len(calls))
    norms: dict[str, Tensor] = {}
    for inputs, output_grad in calls:
        if isinstance(module, CONVOLUTIONS) and form_weight and not (materialize is False and single_call
                                                                     and groups == 1 and _conv_gram_is_cheaper(module, output_grad)):
            grad = _conv_weight_grads(module, inputs, output_grad)
            weight_grad = grad if weight_grad is None else weight_grad + grad
            bias = output_grad.flatten(2).sum(dim=2)
            bias_grad = bias if bias_grad is None else bias_grad + bias
            continue
        a, delta = _positions(layer, inputs, output_grad)
        gram = materialize is False and single_call and groups == 1 and _gram_is_cheaper(a, delta)
        if not form_weight or gram:
            if check:
                # Only the batch sum of the weight gradient is formed, for the check against autograd.
                total = torch.einsum("bto,bti->oi", delta, a).reshape(module.weight.shape)
                weight_sum = total if weight_sum is None else weight_sum + total
            if gram:
                norms["weight"] = _gram_squared_norm(a, delta)
        else:
            grad = _grouped_outer(a, delta, groups).reshape(-1, *module.weight.shape)
            weight_grad = grad if weight_grad is None else weight_grad + grad
        bias = delta.sum(dim=1)
        bias_grad = bias if bias_grad is None else bias_grad + bias
    values: dict[str, Tensor] = {}
    sums: dict[str, Tensor] = {}
    if "weight" in layer.params:
        if weight_grad is None:
            values["weight"], sums["weight"] = norms.get("weight"), weight_sum
        else:
            values["weight"] = weight_grad if materialize else weight_grad.flatten(1).pow(2).sum(dim=1)
            sums["weight"] = weight_grad.sum(dim=0)
    if "bias" in layer.params:
        values["bias"] = bias_grad if materialize else bias_grad.pow(2).sum(dim=1)
        sums["bias"] = bias_grad.sum(dim=0)
    return values, sums


def _conv_gram_is_cheaper(module: nn.Module, output_grad: Tensor) -> bool:
    positions = output_grad[0, 0].numel()
    return positions * positions * (module.weight[0].numel() + module.out_channels) < (
        positions * module.weight[0].numel() * module.out_channels
    )


def _conv_weight_grads(module: nn.Module, inputs: Tensor, output_grad: Tensor) -> Tensor:
    """Per-example weight gradients of a convolution, ``(B, *weight.shape)``, as one grouped convolution.

    Folding the batch into the channels, with ``groups = B * module.groups``, makes the weight
    gradient of the grouped convolution the stack of the per-example weight gradients.
    """
    batch = inputs.shape[0]
    groups = batch * module.groups
    weight_shape = (batch * module.out_channels, *module.weight.shape[1:])
    folded_inputs = inputs.reshape(1, batch * inputs.shape[1], *inputs.shape[2:])
    folded_grads = output_grad.reshape(1, batch * output_grad.shape[1], *output_grad.shape[2:])
    weight_grad = torch.nn.grad.conv2d_weight if isinstance(module, nn.Conv2d) else torch.nn.grad.conv1d_weight
    grads = weight_grad(folded_inputs, weight_shape, folded_grads, stride=module.stride, padding=module.padding,
                        dilation=module.dilation, groups=groups)
    return grads.reshape(batch, *module.weight.shape)


def _grouped_outer(a: Tensor, delta: Tensor, groups: int) -> Tensor:
    """Sum over positions of delta_t a_t^T per example and group, shape ``(B, d_out, d_in / groups)``."""
    if groups == 1:
        return torch.einsum("bto,bti->boi", delta, a)
    batch, positions, _ = a.shape
    a = a.reshape(batch, positions, groups, -1)
    delta = delta.reshape(batch, positions, groups, -1)
    return torch.einsum("btgo,btgi->bgoi", delta, a).reshape(batch, -1, a.shape[-1])


def _gram_is_cheaper(a: Tensor, delta: Tensor) -> bool:
    positions, d_in, d_out = a.shape[1], a.shape[2], delta.shape[2]
    return positions * positions * (d_in + d_out) < positions * d_in * d_out


def _gram_squared_norm(a: Tensor, delta: Tensor) -> Tensor:
    """Squared norm of sum_t delta_t a_t^T per example, from Gram matrices, shape ``(B,)``."""
    if a.shape[1] == 1:
        return a.pow(2).sum(dim=(1, 2)) * delta.pow(2).sum(dim=(1, 2))
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(delta, delta.transpose(1, 2))).sum(dim=(1, 2))


def _batch_norm_results(layer: _Layer, calls: list[tuple[Tensor, Tensor]], materialize: bool):
    """Per-example gradients of gamma and beta from normalized inputs (recorded by the hook)."""
    weight_grad = bias_grad = None
    for normalized, output_grad in calls:
        inputs = normalized
        reduce = tuple(range(2, inputs.dim()))
        weight = (output_grad * normalized).sum(dim=reduce) if reduce else output_grad * normalized
        bias = output_grad.sum(dim=reduce) if reduce else output_grad
        weight_grad = weight if weight_grad is None else weight_grad + weight
        bias_grad = bias if bias_grad is None else bias_grad + bias
    values: dict[str, Tensor] = {}
    sums: dict[str, Tensor] = {}
    for local, grad in (("weight", weight_grad), ("bias", bias_grad)):
        if local in layer.params:
            values[local] = grad if materialize else grad.pow(2).sum(dim=1)
            sums[local] = grad.sum(dim=0)
    return values, sums
