"""Reconstruction target and loss: per-patch normalised MSE over masked patches only (MAE ``norm_pix``).

``patchify``: ``(B, C, D, H, W) → (B, L, p³·C)`` with patches in raster order of the grid.
Target per patch ``t = (x − mean(x)) / sqrt(var(x) + eps)`` (unbiased variance, as MAE/SparK);
``loss = Σ_l (1 − v_l) · mean((r_l − t_l)²) / Σ_l (1 − v_l)`` over all samples.
"""

from __future__ import annotations

import torch

__all__ = ["patchify", "unpatchify", "normalised_patch_targets", "masked_patch_mse"]


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, D, H, W) → (B, L, p³·C)``; L in raster order of the ``(D/p, H/p, W/p)`` grid."""
    batch, channels, *size = x.shape
    if len(size) != 3 or any(s % patch_size for s in size):
        raise ValueError(f"x must be (B, C, D, H, W) with sizes divisible by {patch_size}, got {tuple(x.shape)}")
    gd, gh, gw = (s // patch_size for s in size)
    p = patch_size
    x = x.reshape(batch, channels, gd, p, gh, p, gw, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(batch, gd * gh * gw, p**3 * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid) -> torch.Tensor:
    """Inverse of ``patchify`` for a ``grid = (g_d, g_h, g_w)``."""
    batch, length, dim = patches.shape
    gd, gh, gw = grid
    p = patch_size
    channels = dim // p**3
    if length != gd * gh * gw or dim != channels * p**3:
        raise ValueError(f"patches {tuple(patches.shape)} do not match grid {tuple(grid)} and patch {p}")
    x = patches.reshape(batch, gd, gh, gw, p, p, p, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(batch, channels, gd * p, gh * p, gw * p)


def normalised_patch_targets(x: torch.Tensor, patch_size: int, eps: float = 1e-6):
    """``(targets, mean, std)`` with per-patch normalised ``patchify(x)``; mean/std ``(B, L, 1)``."""
    patches = patchify(x, patch_size)
    mean = patches.mean(-1, keepdim=True)
    std = (patches.var(-1, keepdim=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


def masked_patch_mse(reconstruction: torch.Tensor, target: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE.

    Args:
        reconstruction, target: ``(B, L, P)`` patches.
        visible: ``(B, L)`` bool; True patches are ignored.
    """
    if reconstruction.shape != target.shape or visible.shape != target.shape[:2]:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)}, target {tuple(target.shape)} and "
                         f"visible {tuple(visible.shape)} must agree as (B, L, P) and (B, L)")
    per_patch = (reconstruction - target).square().mean(-1)
    masked = ~visible
    return torch.where(masked, per_patch, 0.0).sum() / masked.sum().clamp(min=1)
