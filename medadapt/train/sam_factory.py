"""Building Meta's SAM at a chosen input size, with random weights or a local checkpoint.

SAM's released weights are for 1024-pixel inputs. At another input size ``S`` (patch 16, grid
``g = S / 16``) two groups of weights depend on the size and are resized when a checkpoint is loaded:

* the absolute position embedding ``(1, 64, 64, C)`` → ``(1, g, g, C)`` (bicubic, as SAMed does);
* the relative position tables of the global-attention blocks ``(2·64 − 1, C_head)`` →
  ``(2·g − 1, C_head)`` (linear, the interpolation SAM's own ``get_rel_pos`` applies at run time).

Windowed blocks' tables depend on the window (14), not on ``S``. At ``S = 224`` the grid is exactly one
14 × 14 window: no padding, the cheapest ViT-B geometry for CPU runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .._optional import require

__all__ = ["SAM_GEOMETRIES", "SamGeometry", "build_sam", "resize_sam_state_dict"]


@dataclass(frozen=True)
class SamGeometry:
    """Widths and depths of a SAM model (the image size is chosen separately)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden: int = 256
    mask_in_chans: int = 16
    default_img_size: int = 224


SAM_GEOMETRIES: dict[str, SamGeometry] = {
    "vit_b": SamGeometry(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamGeometry(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamGeometry(1280, 32, 16, (7, 15, 23, 31)),
    # CPU-test sizes: same structure (windowed + global blocks, rel-pos), tiny widths
    "small": SamGeometry(192, 4, 3, (1, 3), window_size=7, prompt_dim=64, decoder_mlp_dim=256, decoder_heads=4,
                         iou_head_hidden=64, mask_in_chans=8, default_img_size=128),
    "tiny": SamGeometry(48, 2, 3, (1,), window_size=2, patch_size=8, prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2,
                        iou_head_hidden=32, mask_in_chans=8, default_img_size=64),
}


def _build(geometry: SamGeometry, img_size: int) -> nn.Module:
    modeling = require("segment_anything.modeling", "building SAM")
    grid = img_size // geometry.patch_size
    encoder = modeling.ImageEncoderViT(
        img_size=img_size, patch_size=geometry.patch_size, embed_dim=geometry.embed_dim, depth=geometry.depth,
        num_heads=geometry.num_heads, mlp_ratio=4, out_chans=geometry.prompt_dim, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=geometry.window_size,
        global_attn_indexes=geometry.global_attn_indexes)
    prompt_encoder = modeling.PromptEncoder(embed_dim=geometry.prompt_dim, image_embedding_size=(grid, grid),
                                            input_image_size=(img_size, img_size),
                                            mask_in_chans=geometry.mask_in_chans)
    transformer = modeling.TwoWayTransformer(depth=2, embedding_dim=geometry.prompt_dim,
                                             mlp_dim=geometry.decoder_mlp_dim, num_heads=geometry.decoder_heads)
    decoder = modeling.MaskDecoder(num_multimask_outputs=3, transformer=transformer,
                                   transformer_dim=geometry.prompt_dim, iou_head_depth=3,
                                   iou_head_hidden_dim=geometry.iou_head_hidden)
    return modeling.Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder,
                        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


_REL_POS = re.compile(r"image_encoder\.blocks\.\d+\.attn\.rel_pos_[hw]")


def resize_sam_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resize a SAM state dict's size-dependent weights to the shapes of ``model``.

    ``pos_embed (1, G, G, C) → (1, g, g, C)`` by bicubic interpolation; relative position tables
    ``(2G − 1, c) → (2g − 1, c)`` by linear interpolation. Other entries are returned as they are.
    """
    target = model.state_dict()
    out = dict(state)
    key = "image_encoder.pos_embed"
    if key in state and key in target and state[key].shape != target[key].shape:
        _, gh, gw, _ = target[key].shape
        grid = state[key].permute(0, 3, 1, 2).float()
        out[key] = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    for name, value in state.items():
        if _REL_POS.fullmatch(name) and name in target and value.shape != target[name].shape:
            length = target[name].shape[0]
            table = value.float().t().unsqueeze(0)  # (1, c, 2G - 1)
            out[name] = F.interpolate(table, size=length, mode="linear", align_corners=False)[0].t()
    return out


def _read_checkpoint(path: str | os.PathLike, arch: str) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist (download e.g. sam_vit_b_01ec64.pth yourself)")
    registry = require("segment_anything", "loading a SAM checkpoint").sam_model_registry
    full = registry[arch](checkpoint=path)  # SAM's own loader validates the file at 1024 px
    return full.state_dict()


def build_sam(arch: str = "vit_b", img_size: int | None = None, checkpoint: str | os.PathLike | None = None,
              seed: int | None = None) -> nn.Module:
    """A ``segment_anything`` ``Sam`` at input size ``img_size`` (square).

    Args:
        arch: ``"vit_b"``, ``"vit_l"``, ``"vit_h"`` (SAM's geometries) or ``"small"``/``"tiny"`` (CPU tests).
        img_size: input size in pixels, a multiple of the patch size 16 (default: the geometry's CPU
            default, 224 for ViT-B). SAM's released models use 1024.
        checkpoint: local path of SAM weights for ``arch`` (read through ``sam_model_registry``); the
            position embeddings are resized to ``img_size``. None: random weights.
        seed: seeds the random initialisation (so every DDP rank builds the same model).

    Returns:
        The model in train mode (``requires_grad`` untouched).
    """
    if arch not in SAM_GEOMETRIES:
        raise ValueError(f"arch must be one of {sorted(SAM_GEOMETRIES)}, got {arch!r}")
    geometry = SAM_GEOMETRIES[arch]
    img_size = geometry.default_img_size if img_size is None else img_size
    if not isinstance(img_size, int) or img_size < geometry.patch_size or img_size % geometry.patch_size:
        raise ValueError(f"img_size must be a positive multiple of {geometry.patch_size}, got {img_size!r}")
    if checkpoint is not None and arch not in ("vit_b", "vit_l", "vit_h"):
        raise ValueError(f"checkpoint needs arch 'vit_b', 'vit_l' or 'vit_h' (SAM's releases), got {arch!r}")
    if seed is not None:
        torch.manual_seed(seed)
    sam = _build(geometry, img_size)
    if checkpoint is not None:
        state = resize_sam_state_dict(_read_checkpoint(checkpoint, arch), sam)
        sam.load_state_dict(state)
    return sam.train()
