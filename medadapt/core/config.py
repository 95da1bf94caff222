"""Typed adapter configurations that validate themselves, and the registry of methods.

Every method (Med-SA, CILMP, ...) has a config dataclass deriving from :class:`AdapterConfig` and an
``apply`` function registered with :func:`register_method`; ``inject`` looks the method up here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

__all__ = [
    "AdapterConfig",
    "MedSAConfig",
    "config_from_dict",
    "get_method",
    "register_method",
]

ApplyFn = Callable[[nn.Module, "AdapterConfig"], list[str]]
_METHODS: dict[str, tuple[type[AdapterConfig], ApplyFn]] = {}


def _check_targets(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name} must be a valid regular expression, got {value!r} ({err})") from err
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        if len(value) == 0:
            raise ValueError(f"{name} must not be an empty list (use None for the default)")
        return
    raise ValueError(f"{name} must be None, a regex string or a list of module names, got {value!r}")


@dataclass
class AdapterConfig:
    """Fields shared by every method.

    Attributes:
        target_modules: which host modules get adapters. ``None``: the method's default (e.g. every
            transformer block a host integration knows). A string is a regex matched with
            ``re.fullmatch`` against module names; a list holds exact names or ``.suffix`` endings.
        exclude_modules: same forms; matching modules are skipped.
        modules_to_save: host submodules (exact names or ``.suffix`` endings, e.g. ``"mask_decoder"``)
            trained in full and saved with the adapter.
    """

    method: ClassVar[str] = ""
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.modules_to_save, (tuple, str)):
            self.modules_to_save = (
                [self.modules_to_save] if isinstance(self.modules_to_save, str) else list(self.modules_to_save)
            )
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        if not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) and m
                                                                  for m in self.modules_to_save):
            raise ValueError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the method name under ``"method"``."""
        return {"method": self.method, **dataclasses.asdict(self)}


def _require_type(cfg: AdapterConfig, name: str, types: type | tuple[type, ...]) -> Any:
    value = getattr(cfg, name)
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ValueError(f"{name} must be {types}, got a bool")
    if not isinstance(value, types):
        raise ValueError(f"{name} must be of type {types}, got {type(value).__name__} ({value!r})")
    return value


@dataclass
class MedSAConfig(AdapterConfig):
    """Med-SA bottleneck adapters (METHODS.md §1).

    Attributes:
        mlp_ratio: adapter hidden width ``int(mlp_ratio · C)``; Med-SA uses 0.25.
        activation: ``"gelu"`` (Med-SA code), ``"gelu_tanh"`` or ``"relu"`` (the paper).
        space_adapter: sequential adapter with skip after attention: ``h = x + A(Attn(LN1 x))`` where
            ``A(a) = a + Adapter(a)``.
        mlp_adapter: parallel adapter on the normed MLP input: ``y = h + MLP(LN2 h) + s·Adapter(LN2 h)``.
        mlp_scale: ``s``, 0.5 in Med-SA.
        space_depth: SD-Trans depth branch for volumes (``(B·D, ...)`` tokens).
        depth_pos_embed: max number of slices for a zero-init learned depth position embedding
            (0: none, slice order does not matter to the depth branch).
        hyper_prompt: HyP-Adpt adapters in SAM's mask decoder.
    """

    method: ClassVar[str] = "medsa"
    mlp_ratio: float = 0.25
    activation: str = "gelu"
    space_adapter: bool = True
    mlp_adapter: bool = True
    mlp_scale: float = 0.5
    space_depth: bool = False
    depth_pos_embed: int = 0
    hyper_prompt: bool = False

    def validate(self) -> None:
        super().validate()
        ratio = _require_type(self, "mlp_ratio", (int, float))
        if not (ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"mlp_ratio must be a finite number > 0, got {ratio}")
        if self.activation not in ("gelu", "gelu_tanh", "relu"):
            raise ValueError(f"activation must be 'gelu', 'gelu_tanh' or 'relu', got {self.activation!r}")
        for flag in ("space_adapter", "mlp_adapter", "space_depth", "hyper_prompt"):
            _require_type(self, flag, bool)
        if not math.isfinite(_require_type(self, "mlp_scale", (int, float))):
            raise ValueError(f"mlp_scale must be a finite number, got {self.mlp_scale}")
        if _require_type(self, "depth_pos_embed", int) < 0:
            raise ValueError(f"depth_pos_embed must be >= 0, got {self.depth_pos_embed}")
        if self.depth_pos_embed and not self.space_depth:
            raise ValueError(f"depth_pos_embed={self.depth_pos_embed} belongs to the SD-Trans depth branch: "
                             "set space_depth=True (or depth_pos_embed=0)")
        if not (self.space_adapter or self.mlp_adapter or self.space_depth or self.hyper_prompt):
            raise ValueError("MedSAConfig enables no adapter: set space_adapter, mlp_adapter, "
                             "space_depth or hyper_prompt")


def register_method(config_cls: type[AdapterConfig], apply: ApplyFn) -> None:
    """Register ``apply(model, config) -> list of injected module names`` for ``config_cls.method``.

    ``apply`` adds :class:`~medadapt.core.base.AdapterModule` / ``AdapterWrapper`` instances to the
    model (wrapping host submodules, or attaching new ones) and returns their names; it raises
    ValueError when nothing matched. Freezing, ``modules_to_save`` and bookkeeping are done by ``inject``.
    """
    if not config_cls.method:
        raise ValueError(f"{config_cls.__name__}.method must name the method")
    _METHODS[config_cls.method] = (config_cls, apply)


def get_method(method: str) -> tuple[type[AdapterConfig], ApplyFn]:
    """The (config class, apply function) registered for ``method``."""
    if method not in _METHODS:
        raise ValueError(f"unknown adapter method {method!r}; registered: {sorted(_METHODS)}")
    return _METHODS[method]


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from :meth:`AdapterConfig.to_dict` output (validates it)."""
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError("adapter config must be a dict with a 'method' key")
    config_cls, _ = get_method(data["method"])
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(data) - known - {"method"}
    if unknown:
        raise ValueError(f"unknown fields for {config_cls.__name__}: {sorted(unknown)}")
    return config_cls(**{k: v for k, v in data.items() if k != "method"})
