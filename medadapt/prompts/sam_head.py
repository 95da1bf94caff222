"""CILMP for SAM: class descriptions become sparse prompt tokens of the mask decoder (no clicks).

For image ``b`` with SAM image embedding ``E_b ∈ R^{C×h×w}``, the condition is the pooled, L2-normalised
embedding ``f_b = E_b.mean(h, w) / ‖·‖``; each class's intervened, projected tokens (see
:class:`~medadapt.prompts.class_tokens.ClassTokenIntervention`, width ``C``) are averaged over its
``L_c`` tokens and layer-normed into one prompt token ``p_{b,c} ∈ R^C``. The wrapped decoder then runs
once for all ``B·n_cls`` (image, class) pairs with ``p_{b,c}`` appended to the sparse prompts, giving
one mask per class: ``(B, n_cls, 4h, 4w)`` logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import AdapterModule, AdapterWrapper
from .class_tokens import ClassTokenIntervention, check_lengths, check_representations_loaded

__all__ = ["CILMPPromptHead", "ClassPromptedMaskDecoder", "class_mask_logits"]


class CILMPPromptHead(AdapterModule):
    """SAM image embeddings ``(B, C, h, w)`` → class prompt tokens ``(B, n_cls, C)``.

    Args:
        lengths: token count ``L_c`` of each class representation.
        dim: language-model width D.
        prompt_dim: SAM's prompt width C (256 for the released models).
        rank, prefix_length, suffix_length, conditional, orthogonal, dropout: as in ``CILMPConfig``.
    """

    def __init__(self, lengths: Sequence[int], dim: int, prompt_dim: int, rank: int = 8, prefix_length: int = 4,
                 suffix_length: int = 4, conditional: bool = True, orthogonal: bool = True,
                 dropout: float = 0.1) -> None:
        super().__init__()
        lengths = check_lengths(lengths, prefix_length, suffix_length)
        self.register_buffer("class_representations", torch.zeros(len(lengths), max(lengths), dim))
        self.tokens = ClassTokenIntervention(dim, rank, prompt_dim, lengths, prefix_length, suffix_length,
                                             cond_dim=prompt_dim if conditional else None,
                                             orthogonal=orthogonal, dropout=dropout)
        self.norm = nn.LayerNorm(prompt_dim)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        if image_embeddings.dim() != 4 or image_embeddings.shape[1] != self.norm.normalized_shape[0]:
            raise ValueError(f"image_embeddings must be (B, {self.norm.normalized_shape[0]}, h, w), "
                             f"got {tuple(image_embeddings.shape)}")
        check_representations_loaded(self)
        condition = F.normalize(image_embeddings.mean(dim=(-2, -1)), dim=-1)
        tokens = self.tokens(self.class_representations.to(condition.dtype), condition)  # (B|1, n, L, C)
        mask = self.tokens.valid_mask.to(tokens.dtype)[None, :, :, None]
        pooled = (tokens * mask).sum(2) / self.tokens.lengths.to(tokens.dtype)[None, :, None]
        return self.norm(pooled).expand(image_embeddings.shape[0], -1, -1)


def _active_decoder(module: nn.Module) -> nn.Module:
    """The MaskDecoder that computes: look through a ``modules_to_save`` wrapper (its trained copy)."""
    while isinstance(module, AdapterWrapper):
        trained = module._modules.get("trained")
        module = trained if trained is not None and module.adapters_enabled else module.base_layer
    for attr in ("transformer", "iou_token", "mask_tokens", "output_upscaling", "output_hypernetworks_mlps"):
        if not hasattr(module, attr):
            raise ValueError(f"{type(module).__name__} is not a segment_anything MaskDecoder (no {attr!r})")
    return module


def _broadcast(name: str, tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"{name} has batch {tensor.shape[0]}, expected 1 or {batch}")


class ClassPromptedMaskDecoder(AdapterWrapper):
    """Wraps SAM's ``mask_decoder``: one mask per class from the CILMP class prompt tokens.

    Same call as ``MaskDecoder.forward``; returns ``(N, n_cls, 4h, 4w)`` mask logits and ``(N, n_cls)``
    IoU predictions. Image embeddings, sparse and dense prompt embeddings broadcast over a batch of 1
    (so ``Sam.forward`` with no clicks works: sparse ``(1, 0, C)``). ``multimask_output`` must be False.
    With adapters disabled it is exactly the wrapped decoder.
    """

    def __init__(self, base_layer: nn.Module, prompt_head: CILMPPromptHead) -> None:
        super().__init__(base_layer)
        self.prompt_head = prompt_head

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # host code reads decoder attributes (e.g. num_mask_tokens)
            return getattr(self._modules["base_layer"], name)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool = False):
        if not self.adapters_enabled:
            return self.base_layer(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                                   multimask_output)
        if multimask_output:
            raise ValueError("multimask_output must be False with CILMP class prompts (one mask per class)")
        return self.predict_class_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)

    def predict_class_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                            sparse_prompt_embeddings: torch.Tensor | None,
                            dense_prompt_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All (image, class) pairs through the decoder in one batch: ``(N, n_cls, H, W)``, ``(N, n_cls)``."""
        decoder = _active_decoder(self.base_layer)
        c = image_embeddings.shape[1]
        if sparse_prompt_embeddings is None:
            sparse_prompt_embeddings = image_embeddings.new_zeros(1, 0, c)
        batch = max(image_embeddings.shape[0], sparse_prompt_embeddings.shape[0], dense_prompt_embeddings.shape[0])
        class_tokens = _broadcast("image_embeddings", self.prompt_head(image_embeddings), batch)  # (N, n, C)
        n_cls = class_tokens.shape[1]
        rows = batch * n_cls
        sparse = _broadcast("sparse_prompt_embeddings", sparse_prompt_embeddings, batch)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(rows, -1, -1),
                            class_tokens.reshape(rows, 1, c).to(output_tokens.dtype),
                            sparse.repeat_interleave(n_cls, dim=0)], dim=1)
        src = (_broadcast("image_embeddings", image_embeddings, batch)
               + _broadcast("dense_prompt_embeddings", dense_prompt_embeddings, batch)).repeat_interleave(n_cls, 0)
        pos = image_pe.expand(rows, -1, -1, -1)
        b, _, h, w = src.shape
        hs, src = decoder.transformer(src, pos, tokens)
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1])  # the single-mask output token
        masks = (hyper.unsqueeze(1) @ upscaled.flatten(2)).view(batch, n_cls, *upscaled.shape[-2:])
        iou = decoder.iou_prediction_head(hs[:, 0])[:, 0].view(batch, n_cls)
        return masks, iou


def class_mask_logits(sam: nn.Module, images: torch.Tensor, preprocess: bool = True) -> torch.Tensor:
    """Per-class low-resolution mask logits ``(B, n_cls, 4h, 4w)`` of a CILMP-injected SAM, no clicks.

    Args:
        sam: a ``segment_anything`` ``Sam`` whose ``mask_decoder`` carries CILMP class prompts.
        images: ``(B, 3, H, W)`` pixel values (``preprocess=True``: SAM's normalisation and padding).
    """
    x = sam.preprocess(images) if preprocess else images
    embeddings = sam.image_encoder(x)
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    masks, _ = sam.mask_decoder(embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
    return masks
