"""MambaMIM: masked image modeling for Mamba and hybrid CNN–Mamba 3D encoders, as hooks on the encoder.

``MambaMIM(encoder, MambaMIMConfig(...))(volume)`` returns the reconstruction loss; ``detach()`` gives
the encoder back. Parts: bottom-up hybrid masking (``masking``, ``sparse_ops``, ``hooks``), TOKI token
interpolation (``toki``), a light SparK-style decoder (``decoder``) and the masked-patch loss (``loss``).
The pretraining / fine-tuning example lives in ``medadapt.mim.pretrain`` (imported lazily).
"""

from .config import MambaMIMConfig
from .decoder import LightDecoder
from .hooks import MaskingHooks
from .loss import masked_patch_mse, normalised_patch_targets, patchify, unpatchify
from .mambamim import MambaMIM
from .masking import (
    gather_visible_tokens,
    random_visible_mask,
    scatter_visible_tokens,
    upsample_mask,
    visible_count,
)
from .sparse_ops import visible_norm
from .targets import EncoderSpec, detect_encoder_spec, register_encoder_spec
from .toki import TOKI, toki, toki_grid

__all__ = [
    "EncoderSpec",
    "LightDecoder",
    "MambaMIM",
    "MambaMIMConfig",
    "MaskingHooks",
    "TOKI",
    "detect_encoder_spec",
    "gather_visible_tokens",
    "masked_patch_mse",
    "normalised_patch_targets",
    "patchify",
    "random_visible_mask",
    "register_encoder_spec",
    "scatter_visible_tokens",
    "toki",
    "toki_grid",
    "unpatchify",
    "upsample_mask",
    "visible_count",
    "visible_norm",
]
