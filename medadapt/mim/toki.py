"""TOKI: state-space token interpolation of masked tokens (MambaMIM), vectorised.

Sequence ``x (B, L, C)`` in raster order; anchors are the visible positions plus positions 0 and L−1.
A segment runs from an anchor ``i`` (inclusive) to the next anchor ``i + g`` (exclusive; the last anchor
forms a segment of length 1). For ``j = 0 … g−1``:
``x̃_j = (1 − α_j) y_i + α_j y_{i+g}``, ``α_j = j / (g − 1)`` (0 when g = 1), and with ``A ∈ R^{C×C}``

* ``exponent="causal"`` (the paper): ``z_j = Σ_{m≤j} A^{j−m} x̃_m``  (``h_j = A h_{j−1} + x̃_j``);
* ``exponent="official"`` (the public code): ``z_j = Σ_{m≤j} A^{g−1−m} x̃_m``.

Masked positions take ``z``; visible tokens are returned unchanged. At ``A = 0`` the causal form is
linear interpolation between anchors, the official one is zero except at each segment's last token.
(The public code also multiplies the final token by ``A``; here it is a length-1 segment, so it keeps
its value — identical whenever that token is visible or zero-filled.)

Vectorisation: ``x̃`` is linear in the two anchors, so ``z_j = Σ_k w^s_{jk} A^k y_i + w^e_{jk} A^k y_{i+g}``
with scalar weights. The Krylov vectors ``A^k y`` are built for all anchors of all samples at once
(one matmul per power k, over the anchors whose segments are longer than k), then contracted with the
weights. Work is ``O(Σ_anchors depth · C²)`` instead of the public per-gap ``matrix_power`` loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["toki", "toki_grid", "TOKI", "TOKI_EXPONENTS"]

TOKI_EXPONENTS = ("causal", "official")


def _segments(visible: torch.Tensor):
    """Per position: segment start, segment length g, offset j, and anchor mask. All ``(B, L)``."""
    batch, length = visible.shape
    pos = torch.arange(length, device=visible.device).expand(batch, length)
    anchor = visible.clone()
    anchor[:, 0] = True
    anchor[:, -1] = True
    start = torch.where(anchor, pos, -1).cummax(dim=1).values
    next_ge = torch.where(anchor, pos, length).flip(1).cummin(dim=1).values.flip(1)
    next_gt = torch.cat([next_ge[:, 1:], next_ge.new_full((batch, 1), length)], dim=1)
    end = next_gt.gather(1, start)  # next anchor after the segment's start; L for the last anchor
    return start, end, end - start, pos - start, anchor


def _weights(seg_len: torch.Tensor, offset: torch.Tensor, depth: int, exponent: str, dtype):
    """Scalar weights ``(M, depth)`` of ``A^k y_start`` and ``A^k y_end`` in ``z``, per masked token."""
    k = torch.arange(depth, device=seg_len.device)
    g, j = seg_len[:, None], offset[:, None]
    m = j - k if exponent == "causal" else g - 1 - k  # index of the x̃_m that A^k multiplies
    valid = (m >= 0) & (m <= j)
    alpha = m.to(dtype) / (g - 1).clamp(min=1).to(dtype)
    zero = alpha.new_zeros(())
    return torch.where(valid, 1 - alpha, zero), torch.where(valid, alpha, zero)


def toki(x: torch.Tensor, visible: torch.Tensor, A: torch.Tensor, exponent: str = "causal") -> torch.Tensor:
    """Fill the masked tokens of ``x`` by state-space interpolation (see the module docstring).

    Args:
        x: ``(B, L, C)`` tokens in raster order (masked positions hold anything, e.g. zeros).
        visible: ``(B, L)`` bool, True where the token was seen by the encoder.
        A: ``(C, C)`` state matrix, acting on column vectors (``h ← A h``).
        exponent: ``"causal"`` (default) or ``"official"``.

    Returns:
        ``(B, L, C)``: ``x`` at visible positions, the interpolation ``z`` elsewhere.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, length, channels), got {tuple(x.shape)}")
    batch, length, channels = x.shape
    if visible.shape != (batch, length) or visible.dtype != torch.bool:
        raise ValueError(f"visible must be a bool tensor of shape {(batch, length)}, got "
                         f"{visible.dtype} {tuple(visible.shape)}")
    if A.shape != (channels, channels):
        raise ValueError(f"A must be ({channels}, {channels}), got {tuple(A.shape)}")
    if exponent not in TOKI_EXPONENTS:
        raise ValueError(f"exponent must be one of {TOKI_EXPONENTS}, got {exponent!r}")
    masked = (~visible).flatten().nonzero().squeeze(1)  # flat (b·L + l) indices needing z
    if masked.numel() == 0:
        return x
    start, end, seg_len, offset, anchor = _segments(visible)

    # Krylov depth per anchor: the longest segment it starts or ends
    prev_start = torch.cat([start.new_zeros(batch, 1), start[:, :-1]], dim=1)
    ends_here = torch.arange(length, device=x.device) - prev_start  # length of the segment ending at l
    depth_at = torch.maximum(seg_len, ends_here)[anchor]  # (n_anchor,), flat raster order
    anchor_id = (anchor.flatten().cumsum(0) - 1).view(batch, length)
    depth_sorted, order = depth_at.sort(descending=True, stable=True)
    max_depth = int(depth_sorted[0])
    active = (depth_sorted[None, :] > torch.arange(max_depth, device=x.device)[:, None]).sum(1).tolist()

    anchors = x.reshape(batch * length, channels)[anchor.flatten()][order]  # (n_anchor, C), sorted
    A_t = A.to(x.dtype).t()
    krylov = [anchors]  # krylov[k][r] = A^k y_r for the first active[k] anchors
    for k in range(1, max_depth):
        krylov.append(krylov[-1][: active[k]] @ A_t)
    n_anchor = anchors.shape[0]
    stacked = torch.stack([F.pad(v, (0, 0, 0, n_anchor - v.shape[0])) for v in krylov], dim=1)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n_anchor, device=x.device)

    start_rank = rank[anchor_id.gather(1, start).flatten()[masked]]
    end_rank = rank[anchor_id.gather(1, end.clamp(max=length - 1)).flatten()[masked]]
    w_start, w_end = _weights(seg_len.flatten()[masked], offset.flatten()[masked], max_depth, exponent, x.dtype)
    z = torch.einsum("mk,mkc->mc", w_start, stacked[start_rank]) + torch.einsum(
        "mk,mkc->mc", w_end, stacked[end_rank])
    filled = x.new_zeros(batch * length, channels).index_copy(0, masked, z).view(batch, length, channels)
    return torch.where(visible.unsqueeze(-1), x, filled)


def toki_grid(feature: torch.Tensor, visible: torch.Tensor, A: torch.Tensor, exponent: str = "causal"):
    """TOKI on a deepest-scale map: ``feature (B, C, g_d, g_h, g_w)``, ``visible (B, g_d, g_h, g_w)``.

    Flattens to raster-order tokens ``(B, L, C)``, fills, and folds back with the transpose the public
    code forgot, so every cell keeps its own channel vector.
    """
    if feature.dim() != 5 or visible.shape != (feature.shape[0], *feature.shape[2:]):
        raise ValueError(f"feature must be (B, C, *grid) and visible (B, *grid), got {tuple(feature.shape)} "
                         f"and {tuple(visible.shape)}")
    tokens = feature.flatten(2).transpose(1, 2)
    filled = toki(tokens, visible.flatten(1), A, exponent)
    return filled.transpose(1, 2).reshape(feature.shape)


class TOKI(nn.Module):
    """TOKI with a learned ``A (C, C)``, zero-initialised (so causal TOKI starts as linear interpolation).

    Args:
        channels: token width C.
        exponent: ``"causal"`` (paper, default) or ``"official"`` (public code), see ``toki``.
    """

    def __init__(self, channels: int, exponent: str = "causal"):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        if exponent not in TOKI_EXPONENTS:
            raise ValueError(f"exponent must be one of {TOKI_EXPONENTS}, got {exponent!r}")
        self.channels, self.exponent = channels, exponent
        self.A = nn.Parameter(torch.zeros(channels, channels))

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """x ``(B, L, C)``, visible ``(B, L)`` bool → ``(B, L, C)``."""
        return toki(x, visible, self.A, self.exponent)

    def fill_grid(self, feature: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """``toki_grid`` with this module's ``A``: ``(B, C, *grid)`` map, ``(B, *grid)`` mask."""
        return toki_grid(feature, visible, self.A, self.exponent)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, exponent={self.exponent!r}"
