r"""Random projections of per-example gradients, for influence on large models.

A projection :math:`P` with :math:`E[P^\top P] = I` keeps dot products unbiased:
:math:`E[\langle P g, P g' \rangle] = \langle g, g' \rangle`, so influence computed
on projected gradients estimates the exact one with a smaller store.

* The weight of a ``nn.Linear`` or ``nn.Conv*`` layer (``groups=1``) with gradient
  :math:`G = \sum_t \delta_t a_t^\top` of shape ``(d_out, d_in)`` is projected with the
  Kronecker product :math:`P_{out} \otimes P_{in}`:
  :math:`P_{out} G P_{in}^\top = \sum_t (P_{out}\delta_t)(P_{in} a_t)^\top`. The layer's
  input and output gradient are projected separately, so the per-example gradient is
  never formed.
* Any other parameter of more than ``dim`` elements gets a dense Gaussian
  (Johnson-Lindenstrauss) projection to ``dim``.
* A parameter of at most ``dim`` elements is kept exact.

Entries are drawn from :math:`N(0, 1/k)` for a projection to k rows. Each matrix is
generated from the user's seed, the checkpoint's position and the parameter's name,
so train and test gradients of the same checkpoint share it and a rerun draws
the same matrices.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tracin.errors import ConfigurationError

DENSE_COLUMN_BLOCK = 65536


@dataclass(frozen=True)
class ProjectionSpec:
    """Target dimension per parameter and the seed of the projection matrices."""

    dim: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigurationError(f"projection dimension {self.dim} is invalid; pass a positive integer such as 1024.")


@dataclass(frozen=True)
class _Block:
    kind: str  # "kronecker", "dense" or "identity"
    size: int  # elements of the parameter
    out_features: int = 0
    in_features: int = 0
    out_dim: int = 0
    in_dim: int = 0

    @property
    def projected_size(self) -> int:
        if self.kind == "kronecker":
            return self.out_dim * self.in_dim
        return self.size if self.kind == "identity" else self.out_dim


def _kronecker_dims(out_features: int, in_features: int, dim: int) -> tuple[int, int]:
    in_dim = min(in_features, max(1, math.ceil(math.sqrt(dim * in_features / out_features))))
    out_dim = min(out_features, max(1, dim // in_dim))
    return out_dim, in_dim


class Projector:
    """Projects the gradients of the tracked parameters of one model.

    Args:
        model: The traced model; its layer types decide which parameters get a Kronecker projection.
        tracked: Names of the tracked parameters, in order.
        spec: Dimension and seed.
    """

    def __init__(self, model: nn.Module, tracked: list[str], spec: ProjectionSpec):
        self.spec = spec
        self.tracked = list(tracked)
        self.position = 0
        self._matrices: dict[tuple[str, str], Tensor] = {}
        parameters = dict(model.named_parameters())
        kronecker = {}
        for module_name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and getattr(module, "groups", 1) == 1:
                kronecker[f"{module_name}.weight" if module_name else "weight"] = module.weight.shape
        self.blocks: dict[str, _Block] = {}
        for name in self.tracked:
            size = parameters[name].numel()
            if size <= spec.dim:
                self.blocks[name] = _Block("identity", size)
            elif name in kronecker:
                shape = kronecker[name]
                out_features, in_features = shape[0], size // shape[0]
                out_dim, in_dim = _kronecker_dims(out_features, in_features, spec.dim)
                self.blocks[name] = _Block("kronecker", size, out_features, in_features, out_dim, in_dim)
            else:
                self.blocks[name] = _Block("dense", size, out_dim=spec.dim)

    def sizes(self) -> list[int]:
        """Projected dimension of each tracked parameter, in tracked order."""
        return [self.blocks[name].projected_size for name in self.tracked]

    def start_checkpoint(self, position: int) -> None:
        """Switch to the matrices of checkpoint ``position``."""
        if position != self.position:
            self._matrices.clear()
        self.position = position

    def _matrix(self, name: str, part: str, rows: int, columns: int, device: torch.device, dtype: torch.dtype,
                column_start: int = 0) -> Tensor:
        key = (name, f"{part}:{column_start}")
        matrix = self._matrices.get(key)
        if matrix is None or matrix.device != device or matrix.dtype != dtype:
            seed = zlib.crc32(f"{self.spec.seed}/{self.position}/{name}/{part}/{column_start}".encode())
            generator = torch.Generator().manual_seed(seed)
            matrix = torch.randn(rows, columns, generator=generator, dtype=torch.float64) / math.sqrt(rows)
            matrix = matrix.to(device=device, dtype=dtype)
            self._matrices[key] = matrix
        return matrix

    def is_kronecker(self, name: str) -> bool:
        return self.blocks[name].kind == "kronecker"

    def project_factors(self, name: str, inputs: Tensor, output_grads: Tensor) -> Tensor:
        """Project a weight gradient given per position, ``inputs (B, T, d_in)`` and ``output_grads (B, T, d_out)``.

        Returns:
            ``(B, k_out * k_in)``, equal to :meth:`project` of the formed gradient.
        """
        block = self.blocks[name]
        left = self._matrix(name, "out", block.out_dim, block.out_features, inputs.device, inputs.dtype)
        right = self._matrix(name, "in", block.in_dim, block.in_features, inputs.device, inputs.dtype)
        projected_inputs = inputs @ right.T
        projected_grads = output_grads @ left.T
        return torch.einsum("bto,bti->boi", projected_grads, projected_inputs).flatten(1)

    def project(self, name: str, grads: Tensor) -> Tensor:
        """Project formed per-example gradients of one parameter, ``(B, *shape)`` to ``(B, k)``."""
        block = self.blocks[name]
        flat = grads.flatten(1)
        if block.kind == "identity":
            return flat
        if block.kind == "kronecker":
            matrix = flat.reshape(-1, block.out_features, block.in_features)
            left = self._matrix(name, "out", block.out_dim, block.out_features, flat.device, flat.dtype)
            right = self._matrix(name, "in", block.in_dim, block.in_features, flat.device, flat.dtype)
            return (left @ matrix @ right.T).flatten(1)
        projected = torch.zeros(flat.shape[0], block.out_dim, dtype=flat.dtype, device=flat.device)
        for start in range(0, block.size, DENSE_COLUMN_BLOCK):
            stop = min(start + DENSE_COLUMN_BLOCK, block.size)
            matrix = self._matrix(name, "dense", block.out_dim, stop - start, flat.device, flat.dtype, start)
            projected += flat[:, start:stop] @ matrix.T
        return projected
