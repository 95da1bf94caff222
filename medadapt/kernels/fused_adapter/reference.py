"""The bottleneck adapter in plain torch: the definition the kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "activation_fn", "fused_adapter_reference", "scaled_matmul"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


def activation_fn(name: str):
    """The activation named ``name`` as a function of a tensor."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda t: F.gelu(t, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def fused_adapter_reference(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    scale: float = 1.0,
    residual: torch.Tensor | None = None,
    activation: str = "gelu",
) -> torch.Tensor:
    """``residual + scale · (act(x W_downᵀ + b_down) W_upᵀ + b_up)``, computed in x's dtype.

    Args:
        x: ``(..., C)`` tokens.
        w_down: ``(H, C)``; b_down: ``(H,)`` or None.
        w_up: ``(C_out, H)``; b_up: ``(C_out,)`` or None.
        scale: multiplies the adapter branch.
        residual: ``(..., C_out)`` added to the result, or None.
        activation: ``"gelu"`` (exact), ``"gelu_tanh"`` or ``"relu"``.
    """
    hidden = activation_fn(activation)(F.linear(x, w_down, b_down))
    out = F.linear(hidden, w_up, b_up)
    if scale != 1.0:
        out = out * scale
    return out if residual is None else residual + out


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha · a b`` with the scaling in the GEMM's epilogue (one rounding)."""
    if alpha == 1.0:
        return a @ b
    return torch.addmm(torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=a.dtype), a, b,
                       beta=0.0, alpha=alpha)
