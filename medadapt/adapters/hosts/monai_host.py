"""MONAI ``TransformerBlock`` (inside ``ViT``, ``UNETR``): tokens ``(B, N, C)``."""

from __future__ import annotations

from ...core.hosts import HostIntegration, register_host

__all__ = ["MONAI_HOST"]

MONAI_HOST = HostIntegration(
    name="monai",
    block_types=("monai.networks.blocks.transformerblock:TransformerBlock",),
    token_layout="bnc",
)
register_host(MONAI_HOST, first=False)
