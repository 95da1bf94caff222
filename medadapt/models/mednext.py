"""MedNeXt-style 3D convolution blocks (Roy et al.) and a channels-first LayerNorm.

``MedNeXtBlock``: ``x + W_3 · GELU(W_2 · Norm(DWConv_k(x)))`` with 1×1×1 convs ``W_2`` (C → r·C) and
``W_3`` (r·C → C). ``MedNeXtDownBlock``: the same with a stride-2 depthwise conv, ``C_in → C_out``, and a
stride-2 1×1×1 residual conv.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["LayerNorm3d", "MedNeXtBlock", "MedNeXtDownBlock"]

NormFactory = Callable[[int], nn.Module]


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, D, H, W)``, per voxel.

    ``y = (x − mean_c x) / sqrt(var_c x + eps) · γ + β``. Statistics are per position, so under
    MambaMIM masking only the output needs masking (no visible-only statistics are required).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        self.num_channels, self.eps = num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class MedNeXtBlock(nn.Module):
    """Residual inverted-bottleneck block: depthwise k³ conv → norm → 1×1 expand → GELU → 1×1 compress.

    Args:
        channels: input = output channels.
        expansion: expansion ratio r of the 1×1 layers.
        kernel_size: depthwise kernel size (odd).
        norm_layer: ``channels → module`` (default ``LayerNorm3d``).
    """

    def __init__(self, channels: int, expansion: int = 4, kernel_size: int = 3,
                 norm_layer: NormFactory = LayerNorm3d):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv_dw = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = norm_layer(channels)
        self.conv_expand = nn.Conv3d(channels, expansion * channels, 1)
        self.act = nn.GELU()
        self.conv_compress = nn.Conv3d(expansion * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_compress(self.act(self.conv_expand(self.norm(self.conv_dw(x)))))


class MedNeXtDownBlock(nn.Module):
    """Stride-2 MedNeXt block ``C_in → C_out`` with a stride-2 1×1×1 residual projection."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int = 4, kernel_size: int = 3,
                 norm_layer: NormFactory = LayerNorm3d):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv_dw = nn.Conv3d(in_channels, in_channels, kernel_size, stride=2, padding=kernel_size // 2,
                                 groups=in_channels)
        self.norm = norm_layer(in_channels)
        self.conv_expand = nn.Conv3d(in_channels, expansion * in_channels, 1)
        self.act = nn.GELU()
        self.conv_compress = nn.Conv3d(expansion * in_channels, out_channels, 1)
        # a stride-2 1×1×1 conv, written as subsampling + 1×1×1 conv (same result; the strided conv's
        # backward takes a slow path on CPU)
        self.conv_residual = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_compress(self.act(self.conv_expand(self.norm(self.conv_dw(x)))))
        return y + self.conv_residual(x[:, :, ::2, ::2, ::2])
