"""Hybrid CNN–Mamba 3D encoder (MambaMIM's "HyMamba"): MedNeXt-style CNN stages, Mamba at the deepest grid.

Stage 0 works at full resolution, stage i at stride ``2^i``; the deepest CNN stage's grid
(``input / 2^(n−1)``, 96³ → 6³ with the defaults) is flattened in raster order, given a fixed 3D
sin-cos position embedding and passed through Mamba layers. ``forward`` returns one feature map per
scale, shallow → deep: ``[stage_0, …, stage_{n−2}, mamba_stage]``.

Module names are part of the API (MambaMIM hooks them by name): ``stages.<i>`` are the CNN stages,
``mamba_stage`` returns the deepest grid, and ``mamba_stage.sequence`` maps a token sequence
``(B, L, C) → (B, L, C)`` (position embedding already added), so a wrapper may feed it any subset of
tokens. ``feature_module_names``, ``sequence_module_name`` and ``patch_size`` state this.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .mamba import Mamba
from .mednext import LayerNorm3d, MedNeXtBlock, MedNeXtDownBlock, NormFactory

__all__ = [
    "HybridMambaEncoder",
    "MambaLayer",
    "MambaSequence",
    "MambaStage",
    "CNNStage",
    "sincos_position_embedding_3d",
]


def sincos_position_embedding_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0,
                                 device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 3D sin-cos embedding ``(D·H·W, dim)`` in raster order (last axis fastest).

    With ``k = dim // 6`` frequencies ``ω_f = temperature^(−f/k)``, a position ``(d, h, w)`` gets
    ``[sin(d ω), cos(d ω), sin(h ω), cos(h ω), sin(w ω), cos(w ω)]``; the ``dim mod 6`` last channels are 0.
    """
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive sizes, got {tuple(grid)}")
    k = dim // 6
    omega = temperature ** -(torch.arange(k, device=device, dtype=torch.float64) / max(k, 1))
    axes = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float64) for n in grid], indexing="ij")
    parts = []
    for axis in axes:
        angle = axis.reshape(-1, 1) * omega
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=1)
    emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - 6 * k)], dim=1)
    return emb.to(dtype)


class MambaLayer(nn.Module):
    """Pre-norm residual layer: ``x ← x + Mamba(LN(x))``, then ``x ← x + MLP(LN(x))`` (MLP if ratio > 0)."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 bidirectional: bool = True, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=bidirectional)
        hidden = int(round(mlp_ratio * dim))
        self.norm2 = nn.LayerNorm(dim) if hidden > 0 else None
        self.mlp = (nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                    if hidden > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class MambaSequence(nn.Module):
    """``depth`` Mamba layers and a final LayerNorm over a token sequence ``(B, L, C) → (B, L, C)``."""

    def __init__(self, dim: int, depth: int, **layer_kwargs):
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.layers = nn.ModuleList([MambaLayer(dim, **layer_kwargs) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tokens = layer(tokens)
        return self.norm(tokens)


class MambaStage(nn.Module):
    """Grid ``(B, C, D, H, W)`` → grid: add the sin-cos position embedding, flatten in raster order,
    run ``sequence`` (a ``MambaSequence``), fold back."""

    def __init__(self, dim: int, depth: int, **layer_kwargs):
        super().__init__()
        self.dim = dim
        self.sequence = MambaSequence(dim, depth, **layer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *grid = x.shape
        pos = sincos_position_embedding_3d(grid, channels, device=x.device, dtype=x.dtype)
        tokens = x.flatten(2).transpose(1, 2) + pos  # (B, L, C), raster order
        tokens = self.sequence(tokens)
        return tokens.transpose(1, 2).reshape(batch, channels, *grid)


class CNNStage(nn.Module):
    """Stage 0: 1×1×1 stem conv + blocks; stage i > 0: stride-2 ``MedNeXtDownBlock`` + blocks."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, expansion: int, kernel_size: int,
                 norm_layer: NormFactory, first: bool):
        super().__init__()
        if first:
            self.stem = nn.Conv3d(in_channels, out_channels, 1)
        else:
            self.down = MedNeXtDownBlock(in_channels, out_channels, expansion, kernel_size, norm_layer)
        self.blocks = nn.Sequential(
            *[MedNeXtBlock(out_channels, expansion, kernel_size, norm_layer) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) if hasattr(self, "stem") else self.down(x)
        return self.blocks(x)


class HybridMambaEncoder(nn.Module):
    """3D CNN stages then Mamba layers at the deepest scale; returns multi-scale features.

    Args:
        in_channels: image channels.
        channels: width per CNN stage; ``len(channels)`` stages, patch size ``2^(len − 1)``.
        depths: MedNeXt blocks per stage (after the stem / down block).
        expansions: MedNeXt expansion ratio per stage.
        kernel_size: depthwise kernel size of the CNN blocks.
        mamba_depth: number of Mamba layers at the deepest grid (``d_model = channels[-1]``).
        d_state, d_conv, expand, bidirectional, mlp_ratio: Mamba layer settings.
        norm_layer: ``channels → norm module`` for the CNN (default channels-first ``LayerNorm3d``).

    Input ``(B, in_channels, D, H, W)`` with every spatial size a multiple of ``patch_size``; the
    position embedding is computed for the actual grid, so any such size works.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 192, 384),
        depths: Sequence[int] = (1, 2, 2, 2, 1),
        expansions: Sequence[int] = (2, 2, 4, 4, 4),
        kernel_size: int = 3,
        mamba_depth: int = 4,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        bidirectional: bool = True,
        mlp_ratio: float = 2.0,
        norm_layer: NormFactory = LayerNorm3d,
    ):
        super().__init__()
        channels, depths, expansions = list(channels), list(depths), list(expansions)
        if len(channels) < 2:
            raise ValueError(f"channels must list at least 2 stages, got {channels}")
        if len(depths) != len(channels) or len(expansions) != len(channels):
            raise ValueError(f"depths and expansions must have len(channels)={len(channels)} entries, "
                             f"got {len(depths)} and {len(expansions)}")
        if in_channels < 1 or min(channels) < 1 or min(depths) < 0 or min(expansions) < 1:
            raise ValueError("in_channels, channels and expansions must be positive and depths >= 0")
        self.in_channels = in_channels
        self.channels = tuple(channels)
        self.patch_size = 2 ** (len(channels) - 1)
        widths = [in_channels] + channels
        self.stages = nn.ModuleList([
            CNNStage(widths[i], widths[i + 1], depths[i], expansions[i], kernel_size, norm_layer, first=i == 0)
            for i in range(len(channels))
        ])
        self.mamba_stage = MambaStage(channels[-1], mamba_depth, d_state=d_state, d_conv=d_conv,
                                      expand=expand, bidirectional=bidirectional, mlp_ratio=mlp_ratio)

    @property
    def feature_module_names(self) -> list[str]:
        """Names of the modules whose outputs ``forward`` returns, shallow → deep."""
        return [f"stages.{i}" for i in range(len(self.stages) - 1)] + ["mamba_stage"]

    @property
    def sequence_module_name(self) -> str:
        """Name of the module that maps the deepest token sequence ``(B, L, C) → (B, L, C)``."""
        return "mamba_stage.sequence"

    @property
    def feature_channels(self) -> list[int]:
        return list(self.channels)

    @property
    def feature_strides(self) -> list[int]:
        return [2**i for i in range(len(self.channels))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x ``(B, in_channels, D, H, W)`` → features ``[(B, channels[i], D/2^i, H/2^i, W/2^i)]``."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (batch, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % self.patch_size for s in x.shape[2:]):
            raise ValueError(f"x's spatial sizes must be multiples of patch_size={self.patch_size}, "
                             f"got {tuple(x.shape[2:])}")
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        features[-1] = self.mamba_stage(x)
        return features
