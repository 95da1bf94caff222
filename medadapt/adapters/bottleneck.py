"""The Med-SA bottleneck adapter and the two ways it attaches to a host submodule.

``Adapter(x) = W_up · act(W_down · x + b_down) + b_up`` with hidden width ``int(mlp_ratio · C)``.
The up-projection is zero-initialised, so an injected model equals its base model until trained.
On CUDA with Triton the fused kernel (``medadapt.kernels.fused_adapter``) computes it in one pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.base import AdapterModule, AdapterWrapper, place_like
from ..kernels import fused_adapter

__all__ = ["BottleneckAdapter", "ParallelAdapterWrapper", "SequentialAdapterWrapper", "hidden_width"]


def hidden_width(dim: int, mlp_ratio: float) -> int:
    """``int(mlp_ratio · dim)``, at least 1."""
    if dim <= 0:
        raise ValueError(f"dim must be > 0, got {dim}")
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
    return max(1, int(mlp_ratio * dim))


class BottleneckAdapter(AdapterModule):
    """``y = residual + scale · (W_up · act(W_down x + b_down) + b_up)`` on the last dimension.

    Args:
        dim: token width C.
        mlp_ratio: hidden width ``int(mlp_ratio · C)`` (Med-SA: 0.25 → 192 for C = 768).
        activation: ``"gelu"`` (exact), ``"gelu_tanh"`` or ``"relu"``.
        skip: add the input back (``x + Adapter(x)``), the sequential adapter.
        scale: multiplies the adapter branch.
        zero_init: zero the up-projection (weight and bias) so the adapter starts as 0.
        out_dim: output width (defaults to ``dim``; ``skip`` needs ``out_dim == dim``).

    Parameters: ``2·C·H + H + C`` (295,872 for C = 768, ratio 0.25).
    """

    def __init__(self, dim: int, mlp_ratio: float = 0.25, activation: str = "gelu", skip: bool = False,
                 scale: float = 1.0, zero_init: bool = True, out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        if skip and out_dim != dim:
            raise ValueError(f"skip=True needs out_dim == dim, got out_dim={out_dim}, dim={dim}")
        if activation not in ("gelu", "gelu_tanh", "relu"):
            raise ValueError(f"activation must be 'gelu', 'gelu_tanh' or 'relu', got {activation!r}")
        self.dim, self.hidden, self.out_dim = dim, hidden_width(dim, mlp_ratio), out_dim
        self.activation, self.skip, self.scale = activation, skip, float(scale)
        self.down = nn.Linear(dim, self.hidden)
        self.up = nn.Linear(self.hidden, out_dim)
        self.reset_parameters(zero_init)

    def reset_parameters(self, zero_init: bool = True) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:
            self.up.reset_parameters()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Adapter of ``x`` (any leading shape); adds ``residual`` (or ``x`` when ``skip``)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension {self.dim}, got shape {tuple(x.shape)}")
        if residual is None and self.skip:
            residual = x
        if not self.adapters_enabled:
            return x.new_zeros(*x.shape[:-1], self.out_dim) if residual is None else residual
        return fused_adapter(x, self.down.weight.to(x.dtype), self.down.bias.to(x.dtype),
                             self.up.weight.to(x.dtype), self.up.bias.to(x.dtype), scale=self.scale,
                             residual=residual, activation=self.activation)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, act={self.activation}, skip={self.skip}, scale={self.scale}"


class SequentialAdapterWrapper(AdapterWrapper):
    """``a = base(x); return a + Adapter(a)``: Med-SA's space adapter after attention.

    Per-token, so it gives the same result on window-partitioned tokens as on whole images.
    """

    def __init__(self, base_layer: nn.Module, dim: int, mlp_ratio: float = 0.25, activation: str = "gelu") -> None:
        super().__init__(base_layer)
        self.adapter = place_like(BottleneckAdapter(dim, mlp_ratio, activation, skip=True), base_layer)

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        return self.adapter(out) if self.adapters_enabled else out


class ParallelAdapterWrapper(AdapterWrapper):
    """``return base(z) + s · Adapter(z)``: Med-SA's parallel adapter beside the MLP (s = 0.5)."""

    def __init__(self, base_layer: nn.Module, dim: int, mlp_ratio: float = 0.25, activation: str = "gelu",
                 scale: float = 0.5) -> None:
        super().__init__(base_layer)
        self.adapter = place_like(BottleneckAdapter(dim, mlp_ratio, activation, scale=scale), base_layer)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(z)
        return self.adapter(z, residual=out) if self.adapters_enabled else out
