"""The registry of host integrations: where a host's transformer blocks keep attention and MLP.

One small integration per host (SAM, timm, MONAI, ...) lives in ``medadapt.adapters.hosts``; a user
adds their own block type with :func:`register_host`. Block types are given as ``"module:Class"``
strings too, resolved only when a model is searched, so importing medadapt imports no host library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["HostIntegration", "find_host", "host_blocks", "register_host", "registered_hosts"]


def _default_dim(block: nn.Module) -> int:
    norm = getattr(block, "norm1", None)
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    raise ValueError(f"cannot infer the token width of {type(block).__name__}; give HostIntegration.dim")


@dataclass
class HostIntegration:
    """How medadapt finds its way around one kind of transformer block.

    Attributes:
        name: short host name (``"sam"``, ``"timm"``, ``"monai"``).
        block_types: block classes, or ``"module:Class"`` strings resolved lazily.
        attn: attribute holding the attention module (its output is added to the residual).
        mlp: attribute holding the MLP (its input is the normed residual).
        norm1: attribute holding the pre-attention norm.
        token_layout: ``"bhwc"`` (SAM: ``(B, H, W, C)``) or ``"bnc"`` (``(B, N, C)``).
        dim: token width of a block.
        depth_attention: ``f(attn, seq) -> seq`` attention over ``(N, L, C)`` sequences with the
            block's own weights (used by SD-Trans); None means call ``attn(seq)``.
    """

    name: str
    block_types: tuple[type | str, ...]
    attn: str = "attn"
    mlp: str = "mlp"
    norm1: str = "norm1"
    token_layout: str = "bnc"
    dim: Callable[[nn.Module], int] = _default_dim
    depth_attention: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    _resolved: tuple[type, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.token_layout not in ("bhwc", "bnc"):
            raise ValueError(f"token_layout must be 'bhwc' or 'bnc', got {self.token_layout!r}")
        if not self.block_types:
            raise ValueError("block_types must name at least one class")

    def types(self) -> tuple[type, ...]:
        """The block classes that can be imported (a missing host library resolves to none)."""
        if self._resolved is None:
            out = []
            for t in self.block_types:
                if isinstance(t, str):
                    module, _, cls = t.partition(":")
                    try:
                        t = getattr(importlib.import_module(module), cls)
                    except (ImportError, AttributeError):
                        continue
                out.append(t)
            self._resolved = tuple(out)
        return self._resolved

    def claims(self, module: nn.Module) -> bool:
        return type(module) in self.types()


_HOSTS: list[HostIntegration] = []


def _load_builtins() -> None:
    from ..adapters import hosts  # noqa: F401  (registers the built-ins; a no-op once imported)


def register_host(integration: HostIntegration, first: bool = True) -> None:
    """Add a host integration (checked before the built-ins when ``first``); it replaces one of the same name.

    The built-ins are loaded first, so a user integration registered before any model was searched
    replaces a built-in of the same name rather than being replaced by it when the built-ins load.
    """
    if not isinstance(integration, HostIntegration):
        raise ValueError(f"integration must be a HostIntegration, got {type(integration).__name__}")
    _load_builtins()
    _HOSTS[:] = [h for h in _HOSTS if h.name != integration.name]
    _HOSTS.insert(0 if first else len(_HOSTS), integration)


def registered_hosts() -> list[HostIntegration]:
    """The registered integrations, in lookup order (built-ins load on first use)."""
    _load_builtins()
    return list(_HOSTS)


def find_host(module: nn.Module) -> HostIntegration | None:
    """The integration that knows ``module``'s block type, or None."""
    for host in registered_hosts():
        if host.claims(module):
            return host
    return None


def host_blocks(model: nn.Module) -> list[tuple[str, nn.Module, HostIntegration]]:
    """Every block of ``model`` some integration knows, as ``(name, block, host)``."""
    out = []
    for name, module in model.named_modules():
        host = find_host(module)
        if host is not None:
            out.append((name, module, host))
    return out
