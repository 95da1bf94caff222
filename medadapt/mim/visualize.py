"""PNG of MambaMIM inputs and reconstructions: one row per view, columns input / masked / reconstruction."""

from __future__ import annotations

import os

import torch

from .._atomic import atomic_output, image_format
from .._optional import require

__all__ = ["save_reconstruction_png"]


def save_reconstruction_png(path: str | os.PathLike, outputs: dict[str, torch.Tensor], volume: torch.Tensor,
                            title: str = "") -> str:
    """Save the central slices (three axes) of sample 0 of ``volume``, ``outputs["masked"]`` and
    ``outputs["merged"]`` (from ``MambaMIM.reconstruct``) to ``path``; returns the path."""
    matplotlib = require("matplotlib", "the reconstruction PNG")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "the reconstruction PNG")
    columns = [("input", volume[0, 0]), ("masked input", outputs["masked"][0, 0]),
               ("reconstruction (visible patches pasted)", outputs["merged"][0, 0])]
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    for row in range(3):
        for col, (name, image) in enumerate(columns):
            image = image.detach().float().cpu()
            index = image.shape[row] // 2
            view = image.select(row, index).T  # axis 1 up
            axes[row, col].imshow(view.numpy(), cmap="gray", origin="lower", vmin=0.0, vmax=1.0)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format=image_format(path))
    plt.close(fig)
    return os.fspath(path)
