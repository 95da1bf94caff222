"""Training loss and held-out Dice for prompted segmentation (MONAI ``DiceCELoss`` / ``DiceMetric``).

Every (slice, class) pair with the class present is one binary sample ``(1, H, W)``; pairs whose class
is absent from the slice are left out (their prompt is empty).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .._optional import require

__all__ = ["PromptedSegmentationLoss", "dice_sums", "evaluate", "to_device"]


def _present_pairs(tensor: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``(*lead, K, H, W)`` → ``(M, 1, H, W)``: the pairs whose class is present."""
    return tensor.reshape(-1, *tensor.shape[-2:])[present.reshape(-1)].unsqueeze(1)


class PromptedSegmentationLoss(nn.Module):
    """``L = DiceCE(σ(logits), target) + λ · MSE(IoU_pred, IoU(logits > 0, target))``.

    DiceCE is MONAI's ``DiceCELoss(sigmoid=True)`` (Dice per sample, then the mean, plus binary cross
    entropy), the Med-SA 3D loss. The second term trains SAM's IoU head on the IoU its own mask reaches
    (the SAM recipe); it also keeps every trainable decoder parameter in the graph, which DDP needs.

    Args:
        iou_weight: λ (0 leaves the IoU head untrained).
    """

    def __init__(self, iou_weight: float = 1.0) -> None:
        super().__init__()
        losses = require("monai.losses", "the fine-tune loss")
        self.dice_ce = losses.DiceCELoss(sigmoid=True)
        self.iou_weight = float(iou_weight)

    def forward(self, output: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        present = batch["present"].to(output["logits"].device)
        logits = _present_pairs(output["logits"], present)
        if logits.shape[0] == 0:
            return output["logits"].sum() * 0.0 + output["iou"].sum() * 0.0
        target = _present_pairs(batch["target"].to(logits.device), present).float()
        loss = self.dice_ce(logits, target)
        if self.iou_weight:
            with torch.no_grad():
                pred = logits > 0
                inter = (pred & target.bool()).flatten(1).sum(1)
                union = (pred | target.bool()).flatten(1).sum(1).clamp(min=1)
                actual = inter.float() / union.float()
            iou_pred = output["iou"].reshape(-1)[present.reshape(-1)]
            loss = loss + self.iou_weight * torch.mean((iou_pred - actual) ** 2)
        return loss


def dice_sums(logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums and counts of Dice over the slices where the class is present.

    ``Dice = 2|P ∩ G| / (|P| + |G|)`` with ``P = logits > 0`` (MONAI ``DiceMetric``, empty ground truth
    ignored). Inputs are ``(*lead, K, H, W)`` and ``present (*lead, K)``.

    Returns:
        ``(sums (K,) float64, counts (K,) float64)``; the mean Dice of class k is ``sums[k] / counts[k]``.
    """
    metrics = require("monai.metrics", "held-out Dice")
    k = logits.shape[-3]
    pred = (logits > 0).reshape(-1, k, *logits.shape[-2:]).float()
    truth = target.reshape(-1, k, *target.shape[-2:]).float().to(pred.device)
    per_pair = metrics.DiceMetric(include_background=True, reduction="none", ignore_empty=True)(pred, truth)
    keep = present.reshape(-1, k).to(per_pair.device) & ~torch.isnan(per_pair)
    sums = torch.where(keep, per_pair, torch.zeros_like(per_pair)).sum(0).double()
    return sums, keep.sum(0).double()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], device: torch.device | str = "cpu",
             num_classes: int | None = None) -> dict:
    """Held-out Dice per class (mean over slices where the class is present) and their mean.

    ``model`` is a :class:`~medadapt.train.prompted.PromptedSAM` (not the DDP wrapper). Under
    ``torch.distributed`` each rank scores its own share of the batches and the sums are all-reduced,
    so every rank returns the same numbers (a rank with no batch contributes zeros: pass ``num_classes``).

    Returns:
        ``{"dice_per_class": [K floats], "dice": mean over classes, "pairs": [K counts]}``.
    """
    was_training = model.training
    model.eval()
    sums = counts = None
    for batch in batches:
        batch = to_device(batch, device)
        output = model(batch)
        s, c = dice_sums(output["logits"], batch["target"], batch["present"])
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    model.train(was_training)
    if sums is None:
        if num_classes is None:
            raise ValueError("evaluate got no batches (pass num_classes when a rank may have none)")
        sums = counts = torch.zeros(num_classes, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        stacked = torch.stack([sums, counts]).to(device)
        dist.all_reduce(stacked)
        sums, counts = stacked[0].cpu(), stacked[1].cpu()
    per_class = (sums / counts.clamp(min=1)).tolist()
    scored = [d for d, c in zip(per_class, counts.tolist()) if c > 0]
    return {"dice_per_class": per_class, "dice": sum(scored) / max(len(scored), 1), "pairs": counts.tolist()}


def to_device(batch: dict, device: torch.device | str) -> dict:
    """The batch with every tensor moved to ``device``."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
