"""``inject``, ``remove_adapters`` and ``disable_adapters``: adding adapters to a host model in place."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from .base import AdapterModule, AdapterWrapper, adapter_modules
from .config import AdapterConfig, get_method
from .modules_to_save import wrap_modules_to_save

__all__ = ["disable_adapters", "inject", "injected_configs", "remove_adapters"]

_RECORD = "_medadapt_record"


@dataclass
class _InjectionRecord:
    configs: list[AdapterConfig] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)


def injected_configs(model: nn.Module) -> list[AdapterConfig]:
    """Copies of the configs injected into ``model``, in order (empty for a plain model).

    Copies: editing one must not change what :func:`~medadapt.core.io.save_adapter` records.
    """
    record = getattr(model, _RECORD, None)
    return copy.deepcopy(record.configs) if record is not None else []


def _freeze_all_but_adapters(model: nn.Module) -> None:
    for _, module, owns in adapter_modules(model):
        for p in module.parameters(recurse=False):
            p.requires_grad_(owns)


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Add the adapters ``config`` describes to ``model`` in place and freeze everything else.

    Only adapter parameters and ``modules_to_save`` keep ``requires_grad``. Zero-initialised adapters
    leave the model's outputs unchanged until trained. Several methods can be stacked by calling
    ``inject`` once per config.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``config`` is not an AdapterConfig, the method is already injected, ``model`` lies
            inside (or contains) a module injected by another ``inject`` call, or nothing matched
            ``target_modules`` (the model is left unchanged).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, AdapterConfig):
        raise ValueError(f"config must be an AdapterConfig (e.g. MedSAConfig), got {type(config).__name__}")
    config.validate()
    # the record keeps its own copy: the caller may edit or reuse ``config`` for another model afterwards,
    # and what save_adapter writes must stay what was injected here
    config = copy.deepcopy(config)
    record: _InjectionRecord | None = getattr(model, _RECORD, None)
    _check_no_enclosing_injection(model, record)
    if record is not None and any(c.method == config.method for c in record.configs):
        raise ValueError(f"model already has {config.method!r} adapters; call remove_adapters first")
    _, apply = get_method(config.method)
    if record is None:
        record = _InjectionRecord(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    existing = {id(m) for m in model.modules() if isinstance(m, AdapterModule)}
    try:
        apply(model, config)
        if config.modules_to_save:
            wrap_modules_to_save(model, config.modules_to_save)
    except BaseException:  # an interrupt too
        _unwrap_all(model, keep=existing)  # only what this call added
        raise
    record.configs.append(config)
    object.__setattr__(model, _RECORD, record)
    _freeze_all_but_adapters(model)
    return model


def _check_no_enclosing_injection(model: nn.Module, record: _InjectionRecord | None) -> None:
    """Refuse to inject where another ``inject`` call already owns adapters of this subtree.

    Adapters in ``model`` without a record on ``model`` came from an ``inject`` into a module that
    contains it; a record below ``model`` belongs to an ``inject`` into one of its submodules. Stacking
    onto either puts wrappers of two injections into one module tree, and an adapter saved from one
    of them cannot be loaded back into a fresh model.
    """
    for name, module in model.named_modules():
        inner: _InjectionRecord | None = vars(module).get(_RECORD)  # its own, not read through a wrapper
        if name and inner is not None:
            raise ValueError(f"model: its submodule {name!r} already has medadapt adapters "
                             f"({[c.method for c in inner.configs]}) from an inject into it; "
                             f"inject into {name!r} again to stack another method, or remove_adapters({name}) first")
    if record is None and any(isinstance(m, AdapterModule) for m in model.modules()):
        raise ValueError(f"model ({type(model).__name__}) already contains medadapt adapters from an inject into a "
                         "module that contains it; inject into that module instead (stack methods there), or "
                         "remove_adapters from it first")


def _unwrap_all(module: nn.Module, keep: set[int] | frozenset[int] = frozenset()) -> None:
    """Replace every AdapterWrapper by its base layer and drop attached AdapterModules (but those in ``keep``)."""
    for name, child in list(module.named_children()):
        if isinstance(child, AdapterModule) and id(child) in keep:
            _unwrap_all(child, keep)
        elif isinstance(child, AdapterWrapper):
            inner = child
            while isinstance(inner, AdapterWrapper) and id(inner) not in keep:  # a stack of wrappers
                inner.on_remove()
                inner = inner.unwrap()
            _unwrap_all(inner, keep)
            setattr(module, name, inner)
        elif isinstance(child, AdapterModule):
            child.on_remove()
            delattr(module, name)
        else:
            _unwrap_all(child, keep)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take every adapter out: the original module tree, parameters and ``requires_grad`` flags back.

    ``modules_to_save`` go back to their original (untrained) weights.
    """
    record: _InjectionRecord | None = getattr(model, _RECORD, None)
    if record is None:
        raise ValueError(f"{type(model).__name__} has no medadapt adapters to remove")
    _unwrap_all(model)
    for name, p in model.named_parameters():
        p.requires_grad_(record.requires_grad.get(name, p.requires_grad))
    object.__delattr__(model, _RECORD)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly what its base model computes."""
    modules = [m for _, m, _ in adapter_modules(model) if isinstance(m, AdapterModule)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no medadapt adapters to disable")
    before = [m.adapters_enabled for m in modules]
    try:
        for m in modules:
            m.set_adapters_enabled(False)
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.set_adapters_enabled(flag)
