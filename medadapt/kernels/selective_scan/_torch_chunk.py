"""Closed-form selective scan over one chunk of time steps, forward and backward, in plain torch.

Layout: ``(B, T, G, N, Dg)`` for state-sized tensors and ``(B, T, G, 1, Dg)`` for per-channel ones
(channels split into the groups of B/C), so sums over N are matmuls with contiguous rows and a
cumulative sum over time is a short loop of row additions (``cumsum_time_``).

Within a chunk with ``Δ_t = Σ_{r ≤ t} δ_r`` (chunk-local) and a per-channel centre ``m``
(the midpoint of the chunk's ``Δ_t`` range), let ``G_t = exp(−A (Δ_t − m))``. Then
``h_t = G_t^{-1} (h_{-1} e^{A m} + Σ_{s ≤ t} G_s δ_s u_s B_s)`` and the reverse scan
``dh_t = C_t dy_t + e^{δ_{t+1} A} dh_{t+1}`` is ``dh_t = G_t (Σ_{s ≥ t} C_s dy_s / G_s + κ / G_{T-1})``
with ``κ`` the carry from the next chunk. Chunks are cut so that ``|A| · |Δ_t − m| ≤ EXP_LIMIT``
(``chunk_bounds``), which keeps every ``G`` and ``1/G`` finite: no overflow, no ``0 · inf``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["EXP_LIMIT", "LOG2E", "chunk_bounds", "cumsum_time_", "sum_over_n", "sum_over_channels",
           "chunk_forward", "chunk_backward"]

LOG2E = 1.0 / math.log(2.0)
EXP_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}  # max |A (Δ − m)| inside a chunk
_BLOCK = 8  # chunk lengths are multiples of this where possible (cumsum_time_ is fastest then)


def chunk_bounds(delta_t: torch.Tensor, a_max: torch.Tensor, max_len: int) -> list[tuple[int, int]]:
    """Cut ``[0, L)`` into chunks of at most ``max_len`` steps with bounded exponents.

    Args:
        delta_t: ``(B, L, D)`` effective step sizes δ (after bias and softplus), time-major.
        a_max: ``(D,)`` ``max_n |A_{d,n}|``.
        max_len: the longest chunk.

    Returns:
        ``[(start, end), ...]`` covering ``[0, L)`` such that ``|A| · Σ_{t ∈ chunk} |δ_t| ≤ 2 EXP_LIMIT``
        (or the chunk is a single step), which bounds ``|A (Δ_t − m)|`` by ``EXP_LIMIT`` (m is the centre
        of the chunk's Δ range). ``e^{A m}`` may underflow (correctly, to 0) and overflows only where the
        true state does. Lengths are multiples of 8 unless a single 8-step block is already too long.
    """
    batch, length, dim = delta_t.shape
    limit = 2 * EXP_LIMIT.get(delta_t.dtype, EXP_LIMIT[torch.float32])
    a_max = a_max.to(delta_t.dtype)
    lo, hi = delta_t.amin((0, 1)), delta_t.amax((0, 1))
    step_max = float((torch.maximum(hi, -lo) * a_max).max())
    if step_max * max_len <= limit:
        return [(p, min(p + max_len, length)) for p in range(0, length, max_len)]
    block = _BLOCK if step_max * _BLOCK <= limit else 1
    cost = delta_t if float(lo.min()) >= 0 else delta_t.abs()
    full = length // block
    sums = [cost[:, : full * block].view(batch, full, block, dim).sum(2)]
    if full * block < length:
        sums.append(cost[:, full * block :].sum(1, keepdim=True))
    cum = cumsum_time_(torch.cat(sums, 1).mul_(a_max).to(torch.float64))  # (B, blocks, D)
    count, ends, k0 = cum.shape[1], [], 0
    while k0 < count:
        window = cum[:, k0 : k0 + max(1, max_len // block)]
        if k0 > 0:
            window = window - cum[:, k0 - 1 : k0]
        k0 += max(1, int((window.amax((0, 2)) <= limit).sum()))  # rises only grow with the window
        ends.append(min(k0 * block, length))
    return list(zip([0, *ends[:-1]], ends))


def cumsum_time_(x: torch.Tensor, reverse: bool = False, dim: int = 1) -> torch.Tensor:
    """In-place (reverse) cumulative sum over ``dim``, by row additions in blocks of 8 (fast on CPU)."""
    steps = x.shape[dim]
    if steps % _BLOCK or steps < 2 * _BLOCK:
        rows = x.unbind(dim)
        for t in range(steps - 2, -1, -1) if reverse else range(1, steps):
            rows[t].add_(rows[t + 1] if reverse else rows[t - 1])
        return x
    v = x.view(*x.shape[:dim], steps // _BLOCK, _BLOCK, *x.shape[dim + 1 :])
    cols = v.unbind(dim + 1)  # cols[j]: rows j, j + 8, j + 16, ...
    for j in range(_BLOCK - 2, -1, -1) if reverse else range(1, _BLOCK):
        cols[j].add_(cols[j + 1] if reverse else cols[j - 1])
    blocks = v.unbind(dim)
    edge = (cols[0] if reverse else cols[-1]).unsqueeze(dim + 1).unbind(dim)  # first / last row of each
    for i in range(len(blocks) - 2, -1, -1) if reverse else range(1, len(blocks)):
        blocks[i].add_(edge[i + 1] if reverse else edge[i - 1])
    return x


def sum_over_n(x: torch.Tensor, m: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_n m · x`` -> ``(B, T, G, 1, Dg)``; m is variable ``(B, T, G, N, 1)`` or fixed ``(G, N, Dg)``."""
    if m.dim() == 5:
        return torch.matmul(m.transpose(-1, -2), x, out=out)
    return torch.sum(x * m, 3, keepdim=True, out=out)


def sum_over_channels(x: torch.Tensor, w: torch.Tensor, fixed: bool) -> torch.Tensor:
    """Gradient of a B/C-like argument: ``Σ_dg x · w`` -> ``(B, T, G, N, 1)`` (variable) or
    ``Σ_{b, t} x · w`` -> ``(G, N, Dg)`` (fixed); w is ``(B, T, G, 1, Dg)``."""
    if not fixed:
        return torch.matmul(x, w.transpose(-1, -2))
    return (x * w).sum((0, 1))


def chunk_forward(h0, dcen, mid, du, Bk, A2n, work):
    """States of one chunk.

    Args:
        h0: ``(B, G, N, Dg)`` state before the chunk.
        dcen: ``(B, T, G, 1, Dg)`` centred cumulative step ``Δ_t − m``.
        mid: ``(B, G, 1, Dg)`` the centre ``m``.
        du: ``(B, T, G, 1, Dg)`` ``δ_t u_t``.
        Bk: B for the chunk, ``(B, T, G, N, 1)`` or fixed ``(G, N, Dg)``.
        A2n: ``(G, N, Dg)`` ``−A · log2(e)``.
        work: two ``(B, T, G, N, Dg)`` buffers ``(states, decay)``.

    Returns:
        ``(h, g)``: states ``h_t`` and ``G_t = exp(−A (Δ_t − m))``, both written into ``work``.
    """
    h, g = work
    torch.mul(dcen, A2n, out=g).exp2_()
    torch.mul(Bk, du, out=h).mul_(g)
    h[:, 0].addcdiv_(h0, torch.exp2(A2n * mid))  # + h_{-1} e^{A m}
    cumsum_time_(h)
    return h.div_(g), g


def chunk_backward(h, g, buf, kappa, dy, mid, dk, uk, du, Bk, Ck, A, A2n, grads):
    """Gradients of one chunk, given its recomputed states ``h`` and decays ``g`` (both overwritten;
    ``buf`` is a third work buffer of the same shape).

    ``kappa`` ``(B, G, N, Dg)`` is ``e^{δ_T A} dh_T`` carried from the next chunk (or the gradient of the
    last state). Writes this chunk's ``y`` (= Σ_n C h), ``u``, ``delta`` parts into ``grads`` (out=),
    sets ``grads["B"]``/``grads["C"]`` to the chunk's gradient (variable) or adds to them (fixed),
    adds to ``grads["A"]``; returns ``e^{δ_0 A} dh_0``.
    """
    fixed_b, fixed_c = Bk.dim() == 3, Ck.dim() == 3
    sum_over_n(h, Ck, out=grads["y"])
    dc = sum_over_channels(h, dy, fixed_c)
    grads["C"] = grads["C"] + dc if fixed_c else dc
    rev = torch.mul(Ck, dy, out=buf).div_(g)  # C_s dy_s / G_s
    rev[:, -1].addcdiv_(kappa, g[:, -1])
    cumsum_time_(rev, reverse=True)
    kappa_prev = rev[:, 0] / torch.exp2(A2n * mid)
    dh = rev.mul_(g)
    db = sum_over_channels(dh, du, fixed_b)
    grads["B"] = grads["B"] + db if fixed_b else db
    s1 = sum_over_n(dh, Bk)  # Σ_n dh B
    prod = h.sub_(torch.mul(Bk, du, out=g)).mul_(dh)  # dh ⊙ e^{δ_t A} h_{t-1}
    grads["A"] += torch.mul(prod, dk, out=g).sum((0, 1))
    torch.mul(dk, s1, out=grads["u"])
    torch.mul(uk, s1, out=grads["delta"]).add_(torch.mul(prod, A, out=g).sum(3, keepdim=True))
    return kappa_prev
