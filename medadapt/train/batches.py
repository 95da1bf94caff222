"""Batches for the prompted pipeline: stacked images and labels plus prompts sampled from the labels.

A batch is a dict (2D: ``lead = (N,)``; slabs of D slices: ``lead = (B, D)``)::

    image        (N, C, H, W) or (B, C, D, H, W), float in [0, 1]
    target       (*lead, K, H, W) bool: label == classes[k]
    present      (*lead, K) bool: class k is in that slice (absent ones are left out of loss and Dice)
    boxes        (*lead, K, 4) xyxy            (prompt="box")
    points       (*lead, K, P, 2), point_labels (*lead, K, P)   (prompt="point")

Prompts are drawn with :mod:`medadapt.data.prompts` (jittered boxes, positive clicks inside the mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.prompts import class_masks, sample_box_prompts, sample_point_prompts

__all__ = ["PromptCollate", "add_prompts"]

_PROMPTS = ("box", "point")


def add_prompts(batch: dict, classes: Sequence[int], prompt: str = "box", jitter: float = 0.1,
                num_points: int = 1, generator: torch.Generator | int | None = None) -> dict:
    """Add ``target``, ``present`` and the prompts of ``classes`` to a batch holding ``image`` and ``label``.

    Args:
        batch: ``label`` is an integer map ``(*lead, H, W)``.
        classes: the class values to segment, one prompt each per slice.
        prompt: ``"box"`` (bounding box of the mask, each side jittered by up to ``jitter`` of the box
            size) or ``"point"`` (``num_points`` positive clicks drawn inside the mask).
        generator: seed or ``torch.Generator`` for the sampling.
    """
    if prompt not in _PROMPTS:
        raise ValueError(f"prompt must be 'box' or 'point', got {prompt!r}")
    label = batch["label"]
    out = dict(batch)
    out["target"] = class_masks(label, classes)
    if prompt == "box":
        out["boxes"], out["present"] = sample_box_prompts(label, classes, jitter=jitter, generator=generator)
    else:
        out["points"], out["point_labels"], out["present"] = sample_point_prompts(
            label, classes, num_positive=num_points, generator=generator)
    out["label_size"] = tuple(label.shape[-2:])
    return out


class PromptCollate:
    """``collate(samples) → batch``: stacks ``image`` and ``label`` and samples prompts.

    Args:
        classes: class values to prompt for.
        prompt: ``"box"`` or ``"point"``.
        jitter: box jitter (training; use 0 for evaluation).
        seed: seeds this collate's own generator (give each DDP rank its own seed).
        squeeze_depth: samples are slabs of one slice ``(C, 1, H, W)`` / ``(1, H, W)``: drop that axis (2D).
    """

    def __init__(self, classes: Sequence[int], prompt: str = "box", jitter: float = 0.1, num_points: int = 1,
                 seed: int = 0, squeeze_depth: bool = False) -> None:
        if prompt not in _PROMPTS:
            raise ValueError(f"prompt must be 'box' or 'point', got {prompt!r}")
        if not classes:
            raise ValueError("classes must name at least one class")
        self.classes, self.prompt, self.jitter, self.num_points = list(classes), prompt, jitter, num_points
        self.squeeze_depth = squeeze_depth
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, samples: list[dict]) -> dict:
        image = torch.stack([s["image"] for s in samples])
        label = torch.stack([s["label"] for s in samples])
        if self.squeeze_depth:
            if image.shape[2] != 1 or label.shape[1] != 1:
                raise ValueError(f"squeeze_depth needs one-slice samples, got image {tuple(image.shape)}")
            image, label = image[:, :, 0], label[:, 0]
        return add_prompts({"image": image, "label": label}, self.classes, self.prompt, self.jitter,
                           self.num_points, self.generator)
