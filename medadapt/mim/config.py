"""``MambaMIMConfig``: a typed, self-validating, JSON-serialisable MambaMIM configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .toki import TOKI_EXPONENTS

__all__ = ["MambaMIMConfig"]


@dataclass
class MambaMIMConfig:
    """What MambaMIM masks, where it hooks, and how it reconstructs.

    Attributes:
        mask_ratio: share of deepest-grid cells masked per sample (paper: 0.75 → 54 of 216 visible).
        feature_modules: encoder modules whose outputs are the multi-scale features, shallow → deep
            (None: detected, see ``medadapt.mim.targets``).
        sequence_module: module mapping the deepest token sequence ``(B, L, C) → (B, L, C)``; it is fed the
            visible tokens only (None: detected, or no sequence stage).
        encode_method: encoder method to call instead of ``forward`` (e.g. ``"encode"`` for SegResNet).
        patch_size: total downsampling of the deepest feature (None: detected or probed).
        in_channels: image channels (None: the first ``Conv3d``'s ``in_channels``).
        decoder_width: decoder channels at the deepest scale, halved per level (None: the deepest
            feature's channels).
        toki_exponent: ``"causal"`` (paper) or ``"official"`` (public code), see ``medadapt.mim.toki``.
        norm_pix_loss: per-patch normalised targets (MAE norm_pix); False = raw intensities.
    """

    mask_ratio: float = 0.75
    feature_modules: list[str] | None = None
    sequence_module: str | None = None
    encode_method: str | None = None
    patch_size: int | None = None
    in_channels: int | None = None
    decoder_width: int | None = None
    toki_exponent: str = "causal"
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.feature_modules is not None:
            if isinstance(self.feature_modules, str) or not all(isinstance(n, str) for n in self.feature_modules):
                raise ValueError(f"feature_modules must be a list of module names, got {self.feature_modules!r}")
            self.feature_modules = list(self.feature_modules)
        for name in ("patch_size", "in_channels", "decoder_width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.patch_size is not None and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_size must be a power of two, got {self.patch_size}")
        if self.toki_exponent not in TOKI_EXPONENTS:
            raise ValueError(f"toki_exponent must be one of {TOKI_EXPONENTS}, got {self.toki_exponent!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MambaMIMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"data has unknown MambaMIMConfig keys {sorted(unknown)}")
        return cls(**data)
