"""The marker classes every injected module derives from.

``inject`` adds two kinds of modules to a host model:

* an :class:`AdapterModule` holds only adapter parameters (a bottleneck adapter, a prompt head);
* an :class:`AdapterWrapper` replaces a host submodule and keeps it as ``base_layer``; its own
  parameters outside ``base_layer`` are adapter parameters. ``remove_adapters`` puts ``base_layer`` back.

Both honour ``adapters_enabled``: when False (inside ``disable_adapters``) they must compute exactly
what the host computed without them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["AdapterModule", "AdapterWrapper", "adapter_modules", "adapter_state_names", "place_like"]


class AdapterModule(nn.Module):
    """A module whose parameters are all adapter parameters (trained, saved)."""

    adapters_enabled: bool = True

    def set_adapters_enabled(self, enabled: bool) -> None:
        self.adapters_enabled = bool(enabled)

    def on_remove(self) -> None:
        """Called by ``remove_adapters`` before this module leaves the tree (e.g. to drop hooks)."""


class AdapterWrapper(AdapterModule):
    """Wraps a host submodule (``base_layer``) and adds adapter computation around it."""

    base_is_frozen_copy: bool = False  # True when base_layer is a frozen copy (modules_to_save)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def _attribute_source(self) -> nn.Module | None:
        """The module whose attributes this wrapper answers for: the wrapped host module."""
        return self.__dict__.get("_modules", {}).get("base_layer")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # host code reads attributes of the module it owns (e.g. ``blocks[0].attn.num_heads``); reads
            # only: a write lands on the wrapper, as for any module
            source = self._attribute_source()
            if source is None:
                raise
            return getattr(source, name)

    def adapter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of this wrapper that are not inside ``base_layer``."""
        for name, p in self.named_parameters():
            if not name.startswith("base_layer."):
                yield name, p

    def unwrap(self) -> nn.Module:
        """The module to put back in the tree when the adapters are removed."""
        return self.base_layer


def place_like(adapter: nn.Module, host: nn.Module) -> nn.Module:
    """Move ``adapter`` onto the device of ``host``'s first parameter (or buffer), in place; returns it.

    One policy for every method: adapter weights live where the host computes, in float32 — float64 on a
    float64 host — whatever the host's own dtype. Trained weights stay fp32 under a bf16/fp16 host (the
    adapters cast them to the activations' dtype on use), as PEFT libraries do by default. A host without
    parameters or buffers leaves ``adapter`` where it is.
    """
    reference = next(itertools.chain(host.parameters(), host.buffers()), None)
    if reference is None:
        return adapter
    dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
    return adapter.to(device=reference.device, dtype=dtype)


def _visit(module: nn.Module, prefix: str, in_adapter: bool, frozen: bool, out: list[tuple[str, nn.Module, bool]],
           trained_copy: bool = False) -> None:
    out.append((prefix, module, (in_adapter or trained_copy) and not frozen))
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(module, AdapterWrapper) and name == "base_layer":
            _visit(child, path, isinstance(child, AdapterModule), frozen or module.base_is_frozen_copy, out,
                   trained_copy)
        else:
            # everything inside a modules_to_save copy trains, wrapped host layers included
            copy = trained_copy or (isinstance(module, AdapterWrapper) and module.base_is_frozen_copy
                                    and name == "trained")
            _visit(child, path, in_adapter or isinstance(child, AdapterModule), frozen, out, copy)


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """Every module of ``model`` as ``(name, module, owns_adapter_params)``.

    A module owns adapter parameters when it is an :class:`AdapterModule` or lies inside one, except
    inside the ``base_layer`` of an :class:`AdapterWrapper` (the host's own module, frozen) — where a
    nested adapter counts again, unless the wrapper keeps a frozen copy (``base_is_frozen_copy``).
    """
    out: list[tuple[str, nn.Module, bool]] = []
    _visit(model, "", isinstance(model, AdapterModule), False, out)
    return out


def adapter_state_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.state_dict()``) of the adapter parameters and persistent buffers."""
    names = []
    for prefix, module, owns in adapter_modules(model):
        if not owns:
            continue
        dot = f"{prefix}." if prefix else ""
        names += [dot + n for n, _ in module.named_parameters(recurse=False)]
        names += [dot + n for n, b in module.named_buffers(recurse=False)
                  if b is not None and n not in module._non_persistent_buffers_set]
    return names
