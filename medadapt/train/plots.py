"""PNG figures of a fine-tune: overlays on held-out slices, and the loss / Dice curves (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .._atomic import atomic_output, image_format
from .._optional import require
from .loop import History

__all__ = ["save_curves", "save_overlays"]

_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def _pyplot():
    matplotlib = require("matplotlib", "the fine-tune figures")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "the fine-tune figures")


OVERLAY_TITLE = "held-out slices: prediction filled, ground truth outlined, prompt dashed/marked"


def save_overlays(path: str | os.PathLike, images: torch.Tensor, targets: torch.Tensor,
                  predictions: Mapping[str, torch.Tensor], class_names: Sequence[str],
                  boxes: torch.Tensor | None = None, points: torch.Tensor | None = None,
                  point_labels: torch.Tensor | None = None, dice: Mapping[str, Sequence[float]] | None = None,
                  title: str = OVERLAY_TITLE) -> None:
    """One row per prediction set (e.g. before / after training), one column per held-out slice.

    Each panel: the slice in grey, the predicted mask filled (a colour per class), the ground truth as
    a contour in the same colour, and the prompt (box dashed, positive points as +, negative as x).

    Args:
        images: ``(N, H, W)`` grey slices.
        targets: ``(N, K, H, W)`` ground-truth masks.
        predictions: name → ``(N, K, H, W)`` boolean masks.
        class_names: K names for the legend.
        boxes: ``(N, K, 4)`` xyxy prompts; points ``(N, K, P, 2)`` and point_labels ``(N, K, P)``.
        dice: name → per-slice Dice shown in the panel titles.
        title: the figure's title.
    """
    plt = _pyplot()
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Rectangle

    n, k = targets.shape[:2]
    rows = list(predictions)
    fig, axes = plt.subplots(len(rows), n, figsize=(2.4 * n, 2.5 * len(rows)), squeeze=False)
    for r, name in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            rgb = np.repeat(images[i].float().cpu().numpy()[..., None], 3, axis=-1)
            rgb = (rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-8)
            for c in range(k):
                colour = np.array(to_rgb(_COLOURS[c % len(_COLOURS)]))
                pred = predictions[name][i, c].cpu().numpy().astype(bool)
                rgb[pred] = 0.55 * rgb[pred] + 0.45 * colour
            ax.imshow(rgb, interpolation="nearest")
            for c in range(k):
                colour = _COLOURS[c % len(_COLOURS)]
                truth = targets[i, c].cpu().numpy().astype(float)
                if truth.any():
                    ax.contour(truth, levels=[0.5], colors=[colour], linewidths=0.8)
                if boxes is not None and truth.any():
                    x0, y0, x1, y1 = boxes[i, c].tolist()
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                                           edgecolor=colour, linestyle="--", linewidth=0.8))
                if points is not None and point_labels is not None:
                    for (x, y), lab in zip(points[i, c].tolist(), point_labels[i, c].tolist()):
                        if lab >= 0:
                            ax.plot(x, y, marker="+" if lab == 1 else "x", color="yellow", markersize=7, mew=1.5)
            panel = name
            if dice is not None and name in dice:
                panel += f"  Dice {dice[name][i]:.2f}"
            ax.set_title(panel, fontsize=8)
            ax.axis("off")
    handles = [plt.Line2D([], [], color=_COLOURS[c % len(_COLOURS)], lw=3) for c in range(k)]
    fig.legend(handles, list(class_names), loc="lower center", ncol=min(k, 6), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    with atomic_output(path) as tmp:
        fig.savefig(os.fspath(tmp), dpi=110, format=image_format(path))
    plt.close(fig)


def save_curves(path: str | os.PathLike, history: History, class_names: Sequence[str]) -> None:
    """Training loss per step (and a moving average) beside the held-out Dice per class and its mean."""
    plt = _pyplot()
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.6))
    if history.losses:
        ax_loss.plot(history.steps, history.losses, color="#999999", lw=0.8, label="loss")
        window = max(1, len(history.losses) // 10)
        if window > 1:
            smooth = np.convolve(history.losses, np.ones(window) / window, mode="valid")
            ax_loss.plot(history.steps[window - 1:], smooth, color="#d62728", lw=1.5, label=f"mean of {window}")
        ax_loss.legend(fontsize=8)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("DiceCE + IoU-head MSE")
    ax_loss.set_title("training loss")
    if history.eval_steps:
        per_class = np.array(history.eval_per_class)
        if per_class.shape[1] > 1:
            for c, name in enumerate(class_names):
                ax_dice.plot(history.eval_steps, per_class[:, c], marker="o", ms=3, lw=1,
                             color=_COLOURS[c % len(_COLOURS)], label=name)
        ax_dice.plot(history.eval_steps, history.eval_dice, marker="o", color="black", lw=2, label="mean Dice")
        ax_dice.legend(fontsize=8)
    ax_dice.set_ylim(0, 1)
    ax_dice.set_xlabel("step")
    ax_dice.set_ylabel("Dice")
    ax_dice.set_title("held-out Dice")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(os.fspath(tmp), dpi=110, format=image_format(path))
    plt.close(fig)
