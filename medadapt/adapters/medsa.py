"""Med-SA injection: bottleneck adapters in every targeted block, SD-Trans and HyP-Adpt on request."""

from __future__ import annotations

import importlib

from torch import nn

from ..core.config import MedSAConfig, register_method
from ..core.hosts import host_blocks
from ..core.targets import select_targets, set_submodule
from .bottleneck import ParallelAdapterWrapper, SequentialAdapterWrapper

__all__ = ["apply_medsa"]


def apply_medsa(model: nn.Module, config: MedSAConfig) -> list[str]:
    """Wrap each targeted block's attention (space adapter) and MLP (parallel adapter).

    ``h = x + A(Attn(LN1 x))`` with ``A(a) = a + Adapter(a)``;
    ``y = h + MLP(LN2 h) + s · Adapter(LN2 h)``. With ``space_depth`` the blocks also get the SD-Trans
    depth branch; with ``hyper_prompt`` SAM's mask decoder gets HyP-Adpt adapters.
    """
    names: list[str] = []
    wants_blocks = config.space_adapter or config.mlp_adapter or config.space_depth
    if wants_blocks:
        blocks = {name: (block, host) for name, block, host in host_blocks(model) if name}
        chosen = select_targets(blocks, config.target_modules, config.exclude_modules, "transformer block")
        for name in chosen:
            block, host = blocks[name]
            dim = host.dim(block)
            if config.space_adapter:
                wrapper = SequentialAdapterWrapper(getattr(block, host.attn), dim, config.mlp_ratio, config.activation)
                set_submodule(block, host.attn, wrapper)
                names.append(f"{name}.{host.attn}")
            if config.mlp_adapter:
                wrapper = ParallelAdapterWrapper(getattr(block, host.mlp), dim, config.mlp_ratio, config.activation,
                                                 config.mlp_scale)
                set_submodule(block, host.mlp, wrapper)
                names.append(f"{name}.{host.mlp}")
        if config.space_depth:
            space_depth = importlib.import_module("medadapt.adapters.space_depth")
            names += space_depth.apply_space_depth(model, chosen, config)
    if config.hyper_prompt:
        hyper_prompt = importlib.import_module("medadapt.adapters.hyper_prompt")
        names += hyper_prompt.apply_hyper_prompt(model, config)
    return names


register_method(MedSAConfig, apply_medsa)
