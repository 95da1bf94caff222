"""The public fused-adapter function: validation, compute dtype, and the Triton/torch dispatch."""

from __future__ import annotations

import functools
import numbers

import torch

from .._dispatch import forced_backend, kernel_backend
from .autograd import FusedAdapterTorchFunction, FusedAdapterTritonFunction
from .reference import ACTIVATIONS

__all__ = ["MAX_TRITON_HIDDEN", "fused_adapter", "fused_adapter_backend"]

MAX_TRITON_HIDDEN = 512  # wider hidden blocks no longer fit in registers; those take the torch path
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_tensor(name: str, t: torch.Tensor, device: torch.device, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on x's device ({device}), got {t.device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _validate(x, w_down, b_down, w_up, b_up, scale, residual, activation) -> float:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of shape (..., C), got {getattr(x, 'shape', type(x).__name__)}")
    _check_tensor("x", x, x.device)
    _check_tensor("w_down", w_down, x.device, ndim=2)
    _check_tensor("w_up", w_up, x.device, ndim=2)
    width, hidden, width_out = x.shape[-1], w_down.shape[0], w_up.shape[0]
    if width == 0:  # an adapter of nothing; the backward could not even flatten x to (M, 0)
        raise ValueError(f"x must have a last dimension C ≥ 1, got shape {tuple(x.shape)}")
    if w_down.shape[1] != width or hidden == 0:
        raise ValueError(f"w_down must have shape (H, {width}) with H ≥ 1 to match x's last dimension {width}, "
                         f"got {tuple(w_down.shape)}")
    if w_up.shape[1] != hidden or width_out == 0:
        raise ValueError(f"w_up must have shape (C_out, {hidden}) with C_out ≥ 1 to match w_down's hidden width "
                         f"{hidden}, got {tuple(w_up.shape)}")
    for name, bias, size in (("b_down", b_down, hidden), ("b_up", b_up, width_out)):
        if bias is not None:
            _check_tensor(name, bias, x.device)
            if tuple(bias.shape) != (size,):
                raise ValueError(f"{name} must have shape ({size},), got {tuple(bias.shape)}")
    if residual is not None:
        _check_tensor("residual", residual, x.device)
        expected = (*x.shape[:-1], width_out)
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual must have shape {expected} (x's leading shape, C_out), "
                             f"got {tuple(residual.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.requires_grad:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be a real number (a constant, not a trainable tensor), got {scale!r}")
    return float(scale)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype when autocast is on for x's device (as ``F.linear`` would)."""
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fused_adapter_backend(x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, *others) -> str:
    """``"triton"`` or ``"torch"``: what ``fused_adapter`` runs for these inputs.

    Triton when ``kernel_backend`` picks it (CUDA tensors and Triton importable, or
    ``MEDADAPT_KERNELS=triton``) and the problem is one the kernel covers: fp16/bf16/fp32, hidden width
    ≤ ``MAX_TRITON_HIDDEN``, at least one token; otherwise the torch path. Unforced, fp32 takes the
    kernel only when torch allows TF32 matmuls: full-fp32 products run on CUDA cores, where fusing
    saves little and the fp32 tiles spill registers (``MEDADAPT_KERNELS=triton`` still forces it).
    """
    backend = kernel_backend(x, w_down, w_up, *others)
    dtype = _compute_dtype(x)
    if backend != "triton" or dtype not in _TRITON_DTYPES or w_down.shape[0] > MAX_TRITON_HIDDEN or x.numel() == 0:
        return "torch"
    forced = forced_backend() == "triton"
    if dtype == torch.float32 and x.is_cuda and not forced and not torch.backends.cuda.matmul.allow_tf32:
        return "torch"
    return "triton"


def fused_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    scale: float = 1.0,
    residual: torch.Tensor | None = None,
    activation: str = "gelu",
) -> torch.Tensor:
    """Bottleneck adapter ``residual + scale · (act(x W_downᵀ + b_down) W_upᵀ + b_up)`` in one pass.

    On CUDA with Triton a fused kernel reads ``x`` (and ``residual``) once and writes the output once;
    elsewhere a torch path. Either way only ``x`` and the weights are saved for the backward, which
    recomputes the hidden activation. Arithmetic accumulates in fp32 for fp16/bf16 inputs.

    Args:
        x: ``(..., C)`` tokens, any strides, float16/bfloat16/float32/float64.
        w_down: ``(H, C)`` down-projection; b_down: ``(H,)`` or None.
        w_up: ``(C_out, H)`` up-projection; b_up: ``(C_out,)`` or None.
        scale: constant multiplying the adapter branch (Med-SA's parallel adapter: 0.5).
        residual: ``(..., C_out)`` added to the result (``x`` for the sequential adapter), or None.
        activation: ``"gelu"`` (exact, erf), ``"gelu_tanh"`` or ``"relu"``.

    Returns:
        ``(..., C_out)`` in x's dtype (the autocast dtype under autocast), promoted with residual's dtype.
        Weights and biases are cast to that compute dtype (differentiably).

    Raises:
        ValueError: a width or shape mismatch, a zero width (C or C_out), a tensor on another device
            than ``x``, a non-floating dtype, an unknown activation or a non-constant scale; the message
            names the argument.
    """
    scale = _validate(x, w_down, b_down, w_up, b_up, scale, residual, activation)
    dtype = _compute_dtype(x)
    residual_is_x = residual is x and x.dtype == dtype  # the sequential adapter, no dtype conversion
    x, w_down, w_up = x.to(dtype), w_down.to(dtype), w_up.to(dtype)
    b_down = b_down.to(dtype) if b_down is not None else None
    b_up = b_up.to(dtype) if b_up is not None else None
    if fused_adapter_backend(x, w_down, w_up, b_down, b_up, residual) == "triton":
        # the kernels read a bias as bias_ptr + i (unit stride): copy strided or expanded biases (the copy
        # is differentiable, so an expanded bias's gradient is still summed back to its own shape)
        b_down = b_down.contiguous() if b_down is not None else None
        b_up = b_up.contiguous() if b_up is not None else None
        if residual_is_x:
            return _apply_triton(x, w_down, b_down, w_up, b_up, None, scale, activation, True)
        return _apply_triton(x, w_down, b_down, w_up, b_up, residual, scale, activation, False)
    return FusedAdapterTorchFunction.apply(x, w_down, b_down, w_up, b_up, residual, scale, activation)


def _apply_triton(*args):
    """The Triton Function; under ``torch.compile`` run eagerly (a graph break): Dynamo is not asked to
    trace the autotuned launchers inside a custom autograd.Function. Eager calls skip that wrapper."""
    if torch.compiler.is_compiling():
        return _triton_apply_outside_compile()(*args)
    return FusedAdapterTritonFunction.apply(*args)


@functools.lru_cache(maxsize=1)
def _triton_apply_outside_compile():
    # wrapped on first use: torch.compiler.disable imports torch._dynamo, too slow for package import
    return torch.compiler.disable(FusedAdapterTritonFunction.apply)
