"""Launchers of the fused-adapter Triton kernels: tile configurations, autotuning, buffers, the cuBLAS GEMMs.

On a GPU each kernel is autotuned per token-count bucket, ``(C, C_out, H)`` and dtype over a few tile
shapes (pruned by the hidden width each holds in registers); later calls launch the chosen configuration
directly. Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU) one small configuration runs, so
tests stay fast. Backward: one fused kernel (``h``, ``dpre``), then cuBLAS for ``dx``, ``dW_down`` and
``[dW_up | db_up]``, and a column-sum kernel for ``db_down``.
Importing this module imports Triton.
"""

from __future__ import annotations

import functools

import torch
import triton

from .._dispatch import interpret_mode
from .reference import scaled_matmul
from .triton_kernels import ACTIVATION_CODES, adapter_bwd_kernel, adapter_fwd_kernel, column_sum_kernel, hidden_split

__all__ = ["DX_MODE", "adapter_backward", "adapter_forward", "column_sum"]

_INTERPRETER_CONFIG = [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]


# (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages, widest padded hidden block it is tried with). From sm_90
# register/stack counts (benchmarks/adapter_registers.py, bf16) and H100 timings (benchmarks/tune_adapter.py):
# row blocks of 128 spill a few registers at wide hidden blocks yet can win, since every program re-reads
# both weights from L2 (fewer, taller blocks read them less often); the autotuner times what is listed.
_FWD_SHAPES = [(64, 64, 64, 8, 3, 320), (64, 64, 64, 8, 2, 320), (64, 64, 128, 8, 3, 320), (32, 64, 64, 4, 3, 320),
               (128, 64, 64, 16, 3, 320), (128, 32, 64, 16, 3, 320), (128, 64, 64, 8, 3, 192),
               (128, 32, 64, 8, 4, 192)]
_BWD_SHAPES = [(64, 64, 64, 8, 2, 320), (64, 64, 64, 8, 3, 320), (64, 64, 128, 8, 3, 256), (32, 64, 64, 4, 3, 320),
               (128, 64, 64, 16, 3, 256), (128, 32, 64, 16, 3, 256)]
_BWD_DX_SHAPES = [(64, 64, 64, 8, 2, 320), (64, 64, 64, 8, 3, 320), (64, 64, 128, 8, 3, 192), (32, 64, 64, 4, 3, 192),
                  (128, 64, 64, 16, 3, 256), (128, 32, 64, 16, 3, 256)]

# dx = dpre W_down as one cuBLAS GEMM on the stored dpre beat a third loop of the fused kernel in every
# SAM case on an H100 (bf16, graph-replayed backward: 76 vs 82 µs at ViT-B batch 1, 288 vs 307 µs at
# batch 8, 441 vs 610 µs at ViT-H batch 8; benchmarks/results/adapter_tuning_nvidia_h100_80gb_hbm3.csv)
DX_MODE = "gemm"
_DX_MODES = ("kernel", "gemm")


def _gpu_configs(shapes) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k, "BLOCK_N": n, "MAX_HIDDEN": widest}, num_warps=w, num_stages=s)
            for m, k, n, w, s, widest in shapes]


def _prune(configs, named_args, **kwargs):
    """Keep the tiles that hold this hidden width (``HA + HB``) in registers; fp32 operands take twice the
    registers, so fp32 keeps only the smallest row block. ``MAX_HIDDEN`` is a pruning tag, not a kernel
    argument: it is dropped from the configurations handed back."""
    width = named_args.get("HA", kwargs.get("HA", 0)) + named_args.get("HB", kwargs.get("HB", 0))
    x = named_args.get("x_ptr")
    if x is not None and x.element_size() >= 4:
        smallest = min(c.kwargs["BLOCK_M"] for c in configs)
        kept = [c for c in configs if c.kwargs["BLOCK_M"] == smallest]
        return [_untagged(c) for c in kept]
    return _fitting_configs(configs, width) or [_untagged(configs[0])]


def _fitting_configs(configs, width: int) -> list[triton.Config]:
    """The configurations tried with a padded hidden block of ``width`` (``HA + HB``), untagged."""
    return [_untagged(c) for c in configs if width <= c.kwargs.get("MAX_HIDDEN", width)]


def _untagged(config: triton.Config) -> triton.Config:
    kwargs = {k: v for k, v in config.kwargs.items() if k != "MAX_HIDDEN"}
    return triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _tuned(kernel, shapes):
    if interpret_mode():
        return triton.autotune(configs=_INTERPRETER_CONFIG, key=["M_BUCKET", "C", "C_OUT", "H"])(kernel)
    return triton.autotune(configs=_gpu_configs(shapes), key=["M_BUCKET", "C", "C_OUT", "H"],
                           prune_configs_by={"early_config_prune": _prune})(kernel)


_fwd = _tuned(adapter_fwd_kernel, _FWD_SHAPES)
_bwd = _tuned(adapter_bwd_kernel, _BWD_SHAPES)  # dx by cuBLAS
_bwd_dx = _tuned(adapter_bwd_kernel, _BWD_DX_SHAPES)  # dx in the kernel


_chosen: dict[tuple, triton.Config] = {}


def _launch(tuner, M: int, shape_key: tuple, args: tuple, constexprs: dict) -> None:
    """Launch an autotuned kernel over ``cdiv(M, BLOCK_M)`` programs.

    The autotuner runs on the first call per kernel, tuning key (token bucket, widths, dtypes) and
    flags; later calls launch the plain JIT function with the configuration it chose, skipping the
    autotuner's per-call bookkeeping (on an H100 host that cost more time than the kernel itself).
    """
    key = (id(tuner), shape_key, tuple(a.dtype for a in args if isinstance(a, torch.Tensor)),
           tuple(constexprs.values()))
    config = _chosen.get(key)
    if config is None:
        tuner[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](*args, **constexprs)
        _chosen[key] = tuner.best_config
        return
    tuner.fn[(triton.cdiv(M, config.kwargs["BLOCK_M"]),)](*args, **constexprs, **config.all_kwargs())


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
    _launch(_fwd, M, (_bucket(M), C, C_out, H), (
        x2, w_down, b_down if b_down is not None else w_down, w_up, b_up if b_up is not None else w_up, res, out,
        M, C, H, C_out, _bucket(M),
        x2.stride(0), x2.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        res.stride(0), res.stride(1), out.stride(0), out.stride(1),
        float(scale),
    ), dict(
        ACT=ACTIVATION_CODES[activation], HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        HAS_RES=residual2 is not None, HA=ha, HB=hb, PRECISION=_precision(x2.dtype), UPCAST=interpret_mode(),
    ))
    return out


def adapter_backward(x2: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, w_up: torch.Tensor,
                     grad2: torch.Tensor, scale: float, activation: str, needs: tuple[bool, bool, bool, bool, bool],
                     add_grad_to_dx: bool = False, dx_mode: str | None = None):
    """Every gradient of one adapter call from one pass over the tokens plus cuBLAS weight GEMMs.

    Args:
        x2, grad2: ``(M, C)`` input and ``(M, C_out)`` output gradient (any strides).
        needs: which of ``(dx, dW_down, db_down, dW_up, db_up)`` to compute.
        add_grad_to_dx: ``dx += grad`` (the sequential adapter, whose residual is ``x`` itself).
        dx_mode: ``"kernel"`` (a third loop of the fused kernel), ``"gemm"`` (cuBLAS on the stored
            ``dpre``, with ``grad`` as the GEMM's addend) or None for ``DX_MODE``.

    Returns:
        ``(dx, dW_down, db_down, dW_up, db_up)``, None where not needed; dx in x's dtype, the others in
        the weights' dtype.
    """
    need_dx, need_dwd, need_dbd, need_dwu, need_dbu = needs
    dx_mode = dx_mode or DX_MODE
    if dx_mode not in _DX_MODES:
        raise ValueError(f"dx_mode must be one of {_DX_MODES}, got {dx_mode!r}")
    M, C = x2.shape
    H, C_out = w_down.shape[0], w_up.shape[0]
    dtype, device = w_up.dtype, x2.device
    dx_in_kernel = need_dx and dx_mode == "kernel"
    store_dpre = need_dwd or need_dbd or (need_dx and not dx_in_kernel)
    kernel = _bwd_dx if dx_in_kernel else _bwd
    dx = torch.empty((M, C), device=device, dtype=x2.dtype) if dx_in_kernel else None
    h1 = torch.empty((M, H + 8), device=device, dtype=dtype) if need_dwu or need_dbu else None
    dpre = torch.empty((M, H), device=device, dtype=dtype) if store_dpre else None
    dummy = x2  # never written: its stores are compiled out
    ha, hb = hidden_split(H)
    _launch(kernel, M, (_bucket(M), C, C_out, H), (
        x2, w_down, b_down if b_down is not None else w_down, w_up, grad2,
        _or(dx, dummy), _or(h1, dummy), _or(dpre, dummy),
        M, C, H, C_out, _bucket(M),
        x2.stride(0), x2.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        grad2.stride(0), grad2.stride(1),
        dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
        h1.stride(0) if h1 is not None else 0, dpre.stride(0) if dpre is not None else 0,
        float(scale),
    ), dict(
        ACT=ACTIVATION_CODES[activation], HAS_BD=b_down is not None, DX_IN_KERNEL=dx_in_kernel,
        ADD_G_TO_DX=dx_in_kernel and add_grad_to_dx, STORE_H=h1 is not None, STORE_DPRE=store_dpre,
        GATE_FP16=dtype in (torch.float16, torch.bfloat16), HA=ha, HB=hb, PRECISION=_precision(x2.dtype),
        UPCAST=interpret_mode(),
    ))
    d_w_up = d_b_up = None
    g = grad2.to(dtype)
    with torch.autocast(device_type=device.type, enabled=False):
        if need_dx and not dx_in_kernel:  # dx = dpre W_down (+ g), the addend in the GEMM's epilogue
            dx = torch.addmm(g, dpre, w_down) if add_grad_to_dx else dpre @ w_down
            dx = dx.to(x2.dtype)
        d_w_down = dpre.t() @ x2.to(dtype) if need_dwd else None
        d_b_down = column_sum(dpre).to(dtype) if need_dbd else None
        if h1 is not None:  # scale · gᵀ [h | 1 0 … 0] = [dW_up | db_up | 0 …]
            up = scaled_matmul(g.t(), h1, scale)
            d_w_up = up[:, :H].contiguous() if need_dwu else None
            d_b_up = up[:, H].contiguous() if need_dbu else None
    return dx, d_w_down, d_b_down, d_w_up, d_b_up


def column_sum(a: torch.Tensor) -> torch.Tensor:
    """``a.sum(0)`` in fp32 for a 2-D ``a`` with unit column stride (``column_sum_kernel``, then the partials)."""
    rows, cols = a.shape
    block_n = max(16, triton.next_power_of_2(cols))
    block_m = max(1, 8192 // block_n)  # 32 fp32 accumulators per thread at 8 warps
    programs = max(1, min(triton.cdiv(rows, block_m), 4 * _sm_count(a.device)))
    part = torch.empty((programs, block_n), device=a.device, dtype=torch.float32)
    column_sum_kernel[(programs,)](a, part, rows, cols, a.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                   num_warps=8 if not interpret_mode() else 4)
    return part[:, :cols].sum(0)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _or(t: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return t if t is not None else default
