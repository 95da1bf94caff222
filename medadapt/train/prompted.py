"""SAM's prompted forward, batched: images → embeddings, prompts → sparse/dense embeddings → masks.

``segment_anything``'s ``Sam.forward`` loops over images in Python and its ``MaskDecoder`` takes one
image with many prompts. :func:`decode_masks` runs the same decoder computation for ``N`` images with
``K`` prompts each in one pass (the image embedding repeated per prompt), through the decoder's own
submodules, so adapters injected into its transformer take part. :class:`PromptedSAM` wraps it all in
a module (what DDP wraps): 2D slices ``(N, C, H, W)`` or volumes ``(B, C, D, H, W)`` in, mask logits
at the label size out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.modules_to_save import ModulesToSaveWrapper

__all__ = ["PromptedSAM", "active_module", "decode_masks", "preprocess_images", "scale_coords"]


def active_module(module: nn.Module) -> nn.Module:
    """The module that runs: the trained copy of a ``modules_to_save`` wrapper, or its original when disabled."""
    while isinstance(module, ModulesToSaveWrapper):
        module = module.trained if module.adapters_enabled else module.base_layer
    return module


def preprocess_images(sam: nn.Module, images: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Resize to SAM's input size and apply SAM's pixel normalisation.

    ``x' = (255 · x / max_value − pixel_mean) / pixel_std`` per channel, after a bilinear resize of
    ``(N, C, H, W)`` to ``(N, C, S, S)``; a one-channel image is repeated to SAM's three. (The public
    Med-SA code skips the normalisation.)
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    channels = sam.pixel_mean.shape[0]
    if images.shape[1] == 1 and channels != 1:
        images = images.expand(-1, channels, -1, -1)
    if images.shape[1] != channels:
        raise ValueError(f"images must have 1 or {channels} channels, got {images.shape[1]}")
    size = sam.image_encoder.img_size
    if tuple(images.shape[-2:]) != (size, size):
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return (images * (255.0 / max_value) - sam.pixel_mean) / sam.pixel_std


def scale_coords(coords: torch.Tensor, from_size: tuple[int, int], to_size: int) -> torch.Tensor:
    """Map pixel coordinates ``(..., 2)`` as ``(x, y)`` from a ``(H, W)`` grid to an ``S × S`` grid.

    Pixel centres map to pixel centres: ``x' = (x + 0.5) · S / W − 0.5`` (likewise y with H).
    """
    h, w = from_size
    scale = coords.new_tensor([to_size / w, to_size / h])
    return (coords + 0.5) * scale - 0.5


def decode_masks(decoder: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                 sparse: torch.Tensor, dense: torch.Tensor, multimask_output: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``MaskDecoder`` for ``N`` images with ``K`` prompts each, in one batched pass.

    Args:
        decoder: a ``segment_anything`` ``MaskDecoder`` (or a ``modules_to_save`` wrapper of one).
        image_embeddings: ``(N, C, h, w)``.
        image_pe: ``(1, C, h, w)`` from ``prompt_encoder.get_dense_pe()``.
        sparse: ``(N·K, T, C)`` prompt tokens, grouped by image (prompts of image 0 first).
        dense: ``(N·K, C, h, w)``.
        multimask_output: the three ambiguity masks instead of the single one.

    Returns:
        ``(low-res mask logits (N·K, M, 4h, 4w), IoU predictions (N·K, M))``, ``M`` = 1 or 3.
    """
    decoder = active_module(decoder)
    n, m = image_embeddings.shape[0], sparse.shape[0]
    if m % n:
        raise ValueError(f"sparse prompts ({m}) must be a multiple of the images ({n})")
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(m, -1, -1), sparse], dim=1)
    src = (image_embeddings if m == n else image_embeddings.repeat_interleave(m // n, dim=0)) + dense
    pos_src = image_pe.expand(m, -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                           dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    chosen = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, chosen], iou_pred[:, chosen]


class PromptedSAM(nn.Module):
    """``forward(batch) → {"logits", "iou"}``: SAM prompted with boxes or points, batched.

    The batch holds ``image`` ``(N, C, H, W)`` (2D) or ``(B, C, D, H, W)`` (a volume, one slice per
    depth index), values in ``[0, max_value]``, and prompts per slice and class, in pixel coordinates
    of the ``(H_l, W_l)`` label grid: ``boxes (*lead, K, 4)`` and/or ``points (*lead, K, P, 2)`` with
    ``point_labels (*lead, K, P)`` (1 positive, 0 negative, −1 padding), where ``lead`` is ``(N,)`` or
    ``(B, D)``; ``label_size`` ``(H_l, W_l)`` (default: the image's ``(H, W)``). Logits come back as
    ``(*lead, K, H_l, W_l)``, IoU predictions as ``(*lead, K)``.

    Args:
        sam: a ``segment_anything`` ``Sam`` (adapters injected or not).
        volume_input: ``"auto"``: pass volumes to the encoder when it has SD-Trans (it then returns
            ``(B, D, C, h, w)``), else encode the ``B·D`` slices as a batch; ``"slices"`` or
            ``"volume"`` force one way.
        max_value: the images' maximum intensity (1 for [0, 1] inputs, 255 for bytes).
    """

    def __init__(self, sam: nn.Module, volume_input: str = "auto", max_value: float = 1.0) -> None:
        super().__init__()
        if volume_input not in ("auto", "slices", "volume"):
            raise ValueError(f"volume_input must be 'auto', 'slices' or 'volume', got {volume_input!r}")
        self.sam, self.max_value = sam, float(max_value)
        if volume_input == "auto":
            volume_input = "volume" if any(type(m).__module__.endswith("space_depth")
                                           for m in sam.image_encoder.modules()) else "slices"
        self.volume_input = volume_input

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(N, C, h, w)``, one per slice (``N = B·D`` for volumes)."""
        if images.ndim == 4:
            return self.sam.image_encoder(preprocess_images(self.sam, images, self.max_value))
        if images.ndim != 5:
            raise ValueError(f"image must be (N, C, H, W) or (B, C, D, H, W), got {tuple(images.shape)}")
        b, c, d = images.shape[:3]
        slices = preprocess_images(self.sam, images.movedim(2, 1).flatten(0, 1), self.max_value)
        if self.volume_input == "slices":
            return self.sam.image_encoder(slices)
        volume = slices.unflatten(0, (b, d)).movedim(1, 2)  # (B, C, D, S, S)
        return self.sam.image_encoder(volume).flatten(0, 1)  # (B, D, C', h, w) -> (B·D, C', h, w)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        lead = images.shape[:1] if images.ndim == 4 else (images.shape[0], images.shape[2])
        label_size = tuple(batch.get("label_size", images.shape[-2:]))
        size = self.sam.image_encoder.img_size
        boxes, points = batch.get("boxes"), batch.get("points")
        if boxes is None and points is None:
            raise ValueError("batch must hold 'boxes' and/or 'points' (with 'point_labels')")
        prompts = boxes if boxes is not None else points[..., 0, :]
        if tuple(prompts.shape[:len(lead)]) != tuple(lead):
            raise ValueError(f"prompts must have leading shape {tuple(lead)} (one set per slice), "
                             f"got {tuple(prompts.shape)}")
        k = prompts.shape[len(lead)]
        sparse_points = None
        if points is not None:
            coords = scale_coords(points.flatten(0, len(lead)).float(), label_size, size)
            sparse_points = (coords, batch["point_labels"].flatten(0, len(lead)).to(coords.device))
        flat_boxes = None
        if boxes is not None:
            flat_boxes = scale_coords(boxes.flatten(0, len(lead)).float().reshape(-1, 2, 2), label_size, size)
            flat_boxes = flat_boxes.reshape(-1, 4)
        embeddings = self.encode(images)
        sparse, dense = self.sam.prompt_encoder(points=sparse_points, boxes=flat_boxes, masks=None)
        masks, iou = decode_masks(self.sam.mask_decoder, embeddings, self.sam.prompt_encoder.get_dense_pe(),
                                  sparse, dense, multimask_output=False)
        logits = F.interpolate(masks, size=label_size, mode="bilinear", align_corners=False)
        return {"logits": logits[:, 0].reshape(*lead, k, *label_size), "iou": iou[:, 0].reshape(*lead, k)}
