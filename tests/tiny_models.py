"""Small random-weight host models shared by the tests (nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_sam_encoder(img_size: int = 64, depth: int = 4, embed_dim: int = 48, window_size: int = 4,
                     global_attn_indexes: tuple[int, ...] = (1, 3), out_chans: int = 32):
    """SAM's ImageEncoderViT with windowed and global blocks, rel-pos on, patch 8."""
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(img_size=img_size, patch_size=8, embed_dim=embed_dim, depth=depth, num_heads=3,
                           out_chans=out_chans, window_size=window_size, global_attn_indexes=global_attn_indexes,
                           use_rel_pos=True, qkv_bias=True)


def tiny_sam(img_size: int = 64, embed_dim: int = 48, prompt_dim: int = 32, depth: int = 4):
    """A whole ``Sam`` (encoder, prompt encoder, mask decoder) at a CPU-test size."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    encoder = tiny_sam_encoder(img_size=img_size, depth=depth, embed_dim=embed_dim, out_chans=prompt_dim)
    grid = img_size // 8
    prompt = PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                           input_image_size=(img_size, img_size), mask_in_chans=8)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=prompt_dim,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2),
                          iou_head_depth=2, iou_head_hidden_dim=32)
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)


def tiny_timm_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=3, num_classes=5)


def tiny_monai_vit():
    from monai.networks.nets import ViT

    return ViT(in_channels=1, img_size=(16, 16, 16), patch_size=(8, 8, 8), hidden_size=48, mlp_dim=96, num_layers=2,
               num_heads=3, spatial_dims=3, classification=False)


class WithHead(nn.Module):
    """A host model with an encoder and a small trainable head (for modules_to_save)."""

    def __init__(self, encoder: nn.Module, width: int, out: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        feats = feats[0] if isinstance(feats, (tuple, list)) else feats
        if feats.dim() == 4:  # (B, C, H, W) -> channels last
            feats = feats.permute(0, 2, 3, 1)
        return self.head(feats)
