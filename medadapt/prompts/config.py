"""``CILMPConfig``: the typed, JSON-serialisable description of a CILMP prompt adapter."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..core.config import AdapterConfig
from .representations import save_representations

__all__ = ["CILMPConfig", "VARIANTS"]

VARIANTS = ("coop", "cocoop", "cilmp")
HOSTS = ("auto", "clip", "sam")


def _int(cfg: Any, name: str, minimum: int, allow_none: bool = False) -> int | None:
    value = getattr(cfg, name)
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return value


@dataclass
class CILMPConfig(AdapterConfig):
    """CILMP: LLM-conditioned low-rank prompt interventions (METHODS.md §2).

    The class representations ``H_c`` are stored in the adapter as a persistent buffer
    ``class_representations`` of shape ``(n_cls, max(L_c), representation_dim)`` (zero-padded), so a
    saved adapter is self-contained (a few MB). ``inject`` fills it from ``representation_path``;
    ``load_adapter`` re-injects from this config without reading the file (it may have changed or be
    gone) and loads the buffer from the saved safetensors. Build a config from encoded descriptions with
    :meth:`from_representations`.

    Attributes:
        class_names: the classes, in logit / mask-channel order.
        descriptions: ``{class: description}`` the representations were encoded from (a record; when
            given, every class needs one).
        representation_path: safetensors file of ``{class: (L_c, D)}`` (see ``save_representations``).
        representation_lengths: ``{class: L_c}``, token count of each class representation.
        representation_dim: D, the language model's width.
        variant: ``"cilmp"`` (LLM class tokens, deep prompts), ``"cocoop"`` (context + image-conditioned
            meta-net) or ``"coop"`` (learned context only); the SAM head is ``"cilmp"`` only.
        host: ``"clip"`` (open_clip CLIP), ``"sam"`` (segment_anything mask decoders) or ``"auto"``.
        rank: r of the interventions and of the ``D → r → width`` projection (CILMP: 8).
        prefix_length / suffix_length: tokens edited at the start / end of each class representation.
        conditional: condition the interventions on the image feature (else plain LoReFT).
        orthogonal: keep R orthonormal under training (pyreft) instead of only initialising it so.
        dropout: dropout after each intervention (CILMP: 0.1).
        n_ctx: learned text context tokens (CLIP).
        n_ctx_vision: learned image prompt tokens per layer (CLIP, ``cilmp`` variant; 0 disables).
        prompt_depth: CLIP layers with their own prompts (None: every layer; coop/cocoop use 1).
    """

    method: ClassVar[str] = "cilmp"
    class_names: list[str] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)
    representation_path: str | None = None
    representation_lengths: dict[str, int] = field(default_factory=dict)
    representation_dim: int = 0
    variant: str = "cilmp"
    host: str = "auto"
    rank: int = 8
    prefix_length: int = 4
    suffix_length: int = 4
    conditional: bool = True
    orthogonal: bool = True
    dropout: float = 0.1
    n_ctx: int = 4
    n_ctx_vision: int = 4
    prompt_depth: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.representation_path, os.PathLike):
            self.representation_path = os.fspath(self.representation_path)
        if isinstance(self.class_names, tuple):
            self.class_names = list(self.class_names)
        super().__post_init__()

    @property
    def uses_language_model(self) -> bool:
        return self.variant == "cilmp"

    def validate(self) -> None:
        super().validate()
        names = self.class_names
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"class_names must be a non-empty list of non-empty strings, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"class_names must be unique, got {names!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.host not in HOSTS:
            raise ValueError(f"host must be one of {HOSTS}, got {self.host!r}")
        if self.host == "sam" and self.variant != "cilmp":
            raise ValueError(f"variant must be 'cilmp' for host 'sam', got {self.variant!r}")
        if not isinstance(self.descriptions, dict):
            raise ValueError(f"descriptions must be a dict {{class: description}}, got {self.descriptions!r}")
        if self.descriptions:
            for name in names:
                text = self.descriptions.get(name)
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"descriptions has no description for class {name!r}")
            extra = sorted(set(self.descriptions) - set(names))
            if extra:
                raise ValueError(f"descriptions names classes not in class_names: {extra}")
        if self.representation_path is not None and not isinstance(self.representation_path, str):
            raise ValueError(f"representation_path must be a path string or None, got {self.representation_path!r}")
        for flag in ("conditional", "orthogonal"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        _int(self, "rank", 1)
        _int(self, "prefix_length", 0)
        _int(self, "suffix_length", 0)
        _int(self, "n_ctx", 0)
        _int(self, "n_ctx_vision", 0)
        _int(self, "prompt_depth", 1, allow_none=True)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.variant != "cilmp" and self.prompt_depth not in (None, 1):
            raise ValueError(f"prompt_depth must be None or 1 for variant {self.variant!r}, got {self.prompt_depth}")
        if self.variant != "cilmp" and self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1 for variant {self.variant!r}, got {self.n_ctx}")
        if self.uses_language_model:
            self._validate_representations()

    def _validate_representations(self) -> None:
        if _int(self, "representation_dim", 1) < self.rank:
            raise ValueError(f"rank ({self.rank}) must be <= representation_dim ({self.representation_dim}): "
                             "the intervention's R has rank orthonormal rows of that width")
        lengths = self.representation_lengths
        if not isinstance(lengths, dict):
            raise ValueError(f"representation_lengths must be a dict {{class: token count}}, got {lengths!r}")
        need = max(1, self.prefix_length + self.suffix_length)
        for name in self.class_names:
            n = lengths.get(name)
            if n is None:
                raise ValueError(f"representation_lengths has no entry for class {name!r}")
            if isinstance(n, bool) or not isinstance(n, int) or n < need:
                raise ValueError(f"representation_lengths[{name!r}] = {n!r}: need an integer >= prefix_length + "
                                 f"suffix_length = {need}")
        extra = sorted(set(lengths) - set(self.class_names))
        if extra:
            raise ValueError(f"representation_lengths names classes not in class_names: {extra}")

    @classmethod
    def from_representations(cls, representations: Mapping[str, torch.Tensor], path: str | os.PathLike,
                             **kwargs: Any) -> CILMPConfig:
        """Write ``{class: (L_c, D)}`` to ``path`` and return a config describing it.

        ``class_names`` defaults to the dict's order; other fields come from ``kwargs``. The config
        records ``path`` as an absolute path (injecting from another working directory finds it).
        """
        names = kwargs.pop("class_names", list(representations))
        missing = [n for n in names if n not in representations]
        if missing:
            raise ValueError(f"representations has no tensor for classes {missing}")
        config = cls(class_names=list(names), representation_path=os.path.abspath(path),
                     representation_lengths={n: int(representations[n].shape[0]) for n in names},
                     representation_dim=int(next(iter(representations.values())).shape[1]), **kwargs)
        save_representations(representations, path)  # only once the config is valid: no stray file
        return config
