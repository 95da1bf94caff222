"""autograd.Functions of the fused adapter: the Triton one and a memory-saving torch one.

Both compute ``out = residual + scale · (act(x W_downᵀ + b_down) W_upᵀ + b_up)`` and save only ``x``
and the weights: the backward recomputes ``pre = x W_downᵀ + b_down`` and ``h = act(pre)``, then

``dW_up = scale · gᵀ h``, ``db_up = scale · Σ g``, ``dpre = scale · (g W_up) ⊙ act'(pre)``,
``dW_down = dpreᵀ x``, ``db_down = Σ dpre``, ``dx = dpre W_down``, ``d residual = g``.

Inputs arrive validated and in one compute dtype (see ``dispatch.fused_adapter``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .reference import activation_fn, fused_adapter_reference, scaled_matmul

__all__ = ["FusedAdapterTorchFunction", "FusedAdapterTritonFunction"]


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _activation_backward(grad: torch.Tensor, pre: torch.Tensor, activation: str) -> torch.Tensor:
    """``grad ⊙ act'(pre)`` with the same formulas autograd uses."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, F.relu(pre), 0)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_backward(grad, pre, approximate=approximate)


def _out_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


class FusedAdapterTorchFunction(torch.autograd.Function):
    """Torch path: the reference forward, a backward that recomputes the hidden activation."""

    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, residual, scale: float, activation: str):
        with _no_autocast(x.device):
            out = fused_adapter_reference(x, w_down, b_down, w_up, b_up, scale, residual, activation)
        ctx.save_for_backward(x, w_down, b_down, w_up)
        ctx.scale, ctx.activation = scale, activation
        ctx.residual_dtype = None if residual is None else residual.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_down, b_down, w_up = ctx.saved_tensors
        need = ctx.needs_input_grad
        with _no_autocast(x.device):
            x2 = x.reshape(-1, x.shape[-1])
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(w_up.dtype)
            pre = F.linear(x2, w_down, b_down)
            d_w_up = scaled_matmul(g.t(), activation_fn(ctx.activation)(pre), ctx.scale) if need[3] else None
            d_b_up = g.sum(0) * ctx.scale if need[4] else None
            d_w_down = d_b_down = dx = None
            if need[0] or need[1] or need[2]:
                dpre = _activation_backward(scaled_matmul(g, w_up, ctx.scale), pre, ctx.activation)
                d_w_down = dpre.t() @ x2 if need[1] else None
                d_b_down = dpre.sum(0) if need[2] else None
                dx = (dpre @ w_down).view(x.shape) if need[0] else None
        d_res = grad_out.to(ctx.residual_dtype) if need[5] else None
        return dx, d_w_down, d_b_down, d_w_up, d_b_up, d_res, None, None


class FusedAdapterTritonFunction(torch.autograd.Function):
    """Triton path: one fused forward kernel; one fused backward kernel plus cuBLAS GEMMs.

    ``residual_is_x``: the sequential adapter ``x + scale · Adapter(x)`` (``residual`` is then None): the
    kernel reads ``x`` as the residual, and the backward adds the output gradient into ``dx`` inside its
    last GEMM or store instead of leaving autograd a separate accumulation pass.
    """

    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, residual, scale: float, activation: str,
                residual_is_x: bool = False):
        from .triton_launch import adapter_forward

        x2 = x.reshape(-1, x.shape[-1])
        res2 = x2 if residual_is_x else None if residual is None else residual.reshape(-1, residual.shape[-1])
        out = adapter_forward(x2, w_down, b_down, w_up, b_up, res2, scale, activation, _out_dtype(x, residual))
        ctx.save_for_backward(x, w_down, b_down, w_up)
        ctx.scale, ctx.activation, ctx.residual_is_x = scale, activation, residual_is_x
        ctx.residual_dtype = None if residual is None else residual.dtype
        return out.view(*x.shape[:-1], w_up.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        from .triton_launch import adapter_backward

        x, w_down, b_down, w_up = ctx.saved_tensors
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        dx, d_w_down, d_b_down, d_w_up, d_b_up = adapter_backward(
            x2, w_down, b_down, w_up, g2, ctx.scale, ctx.activation, needs=tuple(need[:5]),
            add_grad_to_dx=ctx.residual_is_x)
        dx = dx.view(x.shape) if dx is not None else None
        d_res = grad_out.to(ctx.residual_dtype) if need[5] else None
        return dx, d_w_down, d_b_down, d_w_up, d_b_up, d_res, None, None, None
