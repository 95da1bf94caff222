"""``apply_cilmp``: attach CILMP prompt learners / heads to a host model (registered for ``inject``).

Hosts, found by duck typing (no host library is imported):

* SAM (``segment_anything``): every ``MaskDecoder`` (``target_modules`` filters their names) is wrapped
  by a :class:`ClassPromptedMaskDecoder` whose ``prompt_head`` turns the class representations into
  one sparse prompt token per class.
* open_clip ``CLIP``: a :class:`CLIPPromptLearner` is attached as ``<clip>.prompt_learner``; for the
  ``cilmp`` variant with ``n_ctx_vision > 0`` the vision transformer is wrapped by
  :class:`DeepVisualPrompts`.

The class representations go into the adapter's persistent ``class_representations`` buffer, read
from ``config.representation_path`` when that file exists. ``load_adapter`` builds the modules from the
saved config alone (shapes from ``representation_lengths`` / ``representation_dim``) and fills the buffer
from the saved weights: it never reads the file, which may have changed or be gone.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from torch import nn

from ..core.base import AdapterModule
from ..core.io import loading_adapter
from ..core.targets import select_targets, set_submodule
from .clip_learner import CLIPPromptLearner, DeepVisualPrompts
from .config import CILMPConfig
from .representations import load_representations
from .sam_head import CILMPPromptHead, ClassPromptedMaskDecoder

__all__ = ["apply_cilmp", "find_clip_models", "find_mask_decoders", "representation_tensor"]

_DECODER_ATTRS = ("transformer", "iou_token", "mask_tokens", "output_hypernetworks_mlps", "transformer_dim")
_CLIP_ATTRS = ("visual", "token_embedding", "positional_embedding", "ln_final", "transformer", "logit_scale")


def find_mask_decoders(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the SAM mask decoders in ``model`` (not inside an adapter)."""
    return {n: m for n, m in model.named_modules()
            if all(hasattr(m, a) for a in _DECODER_ATTRS) and not isinstance(m, AdapterModule)
            and ".base_layer" not in f".{n}"}


def find_clip_models(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the open_clip CLIP-like models in ``model`` (``""`` for the model itself)."""
    return {n: m for n, m in model.named_modules()
            if all(hasattr(m, a) for a in _CLIP_ATTRS) and not isinstance(m, AdapterModule)}


def representation_tensor(config: CILMPConfig) -> torch.Tensor | None:
    """The zero-padded ``(n_cls, L_max, D)`` tensor from ``config.representation_path``, or None if absent.

    Raises:
        ValueError: the file is not a readable safetensors file, lacks a class, or a class's shape differs
            from ``(representation_lengths[c], representation_dim)``.
    """
    path = config.representation_path
    if path is None or not os.path.isfile(path):
        return None
    try:
        reps = load_representations(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"representation_path {path!r} is not a readable representations file ({err})") from err
    lengths = [config.representation_lengths[c] for c in config.class_names]
    out = torch.zeros(len(lengths), max(lengths), config.representation_dim)
    for i, name in enumerate(config.class_names):
        if name not in reps:
            raise ValueError(f"representation_path {path!r} has no representation for class {name!r}")
        rep = reps[name]
        if rep.shape[-1] != config.representation_dim:
            raise ValueError(f"representation_dim is {config.representation_dim} but class {name!r} in {path!r} "
                             f"has width {rep.shape[-1]}")
        if rep.shape[0] != lengths[i]:
            raise ValueError(f"representation_lengths[{name!r}] is {lengths[i]} but {path!r} holds "
                             f"{rep.shape[0]} tokens for it")
        out[i, : lengths[i]] = rep
    return out


def _representations(config: CILMPConfig) -> torch.Tensor | None:
    """:func:`representation_tensor`, except under ``load_adapter`` (the saved buffer is loaded instead)."""
    return None if loading_adapter() else representation_tensor(config)


def _fill(buffer: torch.Tensor, reps: torch.Tensor | None) -> None:
    if reps is not None:
        with torch.no_grad():
            buffer.copy_(reps.to(buffer.dtype))


def _apply_sam(model: nn.Module, config: CILMPConfig, decoders: dict[str, nn.Module]) -> list[str]:
    chosen = select_targets(decoders, config.target_modules, config.exclude_modules, "SAM mask decoder")
    reps = _representations(config)
    lengths = [config.representation_lengths[c] for c in config.class_names]
    for name in chosen:
        decoder = decoders[name]
        head = CILMPPromptHead(lengths, config.representation_dim, int(decoder.transformer_dim), config.rank,
                               config.prefix_length, config.suffix_length, config.conditional, config.orthogonal,
                               config.dropout)
        _fill(head.class_representations, reps)
        ref = next(decoder.parameters(), None)
        if ref is not None:
            head.to(device=ref.device)
        set_submodule(model, name, ClassPromptedMaskDecoder(decoder, head))
    return chosen


def _apply_clip(model: nn.Module, config: CILMPConfig, clips: dict[str, nn.Module]) -> list[str]:
    chosen = select_targets(clips or {}, config.target_modules, config.exclude_modules, "open_clip CLIP model")
    reps = _representations(config) if config.uses_language_model else None
    names = []
    for name in chosen:
        clip = clips[name]
        prefix = f"{name}." if name else ""
        device = clip.token_embedding.weight.device
        learner = CLIPPromptLearner(clip, config).to(device)
        if config.uses_language_model:
            _fill(learner.class_representations, reps)
        clip.prompt_learner = learner
        names.append(f"{prefix}prompt_learner")
        if config.variant == "cilmp" and config.n_ctx_vision > 0:
            visual = clip.visual
            blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
            if blocks is None:
                raise ValueError("n_ctx_vision > 0 needs an open_clip ViT image tower (visual.transformer); "
                                 "set n_ctx_vision=0 for other image towers")
            if learner.depth > len(blocks):
                raise ValueError(f"prompt_depth must be <= the {len(blocks)} image encoder layers, got {learner.depth}")
            wrapper = DeepVisualPrompts(visual.transformer, config.n_ctx_vision, learner.depth,
                                        visual.transformer.width).to(device)
            visual.transformer = wrapper
            names.append(f"{prefix}visual.transformer")
    return names


def apply_cilmp(model: nn.Module, config: CILMPConfig) -> list[str]:
    """Attach CILMP to every targeted SAM mask decoder or open_clip CLIP in ``model``; returns the names.

    Raises:
        ValueError: no supported host (or nothing matched ``target_modules``), or the representation
            file does not match the config.
    """
    if not isinstance(config, CILMPConfig):
        raise ValueError(f"config must be a CILMPConfig, got {type(config).__name__}")
    host = config.host
    decoders = find_mask_decoders(model) if host in ("auto", "sam") else {}
    if host == "sam" or (host == "auto" and decoders):
        if config.variant != "cilmp":
            raise ValueError(f"variant must be 'cilmp' for SAM mask decoders, got {config.variant!r}")
        return _apply_sam(model, config, decoders)
    clips = find_clip_models(model)
    if not clips and host == "auto":
        raise ValueError(f"{type(model).__name__} has no SAM mask decoder and no open_clip CLIP model for CILMP "
                         "(host='auto'); give a supported model or set host")
    return _apply_clip(model, config, clips)
