"""Selective scan (Mamba-1): reference loop, chunked torch path, compiled CPU kernel, Triton kernel, dispatch.

``selective_scan`` has the semantics of ``mamba_ssm``'s ``selective_scan_fn`` (METHODS.md §4)::

    δ = softplus(delta + delta_bias)   (or delta + delta_bias)
    x_t = exp(δ_t A) ⊙ x_{t−1} + δ_t B_t u_t        state (B, D, N), float32
    y_t = ⟨x_t, C_t⟩ + D u_t ;  out = y ⊙ silu(z)   in u's dtype

Layers (DESIGN.md "Kernels: four layers per op"): ``selective_scan_reference`` (sequential definition),
``selective_scan_triton`` (Triton forward/backward kernels, Triton imported lazily),
``selective_scan_cpu`` (fused C kernel, built on first use with the system compiler; variable B/C),
``selective_scan_torch`` (chunked closed form, any device) and the dispatcher ``selective_scan``:
CUDA tensors with Triton importable → Triton; CPU tensors with variable B/C and a C compiler → the C
kernel; otherwise torch. ``MEDADAPT_KERNELS=torch|triton|cpu`` forces.
"""

from __future__ import annotations

import torch

from .._dispatch import forced_backend, kernel_backend
from ._validate import MAX_D_STATE, bc_groups, check_scan_inputs
from .cpu_scan import cpu_kernel_available, selective_scan_cpu
from .reference import selective_scan_reference
from .torch_scan import selective_scan_torch
from .triton_scan import selective_scan_triton

__all__ = [
    "MAX_D_STATE",
    "cpu_kernel_available",
    "selective_scan",
    "selective_scan_cpu",
    "selective_scan_reference",
    "selective_scan_torch",
    "selective_scan_triton",
]


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
):
    """Selective scan ``x_t = exp(δ_t A) x_{t−1} + δ_t B_t u_t``, ``y_t = ⟨x_t, C_t⟩ + D u_t``, gated.

    Args:
        u: ``(B, D, L)`` input (float16/bfloat16/float32/float64).
        delta: ``(B, D, L)`` step sizes before ``delta_bias`` and softplus.
        A: ``(D, N)`` state matrix (diagonal per channel), ``N ≤ 256``.
        B, C: ``(D, N)`` fixed, ``(B, N, L)`` variable, or ``(B, G, N, L)`` grouped (channel d uses
            group ``d // (D / G)``); B and C may use different layouts.
        D: ``(D,)`` skip; z: ``(B, D, L)`` gate (``out = y ⊙ silu(z)``); delta_bias: ``(D,)``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the state after the last step, ``(B, D, N)``.
        initial_state: ``(B, D, N)`` state before the first step (default zeros), keyword-only;
            with it a sequence can be scanned piece by piece.

    Returns:
        ``out`` ``(B, D, L)`` in u's dtype, or ``(out, last_state)`` with ``last_state`` in float32
        (float64 for float64 inputs). Differentiable in every tensor argument, including through
        ``last_state``.

    Raises:
        ValueError: mismatched shapes, D not divisible by the groups, ``N > 256``, non-float dtypes
            (and, under ``MEDADAPT_KERNELS=cpu``, CUDA tensors or a fixed B/C).
        RuntimeError: ``MEDADAPT_KERNELS=cpu`` where the C kernel cannot be built (says why).
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if kernel_backend(u, delta, A, B, C, D, z, delta_bias, initial_state) == "triton":
        return selective_scan_triton(*args, initial_state=initial_state)
    if _use_cpu_kernel(u, B, C):
        return selective_scan_cpu(*args, initial_state=initial_state)
    return selective_scan_torch(*args, initial_state=initial_state)


def _use_cpu_kernel(u: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> bool:
    """The C kernel for CPU tensors: always under ``MEDADAPT_KERNELS=cpu`` (its errors then surface),
    under ``auto`` when B and C are variable and the kernel builds here."""
    choice = forced_backend()
    if choice == "cpu":
        return True
    return (choice == "auto" and u.device.type == "cpu" and bc_groups(B) > 0 and bc_groups(C) > 0
            and cpu_kernel_available())
