"""Argument checks shared by every selective-scan path (reference, torch, Triton).

Each failure is a ValueError that names the argument and says what was expected.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_D_STATE", "check_scan_inputs", "bc_groups"]

MAX_D_STATE = 256  # same limit as mamba_ssm's CUDA kernel
_REQUIRED = ("u", "delta", "A", "B", "C")  # None is an error here, not "absent"


def bc_groups(m: torch.Tensor) -> int:
    """Groups of a B/C argument: 0 when fixed ``(D, N)``, 1 for ``(B, N, L)``, G for ``(B, G, N, L)``."""
    return {2: 0, 3: 1}.get(m.dim(), m.shape[1])


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {what} = {expected}, got {tuple(t.shape)}")


def _check_bc(name: str, m: torch.Tensor, batch: int, dim: int, d_state: int, length: int) -> None:
    if m.dim() == 2:
        _check_shape(name, m, (dim, d_state), "(D, N)")
    elif m.dim() == 3:
        _check_shape(name, m, (batch, d_state, length), "(B, N, L)")
    elif m.dim() == 4:
        groups = m.shape[1]
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"{name}: the channel count D = {dim} must be divisible by the groups G = {groups}")
        _check_shape(name, m, (batch, groups, d_state, length), "(B, G, N, L)")
    else:
        raise ValueError(f"{name} must be (D, N), (B, N, L) or (B, G, N, L), got {m.dim()} dimensions")


def check_scan_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[int, int, int, int]:
    """Validate the selective-scan arguments; return ``(batch, dim, length, d_state)``.

    Raises:
        ValueError: a required tensor given as None, a non-float (integer, bool, complex) tensor, a wrong
            shape, ``D`` not divisible by the groups of B or C, ``N > 256``, an empty sequence, or tensors
            on different devices.
    """
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
             "initial_state": initial_state}
    for name, t in named.items():
        if t is not None or name in _REQUIRED:
            _check_float(name, t)
    if u.dim() != 3:
        raise ValueError(f"u must have shape (B, D, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length < 1 or dim < 1 or batch < 1:
        raise ValueError(f"u must have B, D, L >= 1, got shape {tuple(u.shape)}")
    _check_shape("delta", delta, (batch, dim, length), "(B, D, L)")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (D, N) with D = {dim}, got {tuple(A.shape)}")
    d_state = A.shape[1]
    if not 1 <= d_state <= MAX_D_STATE:
        raise ValueError(f"A: the state size N must be between 1 and {MAX_D_STATE}, got {d_state}")
    _check_bc("B", B, batch, dim, d_state, length)
    _check_bc("C", C, batch, dim, d_state, length)
    if D is not None:
        _check_shape("D", D, (dim,), "(D,)")
    if delta_bias is not None:
        _check_shape("delta_bias", delta_bias, (dim,), "(D,)")
    if z is not None:
        _check_shape("z", z, (batch, dim, length), "(B, D, L)")
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (batch, dim, d_state), "(B, D, N)")
    for name, t in named.items():
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}; all tensors must share a device")
    return batch, dim, length, d_state
