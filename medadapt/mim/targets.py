"""Where MambaMIM hooks an encoder: per-host knowledge, found through a registry the user can extend.

An ``EncoderSpec`` names, without touching the encoder's source:

* ``feature_modules``: modules whose outputs are the multi-scale features ``(B, C_i, *S_i)``, shallow →
  deep; the deepest one is at the mask grid (stride = ``patch_size``);
* ``sequence_module``: optional module that maps the deepest token sequence ``(B, L, C) → (B, L, C)``
  in raster order (a Mamba stage); MambaMIM feeds it the visible tokens only;
* ``encode_method``: the method that runs the encoder (``None`` = ``encoder(x)``), e.g. MONAI
  ``SegResNet.encode`` so its decoder is not run;
* ``patch_size``: the total downsampling of the deepest feature (``None``: found by a probe run).

Built in: any encoder exposing ``feature_module_names`` / ``sequence_module_name`` / ``patch_size``
(medadapt's ``HybridMambaEncoder``), and MONAI's ``SegResNet``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["EncoderSpec", "register_encoder_spec", "detect_encoder_spec", "resolve_encoder_spec"]


@dataclass(frozen=True)
class EncoderSpec:
    """Names of the hooked modules of one encoder (see the module docstring)."""

    feature_modules: tuple[str, ...]
    sequence_module: str | None = None
    encode_method: str | None = None
    patch_size: int | None = None


_REGISTRY: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], EncoderSpec]]] = []


def register_encoder_spec(matches: Callable[[nn.Module], bool], build: Callable[[nn.Module], EncoderSpec],
                          first: bool = True) -> None:
    """Teach MambaMIM a new host: ``build(encoder)`` is used for encoders where ``matches(encoder)``.

    Later registrations win over earlier ones unless ``first=False``.
    """
    entry = (matches, build)
    _REGISTRY.insert(0, entry) if first else _REGISTRY.append(entry)


def _exposes_names(encoder: nn.Module) -> bool:
    return hasattr(encoder, "feature_module_names") and hasattr(encoder, "patch_size")


def _spec_from_names(encoder: nn.Module) -> EncoderSpec:
    return EncoderSpec(
        feature_modules=tuple(encoder.feature_module_names),
        sequence_module=getattr(encoder, "sequence_module_name", None),
        patch_size=int(encoder.patch_size),
    )


def _is_monai_segresnet(encoder: nn.Module) -> bool:
    cls = type(encoder)
    return cls.__module__.startswith("monai.") and cls.__name__ == "SegResNet"


def _segresnet_spec(encoder: nn.Module) -> EncoderSpec:
    levels = len(encoder.down_layers)
    return EncoderSpec(
        feature_modules=tuple(f"down_layers.{i}" for i in range(levels)),
        encode_method="encode",
        patch_size=2 ** (levels - 1),
    )


register_encoder_spec(_is_monai_segresnet, _segresnet_spec, first=False)
register_encoder_spec(_exposes_names, _spec_from_names, first=False)


def detect_encoder_spec(encoder: nn.Module) -> EncoderSpec | None:
    """The registered spec for ``encoder``, or None if no host integration matches."""
    for matches, build in _REGISTRY:
        if matches(encoder):
            return build(encoder)
    return None


def resolve_encoder_spec(encoder: nn.Module, feature_modules=None, sequence_module=None,
                         encode_method=None, patch_size=None) -> EncoderSpec:
    """User-given names override the detected ones; every name must exist in ``encoder``.

    Raises:
        ValueError: nothing given and nothing detected, or a name/method that the encoder lacks.
    """
    detected = detect_encoder_spec(encoder)
    if feature_modules is None and detected is None:
        raise ValueError(
            f"feature_modules: no MambaMIM integration matches {type(encoder).__name__}; pass "
            "MambaMIMConfig(feature_modules=[...], sequence_module=..., patch_size=...) or register_encoder_spec"
        )
    base = detected or EncoderSpec(feature_modules=())
    spec = EncoderSpec(
        feature_modules=tuple(feature_modules) if feature_modules is not None else base.feature_modules,
        sequence_module=sequence_module if sequence_module is not None else base.sequence_module,
        encode_method=encode_method if encode_method is not None else base.encode_method,
        patch_size=patch_size if patch_size is not None else base.patch_size,
    )
    names = dict(encoder.named_modules())
    if not spec.feature_modules:
        raise ValueError("feature_modules must name at least one module")
    for name in spec.feature_modules + ((spec.sequence_module,) if spec.sequence_module else ()):
        if name not in names:
            raise ValueError(f"feature_modules/sequence_module: {type(encoder).__name__} has no submodule "
                             f"named {name!r}")
    if spec.encode_method is not None and not callable(getattr(encoder, spec.encode_method, None)):
        raise ValueError(f"encode_method: {type(encoder).__name__} has no method {spec.encode_method!r}")
    if spec.patch_size is not None and (spec.patch_size < 1 or spec.patch_size & (spec.patch_size - 1)):
        raise ValueError(f"patch_size must be a power of two, got {spec.patch_size}")
    return spec
