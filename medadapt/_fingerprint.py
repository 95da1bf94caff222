"""A fast fingerprint of a model's weights: the same weights give the same string, other weights another."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

__all__ = ["FINGERPRINT_SAMPLES", "weights_fingerprint"]

FINGERPRINT_SAMPLES = 4096  # values per tensor: milliseconds for a 7B model, not a full hash


def weights_fingerprint(model: Any, samples: int = FINGERPRINT_SAMPLES) -> str:
    """SHA-256 over the names, dtypes and shapes of every tensor in ``model.state_dict()`` and the bytes of up
    to ``samples`` evenly strided values of each (all of them for smaller tensors).

    Other weights (another seed, a fine-tune, a merged LoRA update) differ almost everywhere, so a strided
    sample tells them apart, while hashing every byte would take seconds for a multi-GB model. Two models
    differing only in values between the samples share a fingerprint (the CILMP description cache then
    shares entries: ``encode_descriptions(..., use_cache=False)`` re-encodes).
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step].cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(sample.view(torch.uint8).numpy())
    return digest.hexdigest()
