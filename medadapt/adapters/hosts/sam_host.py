"""Meta's ``segment_anything`` image encoder blocks: tokens ``(B, H, W, C)``, windowed or global."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.hosts import HostIntegration, register_host

__all__ = ["SAM_HOST", "sam_depth_attention"]


def sam_depth_attention(attn: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    """Attention over ``seq (N, L, C)`` with SAM's ``Attention`` weights (qkv, proj, heads).

    SAM's relative position tables describe 2D image offsets, so they are not used along depth.
    """
    n, length, c = seq.shape
    heads = attn.num_heads
    qkv = attn.qkv(seq).reshape(n, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(n, length, c))


SAM_HOST = HostIntegration(
    name="sam",
    block_types=("segment_anything.modeling.image_encoder:Block",),
    token_layout="bhwc",
    depth_attention=sam_depth_attention,
)
register_host(SAM_HOST, first=False)
