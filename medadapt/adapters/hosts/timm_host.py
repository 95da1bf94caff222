"""timm ``VisionTransformer`` blocks: tokens ``(B, N, C)``, ``x + ls1(attn(norm1 x))``."""

from __future__ import annotations

from ...core.hosts import HostIntegration, register_host

__all__ = ["TIMM_HOST"]

TIMM_HOST = HostIntegration(
    name="timm",
    block_types=("timm.models.vision_transformer:Block",),
    token_layout="bnc",
)
register_host(TIMM_HOST, first=False)
