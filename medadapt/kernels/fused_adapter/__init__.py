"""Fused bottleneck adapter: reference, Triton kernel (forward + backward), autograd.Functions, dispatch.

``fused_adapter(x, w_down, b_down, w_up, b_up, scale=1.0, residual=None, activation="gelu")`` computes
``residual + scale · (act(x W_downᵀ + b_down) W_upᵀ + b_up)``; Triton is imported only when it runs.
"""

from .dispatch import MAX_TRITON_HIDDEN, fused_adapter, fused_adapter_backend
from .reference import ACTIVATIONS, activation_fn, fused_adapter_reference

__all__ = [
    "ACTIVATIONS",
    "MAX_TRITON_HIDDEN",
    "activation_fn",
    "fused_adapter",
    "fused_adapter_backend",
    "fused_adapter_reference",
]
