"""Two fine-tunes side by side: held-out Dice with the encoder adapters and without them (decoder-only).

The verdict compares the mean held-out Dice after training, ``Δ = Dice_adapted − Dice_decoder_only``:
a win when ``Δ > margin``, a tie when ``|Δ| ≤ margin``, a loss otherwise. A tie or a loss comes with
the likely reason, so the summary never claims a gain the run did not show.

Context for both numbers: :func:`whole_region_dice`, the Dice of answering every prompted class with
the whole labelled region of the slice (the union of the prompted classes), and
:func:`whole_region_agreement`, how close a trained model's masks are to exactly that answer. A run
close to it has learned where the tissue is (which the prompt already says), not which tissue is which.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_output, image_format
from .._optional import require
from .job import FinetuneResult
from .objectives import dice_sums, to_device

__all__ = ["class_box_overlap", "comparison_summary", "comparison_verdict", "save_comparison_curves",
           "whole_region_agreement", "whole_region_dice"]

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def whole_region_dice(batches: Sequence[dict]) -> dict:
    """Held-out Dice of predicting the union of the prompted classes for every class (a reference).

    ``P_k = ∪_j G_j`` for each class k of a slice, scored like :func:`~medadapt.train.evaluate` (MONAI
    Dice, mean over the slices where class k is present). Returns ``{"dice", "dice_per_class"}``.
    """
    sums = counts = None
    for batch in batches:
        target = batch["target"].bool()
        union = target.any(-3, keepdim=True).expand_as(target)
        s, c = dice_sums(torch.where(union, 1.0, -1.0), target, batch["present"])
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    if sums is None:
        raise ValueError("batches must not be empty")
    per_class = (sums / counts.clamp(min=1)).tolist()
    scored = [d for d, c in zip(per_class, counts.tolist()) if c > 0]
    return {"dice": sum(scored) / max(len(scored), 1), "dice_per_class": per_class}


def class_box_overlap(batches: Sequence[dict]) -> float | None:
    """Mean IoU between the box prompts of two different classes in one slice (None: no boxes or one class).

    ``IoU = |A ∩ B| / |A ∪ B|`` over pixel boxes with inclusive corners, averaged over every slice and
    class pair where both classes are present. Near 1, a box alone hardly says which class is asked.
    """
    values = []
    for batch in batches:
        if "boxes" not in batch or batch["boxes"].shape[-2] < 2:
            return None
        k = batch["boxes"].shape[-2]
        boxes, present = batch["boxes"].reshape(-1, k, 4).double(), batch["present"].reshape(-1, k)
        for i in range(k):
            for j in range(i + 1, k):
                a, b = boxes[:, i], boxes[:, j]
                wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2]) + 1).clamp(min=0)
                inter = wh.prod(-1)
                area_a, area_b = (a[:, 2:] - a[:, :2] + 1).prod(-1), (b[:, 2:] - b[:, :2] + 1).prod(-1)
                values.append((inter / (area_a + area_b - inter))[present[:, i] & present[:, j]])
    joined = torch.cat(values) if values else torch.zeros(0)
    return float(joined.mean()) if joined.numel() else None


@torch.no_grad()
def whole_region_agreement(model: nn.Module, batches: Sequence[dict], device: torch.device | str = "cpu") -> float:
    """Mean Dice between a model's mask for each (slice, class) and the whole labelled region of the slice.

    ``Dice(P_k, ∪_j G_j)``, averaged over the present pairs of each class, then over the classes. Near 1,
    the model answers every prompt with the whole region: it has not learned which class is which.

    Args:
        model: a :class:`~medadapt.train.PromptedSAM` (not a DDP wrapper).
        batches: held-out batches with prompts (every rank may pass all of them: no collective inside).
    """
    was_training = model.training
    model.eval()
    sums = counts = None
    for batch in batches:
        batch = to_device(batch, device)
        target = batch["target"].bool()
        union = target.any(-3, keepdim=True).expand_as(target)
        s, c = dice_sums(model(batch)["logits"], union, batch["present"])
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    model.train(was_training)
    if sums is None:
        raise ValueError("batches must not be empty")
    per_class = [s / c for s, c in zip(sums.tolist(), counts.tolist()) if c > 0]
    return sum(per_class) / max(len(per_class), 1)


def comparison_verdict(adapted: float, baseline: float, random_backbone: bool, steps: int, margin: float = 0.005,
                       agreement: float | None = None, box_overlap: float | None = None) -> tuple[str, str]:
    """``("win" | "tie" | "loss", sentence)`` for mean held-out Dice ``adapted`` vs ``baseline``.

    Args:
        adapted: Dice of the run with the encoder adapters.
        baseline: Dice of the same run with them disabled.
        random_backbone: the SAM encoder has random weights (no ``--checkpoint``).
        steps: optimiser steps of each run.
        margin: ``|Δ|`` up to which the two count as equal.
        agreement: the smaller :func:`whole_region_agreement` of the two runs; at 0.85 or more the
            sentence says both answer every class with the whole labelled region.
        box_overlap: :func:`class_box_overlap`; above 0.5 (with such an agreement) the sentence adds
            that the boxes hardly differ between classes.
    """
    delta = adapted - baseline
    trivial = ""
    if agreement is not None and agreement >= 0.85:
        trivial = (f"; both runs answer every class with about the whole labelled region (Dice {agreement:.2f} "
                   "with it): they found the tissue the prompt points at, not which class is which")
        if box_overlap is not None and box_overlap > 0.5:
            trivial += (f" (the classes' boxes overlap, mean IoU {box_overlap:.2f}, so a box alone hardly says which "
                        "class is asked; --prompt point clicks inside the class)")
    if delta > margin:
        return "win", f"the encoder adapters win by {delta:+.4f} Dice{trivial}"
    if random_backbone:
        why = ("the backbone is random: the encoder adapters can only re-mix random features (there is no "
               "pretrained knowledge to adapt) while the mask decoder trains in full in both runs; pass "
               "--checkpoint sam_vit_b_01ec64.pth to compare on SAM's real encoder")
    else:
        why = (f"the budget is short ({steps} steps): the encoder adapters start at zero (identity) and may need "
               "more --steps or a higher --lr to pull ahead of the decoder alone")
    if abs(delta) <= margin:
        return "tie", (f"the encoder adapters do NOT win ({delta:+.4f} Dice, within {margin:g}){trivial}; likely "
                       f"because {why}")
    return "loss", f"the encoder adapters do NOT win ({delta:+.4f} Dice){trivial}; likely because {why}"


def comparison_summary(name: str, class_names: Sequence[str], adapted: FinetuneResult, baseline: FinetuneResult,
                       random_backbone: bool, labels: tuple[str, str] = ("encoder adapters", "decoder-only"),
                       reference: dict | None = None, agreement: float | None = None,
                       box_overlap: float | None = None) -> tuple[str, str]:
    """The one-line side-by-side summary and the verdict kind (see :func:`comparison_verdict`).

    ``reference`` is :func:`whole_region_dice` of the held-out batches (shown for context).
    """
    def dice(mean: float, per_class: Sequence[float]) -> str:
        return f"{mean:.4f} ({'/'.join(f'{d:.3f}' for d in per_class)})" if len(class_names) > 1 else f"{mean:.4f}"

    kind, sentence = comparison_verdict(adapted.dice_after, baseline.dice_after, random_backbone,
                                        baseline.steps_done, agreement=agreement, box_overlap=box_overlap)
    shown = f"; whole-region reference {dice(reference['dice'], reference['dice_per_class'])}" if reference else ""
    line = (f"[{name}] held-out Dice ({'/'.join(class_names)}) after {adapted.steps_done} steps: "
            f"{labels[0]} {dice(adapted.dice_after, adapted.dice_per_class_after)} "
            f"[{adapted.trainable_params:,} trainable] vs "
            f"{labels[1]} {dice(baseline.dice_after, baseline.dice_per_class_after)} "
            f"[{baseline.trainable_params:,} trainable] (before training {adapted.dice_before:.4f} / "
            f"{baseline.dice_before:.4f}{shown}) | {sentence}")
    return line, kind


def save_comparison_curves(path: str | os.PathLike, results: dict[str, FinetuneResult],
                           class_names: Sequence[str], reference: float | None = None) -> None:
    """Held-out Dice (mean solid, per class dotted) and smoothed training loss of each run, one colour each;
    ``reference`` (:func:`whole_region_dice`) as a grey line."""
    require("matplotlib", "the comparison figure").use("Agg")
    plt = require("matplotlib.pyplot", "the comparison figure")
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.6))
    for index, (label, result) in enumerate(results.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        history = result.history
        if history.losses:
            window = max(1, len(history.losses) // 10)
            smooth = np.convolve(history.losses, np.ones(window) / window, mode="valid")
            ax_loss.plot(history.steps[window - 1:], smooth, color=colour, lw=1.5, label=label)
        ax_dice.plot(history.eval_steps, history.eval_dice, marker="o", ms=3, color=colour, lw=2,
                     label=f"{label} (mean)")
        per_class = np.array(history.eval_per_class)
        if per_class.ndim == 2 and per_class.shape[1] > 1:
            for c, styles in zip(range(per_class.shape[1]), (":", "--", "-.", (0, (1, 3)))):
                ax_dice.plot(history.eval_steps, per_class[:, c], color=colour, lw=1, ls=styles,
                             label=f"{label}: {class_names[c]}")
    if reference is not None:
        ax_dice.axhline(reference, color="#777777", ls="--", lw=1, label="whole-region reference (mean)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("DiceCE + IoU-head MSE (moving mean)")
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=8)
    ax_dice.set_ylim(0, 1)
    ax_dice.set_xlabel("step")
    ax_dice.set_ylabel("Dice")
    ax_dice.set_title("held-out Dice")
    ax_dice.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(os.fspath(tmp), dpi=110, format=image_format(path))
    plt.close(fig)
