"""Bottom-up hybrid masking: one mask per sample at the deepest grid, upsampled to every scale.

A mask is a bool tensor ``visible`` of shape ``(B, g_d, g_h, g_w)`` (True = kept). Every sample keeps
exactly ``round((1 − ratio) · L)`` of its ``L = g_d·g_h·g_w`` cells. Token index ``l`` is the raster
index ``(i·g_h + j)·g_w + k``, the order of ``x.flatten(2)`` on a ``(B, C, g_d, g_h, g_w)`` map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "visible_count",
    "random_visible_mask",
    "upsample_mask",
    "gather_visible_tokens",
    "scatter_visible_tokens",
]


def visible_count(num_tokens: int, mask_ratio: float) -> int:
    """Cells kept per sample: ``round((1 − mask_ratio) · num_tokens)``, at least 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return max(1, min(num_tokens, round((1.0 - mask_ratio) * num_tokens)))


def random_visible_mask(batch: int, grid: Sequence[int], mask_ratio: float,
                        generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Uniformly random masks ``(batch, *grid)`` bool, each sample with exactly ``visible_count`` True."""
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive sizes, got {grid}")
    num_tokens = grid[0] * grid[1] * grid[2]
    keep = visible_count(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, generator=generator)
    kept = noise.argsort(dim=1)[:, :keep]
    visible = torch.zeros(batch, num_tokens, dtype=torch.bool).scatter_(1, kept, True)
    return visible.view(batch, *grid).to(device)


def upsample_mask(visible: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Repeat each grid cell of ``visible (B, g_d, g_h, g_w)`` into a block: ``(B, 1, *size)`` bool.

    Raises:
        ValueError: a size is not a positive multiple of the grid size along that axis.
    """
    batch, *grid = visible.shape
    size = tuple(int(s) for s in size)
    if len(size) != len(grid) or any(s < g or s % g for s, g in zip(size, grid)):
        raise ValueError(f"size {size} must be a positive multiple of the mask grid {tuple(grid)}")
    factors = [s // g for s, g in zip(size, grid)]
    view = visible.view(batch, 1, grid[0], 1, grid[1], 1, grid[2], 1)
    expanded = view.expand(batch, 1, grid[0], factors[0], grid[1], factors[1], grid[2], factors[2])
    return expanded.reshape(batch, 1, *size)


def gather_visible_tokens(tokens: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the visible tokens in raster order.

    Args:
        tokens: ``(B, L, C)``.
        visible: ``(B, L)`` bool with the same count ``k`` in every row.

    Returns:
        ``(kept (B, k, C), index (B, k))`` with ``index`` strictly increasing along each row.
    """
    batch, length = visible.shape
    if tokens.shape[:2] != (batch, length):
        raise ValueError(f"tokens must be (batch, {length}, C) to match visible, got {tuple(tokens.shape)}")
    counts = visible.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"visible must keep the same count in every sample, got {counts.tolist()}")
    # nonzero enumerates (b, l) in row-major order: per sample, ascending l (raster order)
    index = visible.nonzero()[:, 1].view(batch, int(counts[0]))
    kept = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return kept, index


def scatter_visible_tokens(kept: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of ``gather_visible_tokens``: ``(B, k, C)`` → ``(B, L, C)`` with zeros at masked tokens."""
    full = kept.new_zeros(kept.shape[0], length, kept.shape[-1])
    return full.scatter(1, index.unsqueeze(-1).expand(-1, -1, kept.shape[-1]), kept)
