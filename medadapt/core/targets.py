"""Target matching as PEFT does it: a regex (``re.fullmatch``) or a list of exact names / ``.suffix`` endings."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

__all__ = ["find_modules", "matches", "select_targets", "set_submodule"]


def matches(name: str, spec: str | list[str] | None) -> bool:
    """True when module ``name`` matches ``spec``.

    A string is a regex that must match the whole name; a list matches a name equal to an entry or
    ending with ``"." + entry``. ``None`` matches nothing.
    """
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def select_targets(candidates: Iterable[str], target_modules: str | list[str] | None,
                   exclude_modules: str | list[str] | None, what: str = "module") -> list[str]:
    """Filter candidate names by ``target_modules`` (None keeps all) and ``exclude_modules``.

    Raises:
        ValueError: nothing is left, naming the spec and a few candidates.
    """
    candidates = list(candidates)
    chosen = [n for n in candidates if target_modules is None or matches(n, target_modules)]
    chosen = [n for n in chosen if not matches(n, exclude_modules)]
    if not chosen:
        shown = ", ".join(candidates[:6]) + (" ..." if len(candidates) > 6 else "")
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no {what}; "
            f"candidates are: {shown or 'none (no supported module in this model)'}"
        )
    return chosen


def find_modules(model: nn.Module, spec: str | list[str], field: str) -> list[tuple[str, nn.Module]]:
    """Modules whose names match ``spec``; ValueError naming ``field`` when none does."""
    found = [(n, m) for n, m in model.named_modules() if n and matches(n, spec)]
    if not found:
        raise ValueError(f"{field}={spec!r} matched no module of {type(model).__name__}")
    return found


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted) is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
