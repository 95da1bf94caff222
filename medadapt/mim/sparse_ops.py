"""SparK-style masked CNN ops, applied to an unmodified module's output by a forward hook.

Dense ops (convolutions, pooling) keep their output and multiply it by the mask ``m`` at their
resolution. Normalisations are recomputed from the module's input with statistics of visible voxels
only, using the module's own affine parameters, then masked:
``y = (x − μ_vis) / sqrt(σ²_vis + eps) · γ + β`` then ``y ⊙ m``, where ``μ_vis, σ²_vis`` are taken
over the visible voxels of each normalisation group (per sample and group for GroupNorm, per sample and
channel for InstanceNorm, per channel over the batch for BatchNorm — over the whole distributed batch for a
SyncBatchNorm in training under ``torch.distributed``). BatchNorm's and InstanceNorm's running
statistics (``track_running_stats``) are updated from the visible voxels (unbiased variance, momentum and
``num_batches_tracked`` as torch's own module does; see ``_update_running``).
"""

from __future__ import annotations

import torch
from torch import nn

from medadapt.models.mednext import LayerNorm3d

__all__ = ["MASKED_OUTPUT_TYPES", "VISIBLE_NORM_TYPES", "PER_VOXEL_NORM_TYPES", "visible_norm"]

MASKED_OUTPUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d,
)
VISIBLE_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.InstanceNorm3d, nn.BatchNorm3d,
                                                   nn.SyncBatchNorm)
PER_VOXEL_NORM_TYPES: tuple[type[nn.Module], ...] = (LayerNorm3d,)


def _normalise(x: torch.Tensor, m: torch.Tensor, reduce_dims: tuple[int, ...], eps: float, group=None):
    """Normalise ``x`` with mean/biased variance over visible entries along ``reduce_dims``; with a process
    ``group`` the counts and sums are added over its ranks (differentiable all-reduces, as ``nn.SyncBatchNorm``
    does): mean first, then the centred squares."""
    def pooled(t: torch.Tensor) -> torch.Tensor:
        return t if group is None else _AllReduceSum.apply(t, group)

    count = pooled(m.expand_as(x).sum(reduce_dims, keepdim=True)).clamp(min=1)
    mean = pooled((x * m).sum(reduce_dims, keepdim=True)) / count
    centred = x - mean
    var = pooled((centred.square() * m).sum(reduce_dims, keepdim=True)) / count
    return centred * torch.rsqrt(var + eps), mean, var, count


def _affine(y: torch.Tensor, weight, bias, channels: int) -> torch.Tensor:
    shape = (1, channels) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def _group_norm(module: nn.GroupNorm, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    batch, channels = x.shape[:2]
    groups = module.num_groups
    xg = x.reshape(batch, groups, channels // groups, -1)
    mg = m.reshape(batch, 1, 1, -1).to(x.dtype)
    y, *_ = _normalise(xg, mg, (2, 3), module.eps)
    return _affine(y.view_as(x), module.weight, module.bias, channels)


def _instance_norm(module: nn.InstanceNorm3d, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    batch, channels = x.shape[:2]
    if module.track_running_stats and not module.training:
        mean = module.running_mean.view(1, channels, 1, 1, 1)
        var = module.running_var.view(1, channels, 1, 1, 1)
        y = (x - mean) * torch.rsqrt(var + module.eps)
    else:
        xf, mf = x.reshape(batch, channels, -1), m.reshape(batch, 1, -1).to(x.dtype)
        y, mean, var, count = _normalise(xf, mf, (2,), module.eps)
        if module.track_running_stats and module.training:
            _update_running(module, mean.mean(0).flatten(), (var * count / (count - 1).clamp(min=1)).mean(0))
        y = y.view_as(x)
    return _affine(y, module.weight, module.bias, channels)


def _sync_group(module: nn.Module):
    """The process group whose visible voxels a SyncBatchNorm in training pools (None: no syncing)."""
    if not (isinstance(module, nn.SyncBatchNorm) and module.training and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        return None
    group = module.process_group or torch.distributed.group.WORLD
    return group if torch.distributed.get_world_size(group) > 1 else None


class _AllReduceSum(torch.autograd.Function):
    """``Σ_ranks t`` over ``group``; its gradient is the sum of the ranks' output gradients (every rank's loss
    depends on every rank's input through it)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    use_batch_stats = module.training or not module.track_running_stats
    if use_batch_stats:
        xf = x.transpose(0, 1).reshape(channels, -1)
        mf = m.transpose(0, 1).reshape(1, -1).to(x.dtype)
        y, mean, var, count = _normalise(xf, mf, (1,), module.eps, _sync_group(module))
        y = y.view(channels, x.shape[0], *x.shape[2:]).transpose(0, 1)
        if module.training and module.track_running_stats:
            _update_running(module, mean.flatten(), (var * count / (count - 1).clamp(min=1)).flatten())
    else:
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
    return _affine(y, module.weight, module.bias, channels)


def _update_running(module: nn.Module, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    """``running ← (1 − momentum) · running + momentum · batch``, following torch's module semantics.

    BatchNorm: ``num_batches_tracked += 1`` and ``momentum=None`` means the cumulative average
    ``momentum = 1 / num_batches_tracked``. InstanceNorm: ``num_batches_tracked`` is left unchanged and
    ``momentum=None`` means ``momentum = 0`` (running statistics unchanged), as ``nn.InstanceNorm3d`` does.
    """
    with torch.no_grad():
        momentum = module.momentum
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(module.num_batches_tracked)
        elif momentum is None:
            momentum = 0.0
        if momentum == 0:
            return
        module.running_mean.mul_(1 - momentum).add_(mean.detach().flatten(), alpha=momentum)
        module.running_var.mul_(1 - momentum).add_(unbiased_var.detach().flatten(), alpha=momentum)


def visible_norm(module: nn.Module, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``module``'s normalisation of ``x (B, C, D, H, W)`` with visible-only statistics, times ``m``.

    Args:
        module: a GroupNorm, InstanceNorm3d, (Sync)BatchNorm3d or LayerNorm3d (its parameters are used).
        x: the module's input.
        m: visibility ``(B, 1, D, H, W)`` (bool or 0/1).

    Running statistics of InstanceNorm/BatchNorm with ``track_running_stats`` are updated here; the
    caller restores what the module's own forward wrote.
    """
    mf = m.to(x.dtype)
    if isinstance(module, PER_VOXEL_NORM_TYPES):
        return module.forward(x) * mf  # .forward: no hooks (a hook may be calling this)
    if isinstance(module, nn.GroupNorm):
        y = _group_norm(module, x, mf)
    elif isinstance(module, nn.InstanceNorm3d):
        y = _instance_norm(module, x, mf)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        y = _batch_norm(module, x, mf)
    else:
        raise ValueError(f"module must be one of {VISIBLE_NORM_TYPES + PER_VOXEL_NORM_TYPES}, "
                         f"got {type(module).__name__}")
    return y * mf
