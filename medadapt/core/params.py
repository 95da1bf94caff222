"""Exact counts of trainable parameters."""

from __future__ import annotations

from torch import nn

from .base import AdapterWrapper

__all__ = ["print_trainable_parameters", "trainable_parameters"]


def _deployed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Unique parameters, skipping frozen copies kept by ``modules_to_save`` wrappers."""
    skip: set[int] = set()
    for module in model.modules():
        if isinstance(module, AdapterWrapper) and module.base_is_frozen_copy:
            skip.update(id(p) for p in module.base_layer.parameters())
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts.

    ``total`` counts the model as it runs: the frozen originals that ``modules_to_save`` keeps for
    ``disable_adapters`` are not counted twice.
    """
    params = _deployed_parameters(model)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return ``trainable params: T || all params: N || trainable%: P``."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / max(total, 1)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"
    print(line)
    return line
