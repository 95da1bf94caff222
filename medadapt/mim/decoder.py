"""A light SparK-style 3D decoder: upsample ×2 per level, add the (densified) skip feature of that scale.

Widths halve per level from ``width`` at the deepest scale (stride ``patch_size``). Per level:
``x ← ReLU(GN(Conv3(ConvT2(x))))`` then ``x ← x + skip`` when a feature of that stride is given; the
last ×2 is a transposed conv straight to ``out_channels`` (cheap at full resolution).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LightDecoder", "UpBlock"]


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class UpBlock(nn.Module):
    """``ConvTranspose3d(k=2, s=2)`` then ``Conv3d(k=3)`` → GroupNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2)
        self.conv = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm = _group_norm(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(self.up(x))))


class LightDecoder(nn.Module):
    """Decoder from stride ``patch_size`` to full resolution.

    Args:
        patch_size: stride of the deepest input (a power of two ≥ 2).
        width: channels at the deepest level (halved per level, at least ``min_width``).
        out_channels: channels of the output map.
        min_width: floor for the halving rule.

    ``forward(features)`` takes ``{stride: (B, width_at(stride), *S)}`` with the deepest stride present;
    other strides in ``2 … patch_size/2`` are optional skips.
    """

    def __init__(self, patch_size: int, width: int, out_channels: int, min_width: int = 8):
        super().__init__()
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size must be a power of two >= 2, got {patch_size}")
        if width < 1 or out_channels < 1:
            raise ValueError(f"width and out_channels must be positive, got {width}, {out_channels}")
        self.patch_size, self.width, self.min_width = patch_size, width, min_width
        self.levels = patch_size.bit_length() - 1  # number of ×2 steps
        widths = [self.width_at(patch_size >> i) for i in range(self.levels)]
        self.blocks = nn.ModuleList([UpBlock(widths[i], widths[i + 1]) for i in range(self.levels - 1)])
        self.head = nn.ConvTranspose3d(widths[-1], out_channels, 2, stride=2)

    def width_at(self, stride: int) -> int:
        """Channels the decoder expects for a skip feature at ``stride``."""
        return max(self.min_width, self.width * stride // self.patch_size)

    @property
    def strides(self) -> list[int]:
        """Strides it consumes, deepest first: ``patch_size, …, 2``."""
        return [self.patch_size >> i for i in range(self.levels)]

    def forward(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        if self.patch_size not in features:
            raise ValueError(f"features must contain the deepest stride {self.patch_size}, got {sorted(features)}")
        x = features[self.patch_size]
        for block, stride in zip(self.blocks, self.strides[1:]):
            x = block(x)
            if stride in features:
                x = x + features[stride]
        return self.head(x)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, width={self.width}"

    @staticmethod
    def usable_strides(strides: Sequence[int], patch_size: int) -> list[int]:
        """Strides among ``strides`` the decoder can take as skips (powers of two in ``[2, patch_size]``)."""
        return [s for s in strides if 2 <= s <= patch_size and not s & (s - 1)]
