"""Selective scan (Mamba-1) as a sequential loop: the definition, float64-capable.

Semantics of ``mamba_ssm``'s ``selective_scan_fn`` (METHODS.md §4):
``δ = softplus(delta + delta_bias)`` (or without softplus), ``x_t = exp(δ_t A) ⊙ x_{t−1} + δ_t B_t u_t``,
``y_t = ⟨x_t, C_t⟩ + D u_t``, ``out = y ⊙ silu(z)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_scan_inputs

__all__ = ["selective_scan_reference"]


def _bc_steps(m: torch.Tensor, dim: int, length: int) -> list[torch.Tensor]:
    """B or C in any accepted layout -> one tensor per step, broadcastable to ``(batch, dim, N)``.

    Steps come from ``unbind`` of the compact tensor (not from slicing an expanded
    ``(B, D, N, L)`` view), so autograd's backward stays linear in L.
    """
    if m.dim() == 2:  # (D, N): fixed over time
        return [m[None]] * length
    if m.dim() == 3:  # (B, N, L): one group
        return [m_t[:, None, :] for m_t in m.unbind(-1)]
    groups = m.shape[1]  # (B, G, N, L): channel d uses group d // (D / G)
    return [m_t.repeat_interleave(dim // groups, dim=1) for m_t in m.unbind(-1)]


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
    *,
    initial_state: torch.Tensor | None = None,
):
    """Sequential selective scan. Shapes: u, delta, z ``(B, D, L)``; A ``(D, N)``;
    B, C ``(D, N)`` | ``(B, N, L)`` | ``(B, G, N, L)``; D, delta_bias ``(D,)``.

    Computes in float32, or float64 when u is float64; returns out in u's dtype and, if asked,
    the last state ``(B, D, N)`` in the compute dtype. ``initial_state`` ``(B, D, N)`` (keyword-only,
    default zeros) is the state before ``t = 0``: running ``[0, s)`` and then ``[s, L)`` from its last
    state equals one run over ``[0, L)``. Differentiable by autograd in every input.

    Raises:
        ValueError: bad shapes or dtypes (see ``_validate.check_scan_inputs``).
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, length = u.shape
    u_c, delta_c, A_c = u.to(cdt), delta.to(cdt), A.to(cdt)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(cdt)[None, :, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    B_steps = _bc_steps(B.to(cdt), dim, length)
    C_steps = _bc_steps(C.to(cdt), dim, length)
    if initial_state is None:
        state = u_c.new_zeros(batch, dim, A.shape[1])
    else:
        state = initial_state.to(cdt)
    ys = []
    for d_t, u_t, B_t, C_t in zip(delta_c.unbind(-1), u_c.unbind(-1), B_steps, C_steps):
        d_t = d_t[:, :, None]
        state = torch.exp(d_t * A_c) * state + d_t * B_t * u_t[:, :, None]
        ys.append((state * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(cdt)[None, :, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(dtype_in)
    return (out, state) if return_last_state else out
