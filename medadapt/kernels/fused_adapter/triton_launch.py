"""Launchers of the fused-adapter Triton kernels: tile configurations, autotuning, buffers.

On a GPU each kernel is autotuned per token-count bucket, ``(C, C_out, H)`` and dtype over a few tile
shapes (pruned by a register budget); under the Triton interpreter (``TRITON_INTERPRET=1``, CPU) one
small configuration runs, so tests stay fast.
Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton

from .._dispatch import interpret_mode
from .triton_kernels import ACTIVATION_CODES, adapter_bwd_kernel, adapter_fwd_kernel, hidden_split

__all__ = ["adapter_backward", "adapter_forward"]

_INTERPRETER_CONFIG = [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]


# (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages), chosen from sm_90 register/spill counts (ptxas)
_FWD_SHAPES = [(64, 64, 64, 8, 3), (64, 64, 128, 8, 3), (128, 64, 64, 8, 3), (128, 64, 64, 16, 3), (32, 64, 64, 4, 3)]
_BWD_SHAPES = [(64, 64, 64, 8, 2), (64, 64, 128, 8, 3), (32, 64, 64, 8, 3), (64, 64, 128, 16, 3), (128, 64, 64, 16, 3)]


def _gpu_configs(shapes) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, k, n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Drop tiles whose hidden block needs too many registers per thread (they spill).

    16-bit inputs: ``BLOCK_M · (HA + HB) ≤ 128 · threads``; fp32 operands take twice the registers,
    so fp32 keeps only the smallest row block.
    """
    width = named_args.get("HA", kwargs.get("HA", 0)) + named_args.get("HB", kwargs.get("HB", 0))
    x = named_args.get("x_ptr")
    if x is not None and x.element_size() >= 4:
        smallest = min(c.kwargs["BLOCK_M"] for c in configs)
        return [c for c in configs if c.kwargs["BLOCK_M"] == smallest]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * width <= 128 * c.num_warps * 32]
    return kept or configs[:1]


def _tuned(kernel, shapes):
    if interpret_mode():
        return triton.autotune(configs=_INTERPRETER_CONFIG, key=["M_BUCKET", "C", "C_OUT", "H"])(kernel)
    return triton.autotune(configs=_gpu_configs(shapes), key=["M_BUCKET", "C", "C_OUT", "H"],
                           prune_configs_by={"early_config_prune": _prune})(kernel)


_fwd = _tuned(adapter_fwd_kernel, _FWD_SHAPES)
_bwd = _tuned(adapter_bwd_kernel, _BWD_SHAPES)


def _bucket(tokens: int) -> int:
    """Autotuning bucket of a token count: the next power of two, at least 1024 and at most 65536."""
    return min(max(triton.next_power_of_2(tokens), 1024), 1 << 16)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch for matmuls (``ieee`` when off); other dtypes ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def adapter_forward(x2: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, w_up: torch.Tensor,
                    b_up: torch.Tensor | None, residual2: torch.Tensor | None, scale: float, activation: str,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """``residual + scale · (act(x W_downᵀ + b_down) W_upᵀ + b_up)`` for 2-D ``x2 (M, C)``, as ``(M, C_out)``."""
    M, C = x2.shape
    H, C_out = w_down.shape[0], w_up.shape[0]
    out = torch.empty((M, C_out), device=x2.device, dtype=out_dtype)
    res = residual2 if residual2 is not None else out
    ha, hb = hidden_split(H)
    _fwd[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
        x2, w_down, b_down if b_down is not None else w_down, w_up, b_up if b_up is not None else w_up, res, out,
        M, C, H, C_out, _bucket(M),
        x2.stride(0), x2.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        res.stride(0), res.stride(1), out.stride(0), out.stride(1),
        float(scale),
        ACT=ACTIVATION_CODES[activation], HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        HAS_RES=residual2 is not None, HA=ha, HB=hb, PRECISION=_precision(x2.dtype),
        UPCAST=interpret_mode(),
    )
    return out


def adapter_backward(x2: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, w_up: torch.Tensor,
                     grad2: torch.Tensor, scale: float, activation: str, need_dx: bool, need_h: bool,
                     need_dpre: bool):
    """One backward pass over the tokens.

    Returns:
        ``(dx, h1, dpre)``: ``dx (M, C)`` or None; ``h1 = [act(pre) | 1]`` as an ``(M, H + 1)`` view
        (rows padded to a multiple of 8 elements for cuBLAS) or None; ``dpre = scale · (g W_up) ⊙ act'(pre)``
        ``(M, H)`` or None; both in the weights' dtype.
    """
    M, C = x2.shape
    H, C_out = w_down.shape[0], w_up.shape[0]
    dtype, device = w_up.dtype, x2.device
    dx = torch.empty((M, C), device=device, dtype=x2.dtype) if need_dx else None
    h1 = torch.empty((M, (H + 8) // 8 * 8), device=device, dtype=dtype)[:, : H + 1] if need_h else None
    dpre = torch.empty((M, H), device=device, dtype=dtype) if need_dpre else None
    dummy = x2  # never written: its stores are compiled out
    ha, hb = hidden_split(H)
    _bwd[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
        x2, w_down, b_down if b_down is not None else w_down, w_up, grad2,
        dx if dx is not None else dummy, h1 if h1 is not None else dummy, dpre if dpre is not None else dummy,
        M, C, H, C_out, _bucket(M),
        x2.stride(0), x2.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        grad2.stride(0), grad2.stride(1),
        dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
        h1.stride(0) if h1 is not None else 0, dpre.stride(0) if dpre is not None else 0,
        float(scale),
        ACT=ACTIVATION_CODES[activation], HAS_BD=b_down is not None, NEED_DX=need_dx, STORE_H=need_h,
        STORE_DPRE=need_dpre, GATE_FP16=dtype in (torch.float16, torch.bfloat16), HA=ha, HB=hb,
        PRECISION=_precision(x2.dtype), UPCAST=interpret_mode(),
    )
    return dx, h1, dpre
