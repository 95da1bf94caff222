"""timm ``VisionTransformer`` blocks: tokens ``(B, N, C)``, ``x + ls1(attn(norm1 x))``.

The adapters wrap ``attn`` and ``mlp``, so their branches pass through the block's LayerScale like the host's
own: ``x + ls1(a + Adapter(a))`` and ``h + ls2(MLP(z) + s·Adapter(z))``. Without LayerScale (``init_values``
None, most timm ViTs) ``ls1``/``ls2`` are identities and this is Med-SA's formula exactly; with it the adapter
outputs are scaled per channel by the learned γ, as everything that branch adds to the residual stream is.
"""

from __future__ import annotations

from ...core.hosts import HostIntegration, register_host

__all__ = ["TIMM_HOST"]

TIMM_HOST = HostIntegration(
    name="timm",
    block_types=("timm.models.vision_transformer:Block",),
    token_layout="bnc",
)
register_host(TIMM_HOST, first=False)
