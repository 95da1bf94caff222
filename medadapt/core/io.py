"""Adapter-only checkpoints: ``adapter_model.safetensors`` + ``adapter_config.json``, written atomically.

The config records the SHA-256 of the weights file it was saved with, so a pair from two different saves
(a crash between the two renames) is refused on load instead of loading silently.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .._atomic import atomic_write_bytes
from .base import adapter_state_names
from .config import config_from_dict
from .inject import _unwrap_all, inject, injected_configs

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_state_dict", "load_adapter", "loading_adapter", "save_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1

_LOADING = contextvars.ContextVar("medadapt_loading_adapter", default=False)


def loading_adapter() -> bool:
    """True while :func:`load_adapter` injects saved configs into a plain model.

    The saved file then overwrites every adapter parameter and persistent buffer, so an apply function
    may skip reading external data that only fills them (e.g. CILMP's ``representation_path``).
    """
    return _LOADING.get()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters and persistent buffers of ``model`` (incl. ``modules_to_save``)."""
    names = set(adapter_state_names(model))
    return {k: v for k, v in model.state_dict().items() if k in names}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter weights and config to ``directory`` (created if needed); returns it.

    Both files are written to a temporary name, flushed and renamed, so a crash never leaves half a
    file; the config (written second) holds the weights file's SHA-256, so a crash between the two renames
    leaves a pair that :func:`load_adapter` refuses rather than new weights under an old config.
    """
    configs = injected_configs(model)
    if not configs:
        raise ValueError(f"{type(model).__name__} has no medadapt adapters to save; call inject first")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone().cpu() for k, v in adapter_state_dict(model).items()}
    weights = save_safetensors(state, metadata={"format": "pt"})
    meta = {
        "format_version": FORMAT_VERSION,
        "base_model_class": type(model).__name__,
        "configs": [c.to_dict() for c in configs],
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    atomic_write_bytes(out / WEIGHTS_NAME, weights)
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    return out


def _read(directory: Path) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"adapter file missing: {p}")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is not a medadapt adapter config ({err})") from err
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"{cfg_path} is not a medadapt adapter config (no 'configs' list)")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{cfg_path} has format_version {version!r}; this medadapt reads up to {FORMAT_VERSION}")
    weights = w_path.read_bytes()
    expected = meta.get("weights_sha256")  # absent in files saved before it was recorded
    if expected is not None and hashlib.sha256(weights).hexdigest() != expected:
        raise ValueError(f"{w_path} is not the weights file {cfg_path} was saved with (SHA-256 differs): the two "
                         "come from different saves, e.g. one interrupted between its two writes")
    try:
        state = load_safetensors(weights)
    except (SafetensorError, ValueError) as err:
        raise ValueError(f"{w_path} is not a readable safetensors file ({err})") from err
    return configs, state


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        if bad_shape:
            parts.append(f"shape mismatch {bad_shape[:3]}")
        raise ValueError(f"adapter in {source} does not fit this model: " + "; ".join(parts))


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` (strict).

    A plain model gets the saved configs injected first; an injected model must carry the same
    configs. On any mismatch (missing/unexpected keys, shapes, configs, a corrupt file) this raises
    ValueError and the model is left exactly as it was.
    """
    directory = Path(directory)
    config_dicts, state = _read(directory)
    configs = [config_from_dict(d) for d in config_dicts]
    current = injected_configs(model)
    injected_here = not current
    if current and [c.to_dict() for c in current] != [c.to_dict() for c in configs]:
        raise ValueError(f"model carries adapter configs {[c.to_dict() for c in current]} but {directory} "
                         f"holds {config_dicts}")
    if injected_here:
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            token = _LOADING.set(True)
            try:
                for cfg in configs:
                    inject(model, cfg)
            finally:
                _LOADING.reset(token)
            _check_state(model, state, directory)
        except BaseException:  # an interrupt too: the model is left as it was
            _unwrap_all(model)
            if hasattr(model, "_medadapt_record"):
                object.__delattr__(model, "_medadapt_record")
            for n, p in model.named_parameters():
                p.requires_grad_(before.get(n, p.requires_grad))
            raise
    else:
        _check_state(model, state, directory)
    targets = adapter_state_dict(model)
    with torch.no_grad():
        for k, v in state.items():
            targets[k].copy_(v.to(dtype=targets[k].dtype, device=targets[k].device))
    return model
