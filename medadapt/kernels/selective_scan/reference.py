"""Selective scan (Mamba-1) as a sequential loop: the definition, float64-capable.

Semantics of ``mamba_ssm``'s ``selective_scan_fn`` (METHODS.md §4):
``δ = softplus(delta + delta_bias)`` (or without softplus), ``x_t = exp(δ_t A) ⊙ x_{t−1} + δ_t B_t u_t``,
``y_t = ⟨x_t, C_t⟩ + D u_t``, ``out = y ⊙ silu(z)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_reference"]


def _expand_bc(m: torch.Tensor, batch: int, dim: int, length: int) -> torch.Tensor:
    """B or C in any accepted layout -> ``(batch, dim, N, length)``."""
    if m.dim() == 2:  # (D, N): fixed over time
        return m[None, :, :, None].expand(batch, dim, m.shape[1], length)
    if m.dim() == 3:  # (B, N, L): one group
        return m[:, None].expand(batch, dim, m.shape[1], length)
    groups = m.shape[1]  # (B, G, N, L)
    return m.repeat_interleave(dim // groups, dim=1)


def selective_scan_reference(
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
):
    """Sequential selective scan. Shapes: u, delta, z ``(B, D, L)``; A ``(D, N)``;
    B, C ``(D, N)`` | ``(B, N, L)`` | ``(B, G, N, L)``; D, delta_bias ``(D,)``.

    Computes in float32, or float64 when u is float64; returns out in u's dtype and, if asked,
    the last state ``(B, D, N)`` in the compute dtype.
    """
    dtype_in = u.dtype
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, length = u.shape
    u_c, delta_c, A_c = u.to(cdt), delta.to(cdt), A.to(cdt)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(cdt)[None, :, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    B_c = _expand_bc(B.to(cdt), batch, dim, length)
    C_c = _expand_bc(C.to(cdt), batch, dim, length)
    state = u_c.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        d_t = delta_c[:, :, t, None]
        state = torch.exp(d_t * A_c) * state + d_t * B_c[..., t] * u_c[:, :, t, None]
        ys.append((state * C_c[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(cdt)[None, :, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(dtype_in)
    return (out, state) if return_last_state else out
