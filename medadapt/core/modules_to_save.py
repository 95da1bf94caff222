"""Host submodules trained in full (``modules_to_save``), e.g. SAM's ``mask_decoder``."""

from __future__ import annotations

import copy

from torch import nn

from .base import AdapterWrapper
from .targets import find_modules, set_submodule

__all__ = ["ModulesToSaveWrapper", "wrap_modules_to_save"]


class ModulesToSaveWrapper(AdapterWrapper):
    """Keeps the host module as a frozen ``base_layer`` and trains a copy, ``trained``.

    With adapters enabled the trained copy runs; disabled (or removed) the original runs, so the base
    model's behaviour is always one context manager away.
    """

    base_is_frozen_copy = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.trained = copy.deepcopy(base_layer)

    def forward(self, *args, **kwargs):
        module = self.trained if self.adapters_enabled else self.base_layer
        return module(*args, **kwargs)

    def _attribute_source(self) -> nn.Module | None:
        """The trained copy: reads such as ``sam.mask_decoder.transformer`` reach the module that trains."""
        return self.__dict__.get("_modules", {}).get("trained")


def wrap_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Wrap every module matching ``names`` (exact or ``.suffix``); returns the wrapped names."""
    wrapped = []
    for spec in names:
        for name, module in find_modules(model, [spec], "modules_to_save"):
            if isinstance(module, ModulesToSaveWrapper) or any(name.startswith(w + ".") for w in wrapped):
                continue
            set_submodule(model, name, ModulesToSaveWrapper(module))
            wrapped.append(name)
    return wrapped

