"""Prompts for SAM sampled from a label map, per slice and per class, vectorised and seeded.

Coordinates follow SAM: pixel indices of the slice as ``x`` (column) and ``y`` (row); boxes are
``(x0, y0, x1, y1)`` with inclusive corners; point labels are 1 (positive), 0 (negative) and −1
(padding, SAM's "not a point"). ``label`` may have any leading shape ``(..., H, W)``; results get a
class axis ``K`` after the leading dims. A class absent from a slice gives ``present = False``, a zero
box and padding points.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["class_masks", "interior_points", "mask_bounding_boxes", "sample_box_prompts", "sample_point_prompts"]


def _generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")
    return generator


def class_masks(label: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``masks[..., k, :, :] = (label == classes[k])``, shape ``(..., K, H, W)``."""
    if label.ndim < 2:
        raise ValueError(f"label must have shape (..., H, W), got {tuple(label.shape)}")
    if len(classes) == 0:
        raise ValueError("classes must name at least one class")
    values = torch.as_tensor(list(classes), device=label.device, dtype=label.dtype)
    return label.unsqueeze(-3) == values.view(-1, 1, 1)


def mask_bounding_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes of boolean masks ``(..., H, W)``: ``(boxes (..., 4) float xyxy, present (...) bool)``."""
    h, w = masks.shape[-2:]
    cols, rows = masks.any(-2), masks.any(-1)  # (..., W), (..., H)
    present = rows.any(-1)
    col_idx = torch.arange(w, device=masks.device)
    row_idx = torch.arange(h, device=masks.device)
    x0 = torch.where(cols, col_idx, w).amin(-1)
    x1 = torch.where(cols, col_idx, -1).amax(-1)
    y0 = torch.where(rows, row_idx, h).amin(-1)
    y1 = torch.where(rows, row_idx, -1).amax(-1)
    boxes = torch.stack([x0, y0, x1, y1], -1).float()
    return torch.where(present.unsqueeze(-1), boxes, torch.zeros_like(boxes)), present


def _deepest_by_erosion(core: torch.Tensor) -> torch.Tensor:
    """Erode ``(N, 1, H, W)`` float masks with a 3 × 3 square until the next erosion would empty each one."""
    while True:  # at most min(H, W) / 2 rounds
        eroded = -F.max_pool2d(-F.pad(core, (1, 1, 1, 1)), 3, stride=1)
        alive = eroded.flatten(1).any(-1)
        if not alive.any():
            return core[:, 0].bool()
        core = torch.where(alive.view(-1, 1, 1, 1), eroded, core)


def _deepest(masks: torch.Tensor) -> torch.Tensor:
    """The pixels of largest chessboard distance to the outside of each mask ``(N, H, W)`` (border outside)."""
    try:
        from scipy.ndimage import distance_transform_cdt
    except ImportError:  # the same set by repeated erosion: O(H·W·depth), fine for small slices
        return _deepest_by_erosion(masks[:, None].float())
    deepest = torch.zeros_like(masks)
    for i, mask in enumerate(masks.cpu().numpy()):
        if mask.any():
            depth = distance_transform_cdt(np.pad(mask, 1), metric="chessboard")[1:-1, 1:-1]
            deepest[i] = torch.from_numpy(depth == depth.max())
    return deepest


def interior_points(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The click a user would make: per boolean mask ``(..., H, W)``, the pixel deepest inside it.

    Depth is the chessboard distance to the outside, ``depth(p) = min over q outside of max(|p_x − q_x|,
    |p_y − q_y|)``, the slice border counting as outside (``scipy.ndimage.distance_transform_cdt``, or the
    same by repeated 3 × 3 erosion without scipy); of the deepest pixels the one nearest their centroid is
    taken (so a ring gets a point on the ring, not in its hole).

    Returns:
        ``(xy (..., 2) float32, present (...) bool)``; absent masks give ``(0, 0)``.
    """
    if masks.ndim < 2:
        raise ValueError(f"masks must have shape (..., H, W), got {tuple(masks.shape)}")
    lead, (h, w) = masks.shape[:-2], masks.shape[-2:]
    flat = masks.reshape(-1, h, w).bool()
    present = flat.flatten(1).any(-1)
    core = _deepest(flat)
    ys, xs = torch.meshgrid(torch.arange(h, device=masks.device), torch.arange(w, device=masks.device),
                            indexing="ij")
    count = core.flatten(1).sum(-1).clamp(min=1)
    cx = (core * xs).flatten(1).sum(-1) / count
    cy = (core * ys).flatten(1).sum(-1) / count
    dist = (xs - cx.view(-1, 1, 1)) ** 2 + (ys - cy.view(-1, 1, 1)) ** 2
    flat_index = torch.where(core, dist, torch.full_like(dist, float("inf"))).flatten(1).argmin(-1)
    xy = torch.stack([flat_index % w, flat_index // w], -1).float()
    xy = torch.where(present.unsqueeze(-1), xy, torch.zeros_like(xy))
    return xy.reshape(*lead, 2), present.reshape(lead)


def sample_box_prompts(label: torch.Tensor, classes: Sequence[int], jitter: float = 0.1,
                       generator: torch.Generator | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Box per slice and class from the mask's bounding box, each side moved by a random jitter.

    ``x0' = clamp(x0 + u·jitter·(x1 − x0 + 1))`` with ``u ~ U(−1, 1)`` drawn per coordinate (likewise for
    the other three, with the box height for y), clamped to the slice and kept ordered.

    Returns:
        ``(boxes (..., K, 4) float32, present (..., K) bool)``.
    """
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    h, w = label.shape[-2:]
    boxes, present = mask_bounding_boxes(class_masks(label, classes))
    if jitter > 0:
        noise = torch.rand(boxes.shape, generator=_generator(generator)).to(boxes.device) * 2 - 1
        width = boxes[..., 2] - boxes[..., 0] + 1
        height = boxes[..., 3] - boxes[..., 1] + 1
        side = torch.stack([width, height, width, height], -1)
        moved = (boxes + noise * jitter * side).round()
        limit = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=boxes.dtype, device=boxes.device)
        moved = torch.minimum(moved.clamp(min=0), limit)
        low = torch.minimum(moved[..., :2], moved[..., 2:])
        high = torch.maximum(moved[..., :2], moved[..., 2:])
        boxes = torch.where(present.unsqueeze(-1), torch.cat([low, high], -1), boxes)
    return boxes, present


def _sample_pixels(region: torch.Tensor, count: int, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` distinct pixels drawn uniformly from each boolean ``region`` (N, H, W).

    Returns ``(xy (N, count, 2), valid (N, count))``; beyond the region's size the entries are invalid
    (also when ``count`` exceeds ``H·W``).
    """
    n, h, w = region.shape
    scores = torch.rand((n, h * w), generator=generator).to(region.device)
    scores = torch.where(region.reshape(n, -1), scores, torch.full_like(scores, -1.0))
    if count > h * w:  # more points than pixels: the extra ones are padding
        scores = torch.cat([scores, scores.new_full((n, count - h * w), -1.0)], dim=-1)
    top, flat = scores.topk(count, dim=-1)
    xy = torch.stack([flat % w, flat // w], -1).float()
    valid = top >= 0
    return torch.where(valid.unsqueeze(-1), xy, torch.zeros_like(xy)), valid


def sample_point_prompts(label: torch.Tensor, classes: Sequence[int], num_positive: int = 1,
                         num_negative: int = 0, negative_region: str = "outside",
                         generator: torch.Generator | int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positive points drawn uniformly inside each class mask, negative points outside it.

    Args:
        label: class index map ``(..., H, W)``.
        classes: class values to prompt, ``K`` of them.
        num_positive: points inside the mask (distinct pixels).
        num_negative: points outside it: anywhere (``"outside"``) or inside the mask's bounding box
            (``"box"``, the hard negatives next to the object).
        generator: ``torch.Generator`` or int seed.

    Returns:
        ``(coords (..., K, P, 2) float32 xy, point_labels (..., K, P) int64, present (..., K) bool)`` with
        ``P = num_positive + num_negative``; points that could not be drawn (mask smaller than asked)
        are padding (label −1, coordinates 0).
    """
    if num_positive < 0 or num_negative < 0 or num_positive + num_negative == 0:
        raise ValueError(f"num_positive ({num_positive}) and num_negative ({num_negative}) must be >= 0, "
                         "not both 0")
    if negative_region not in ("outside", "box"):
        raise ValueError(f"negative_region must be 'outside' or 'box', got {negative_region!r}")
    gen = _generator(generator)
    masks = class_masks(label, classes)
    lead, (h, w) = masks.shape[:-2], masks.shape[-2:]
    flat = masks.reshape(-1, h, w)
    present = flat.flatten(1).any(-1)
    coords, labels = [], []
    if num_positive:
        xy, valid = _sample_pixels(flat, num_positive, gen)
        coords.append(xy)
        labels.append(torch.where(valid, 1, -1))
    if num_negative:
        region = ~flat
        if negative_region == "box":
            boxes, _ = mask_bounding_boxes(flat)
            cols = torch.arange(w, device=flat.device)
            rows = torch.arange(h, device=flat.device)
            in_x = (cols >= boxes[:, 0:1]) & (cols <= boxes[:, 2:3])
            in_y = (rows >= boxes[:, 1:2]) & (rows <= boxes[:, 3:4])
            region = region & in_y[:, :, None] & in_x[:, None, :]
        xy, valid = _sample_pixels(region & present.view(-1, 1, 1), num_negative, gen)
        coords.append(xy)
        labels.append(torch.where(valid, 0, -1))
    coords_t = torch.cat(coords, 1).reshape(*lead, -1, 2)
    labels_t = torch.cat(labels, 1).long().reshape(*lead, -1)
    return coords_t, labels_t, present.reshape(lead)
