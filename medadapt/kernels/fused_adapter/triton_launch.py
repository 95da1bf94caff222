"""Launchers of the fused-adapter Triton kernels: tile configurations, autotuning, buffers, the cuBLAS GEMMs.

On a GPU each kernel is autotuned per token-count bucket, ``(C, C_out, H)`` and dtype over a few tile
shapes (pruned by the hidden width each holds in registers); later calls launch the chosen configuration
directly. Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU) one small configuration runs, so
tests stay fast. Backward: one fused kernel (``h``, ``dpre``), cuBLAS for ``dx``, then (``backward_mode``)
either the weight-gradient kernel (both weight and both bias gradients in one more pass over ``x`` and
``g``) or cuBLAS for ``dW_down`` and ``[dW_up | db_up]`` with a column-sum kernel for ``db_down``.
Importing this module imports Triton.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

from .._dispatch import interpret_mode
from .reference import scaled_matmul
from .triton_kernels import ACTIVATION_CODES, adapter_bwd_kernel, adapter_fwd_kernel, hidden_split
from .triton_weight_grads import adapter_wgrad_kernel, column_sum_kernel, wgrad_part_offsets

__all__ = ["BACKWARD_MODE", "adapter_backward", "adapter_forward", "column_sum"]

_INTERPRETER_CONFIG = [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
_INTERPRETER_WGRAD_CONFIG = [triton.Config({"BLOCK_M": 32, "BLOCK_C": 32, "WAVES": 1}, num_warps=4, num_stages=1)]


# (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages, widest padded hidden block it is tried with). From sm_90
# register/stack counts (benchmarks/adapter_registers.py, bf16) and H100 timings (benchmarks/tune_adapter.py):
# row blocks of 128 spill a few registers at wide hidden blocks yet can win, since every program re-reads
# both weights from L2 (fewer, taller blocks read them less often); the autotuner times what is listed.
_FWD_SHAPES = [(64, 64, 64, 8, 3, 320), (64, 64, 64, 8, 2, 320), (64, 64, 128, 8, 3, 320), (32, 64, 64, 4, 3, 320),
               (128, 64, 64, 16, 3, 320), (128, 32, 64, 16, 3, 320), (128, 64, 64, 8, 3, 192),
               (128, 32, 64, 8, 4, 192)]
_BWD_SHAPES = [(64, 64, 64, 8, 2, 320), (64, 64, 64, 8, 3, 320), (64, 64, 128, 8, 3, 256), (32, 64, 64, 4, 3, 320),
               (128, 64, 64, 16, 3, 256), (128, 32, 64, 16, 3, 256), (64, 32, 64, 8, 3, 320)]
# Not yet run on a GPU, so not autotuned by default: 64-row blocks over 16 warps hold half the fp32
# accumulator per thread, and the merged column loop then keeps hidden 256 without spilling (sm_90 offline:
# 115 registers; 8 warps: 239). ``include_unverified_tiles()`` adds them (tune_adapter.py, the CUDA tests).
_BWD_SHAPES_UNVERIFIED = [(64, 64, 64, 16, 2, 256), (64, 32, 64, 16, 3, 256)]

# Weight-gradient kernel: (BLOCK_M, BLOCK_C, num_warps, num_stages, programs per SM, widest padded hidden
# block). Each program holds one [hidden × BLOCK_C] fp32 accumulator (dW_down or dW_upᵀ) in registers and
# reads its left operand (dpre or h, M × hidden) once per column slice: wide slices read it less often.
# From sm_90 compiles (benchmarks/adapter_registers.py --kernel wgrad, bf16): no spills up to the widest
# hidden block listed except the last (88 B), 112-255 registers (one program per SM), ≤ 221 KB of shared
# memory. fp32 operands keep the 32-row block (``_prune``), which fits their stages at hidden 320.
_WGRAD_SHAPES = [(64, 128, 8, 3, 1, 320), (64, 128, 8, 2, 1, 320), (32, 128, 8, 3, 1, 320), (128, 128, 16, 2, 1, 256),
                 (64, 128, 16, 3, 1, 320), (64, 64, 8, 3, 1, 320), (128, 64, 8, 2, 1, 320), (64, 128, 8, 3, 2, 320),
                 (64, 256, 16, 2, 1, 192)]

# After the fused kernel: "cublas" (dx and the weight gradients as GEMMs on the stored h and dpre),
# "wgrad_kernel" (the weight and bias gradients from one more Triton pass, dx by cuBLAS: dx inside that pass
# cost 50 µs vs the GEMM's 31 at ViT-B batch 8), or "auto" (``_backward_plan``). dx is always a cuBLAS GEMM:
# it beat a third loop of the fused kernel in every SAM case on an H100 (graph-replayed backward: 76 vs
# 82 µs at ViT-B batch 1, 288 vs 307 µs at batch 8, 441 vs 610 µs at ViT-H batch 8; that loop is gone).
BACKWARD_MODE = "auto"
_BACKWARD_MODES = ("auto", "cublas", "wgrad_kernel")
# The weight-gradient kernel's two problems (dW_down and dW_up) as one grid with a runtime branch (1) or as two
# launches, each compiled for its problem (2): an experiment for the next H100 run (adapter_kernel_notes.md,
# next step 1: the one-grid pass takes 107 µs at ViT-B batch 8 against 78 for an older version); 1 is what
# was measured.
WGRAD_LAUNCHES = 1
# The weight-gradient kernel's hidden rows in tiles of this many per program (a power of two >= 16), or None
# for the whole padded hidden width per program (what was measured). An experiment for the next H100 run
# (adapter_kernel_notes.md, next step 2): at hidden 256/320 a program's [hidden × 128] accumulator fills the
# registers and the left operand is re-read by every column slice; tiles of 128 hold a quarter to a half
# of it and re-read the right operand per tile instead.
WGRAD_HIDDEN_TILE: int | None = None
# The backward kernel's two sums over the columns (x W_downᵀ and g W_up) in one loop (needs C == C_out):
# True, False, or None for ``_backward_plan``'s choice.
MERGE_LOOPS: bool | None = None


def _backward_plan(C: int, C_out: int, H: int) -> tuple[str, bool]:
    """``(backward mode, merged loops)`` for ``BACKWARD_MODE = "auto"`` / ``MERGE_LOOPS = None``.

    From H100 timings of the whole backward (bf16, CUDA graphs; benchmarks/tune_adapter.py, session 4):
    the weight-gradient kernel wins up to a padded hidden width of 256 (ViT-B batch 8: 216 vs 239 µs with
    cuBLAS; ViT-L batch 8: 314 vs 320) and loses beyond (ViT-H batch 8: 484 vs 398), where its left operand
    is re-read from L2 by more column slices; one merged column loop wins at hidden 192 (239 vs 247 µs) and
    loses at 256 and 320 (358 vs 320, 478 vs 398: two fp32 accumulators of that width spill registers).
    """
    ha, hb = hidden_split(H)
    mode = BACKWARD_MODE if BACKWARD_MODE != "auto" else ("wgrad_kernel" if ha + hb <= 256 else "cublas")
    merged = MERGE_LOOPS if MERGE_LOOPS is not None else ha + hb <= 192
    return mode, merged and C == C_out


def _gpu_configs(shapes) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k, "BLOCK_N": n, "MAX_HIDDEN": widest}, num_warps=w, num_stages=s)
            for m, k, n, w, s, widest in shapes]


def _wgrad_configs(shapes) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_C": c, "WAVES": waves, "MAX_HIDDEN": widest}, num_warps=w,
                          num_stages=s) for m, c, w, s, waves, widest in shapes]


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


# Whether the kernels run in Triton's CPU interpreter: fixed when this module is imported (Triton reads
# TRITON_INTERPRET when it decorates the kernels), so it is read once, not per launch.
_INTERPRET = interpret_mode()


def _tuned(kernel, configs, interpreter_configs, extra_key=()):
    key = ["M_BUCKET", "C", "C_OUT", "H", *extra_key]
    if _INTERPRET:
        return triton.autotune(configs=interpreter_configs, key=key)(kernel)
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune})(kernel)


# Every flag that changes the compiled code is part of the autotuning key (Triton's autotuner keys on the named
# arguments only): a kernel with other flags (merged loop, stores, activation) is timed afresh, not given the
# tile chosen for another variant.
_fwd = _tuned(adapter_fwd_kernel, _gpu_configs(_FWD_SHAPES), _INTERPRETER_CONFIG,
              ["ACT", "HAS_BD", "HAS_BU", "HAS_RES"])
_bwd = _tuned(adapter_bwd_kernel, _gpu_configs(_BWD_SHAPES), _INTERPRETER_CONFIG,
              ["ACT", "HAS_BD", "STORE_H", "ONES_COLUMN", "STORE_DPRE", "GATE_FP16", "MERGED_LOOP"])
_wgrad = _tuned(adapter_wgrad_kernel, _wgrad_configs(_WGRAD_SHAPES), _INTERPRETER_WGRAD_CONFIG,
                ["PROBLEM", "HA", "HB"])  # hidden tiles (HB = 0) tuned apart from whole widths with the same HA


_chosen: dict[tuple, triton.Config] = {}


def include_unverified_tiles() -> None:
    """Add the backward kernel's tiles not yet checked on a GPU (``_BWD_SHAPES_UNVERIFIED``) to its autotuning
    list, for timing and testing them; idempotent."""
    extra = [c for c in _gpu_configs(_BWD_SHAPES_UNVERIFIED) if str(c) not in {str(k) for k in _bwd.configs}]
    if extra:
        _bwd.configs.extend(extra)
        _bwd.cache.clear()
        _chosen.clear()


def _launch_key(tuner, shape_key: tuple, dtypes: tuple, constexprs: dict) -> tuple:
    """What ``_launch`` remembers a chosen configuration by: kernel, tuning key, tensor dtypes, flags."""
    return id(tuner), shape_key, dtypes, tuple(constexprs.values())


def _launch(tuner, grid, shape_key: tuple, args: tuple, constexprs: dict) -> triton.Config:
    """Launch an autotuned kernel over ``grid(meta)`` programs; returns the configuration it ran.

    The autotuner runs on the first call per kernel, tuning key (token bucket, widths, dtypes) and
    flags; later calls launch the plain JIT function with the configuration it chose, skipping the
    autotuner's per-call bookkeeping (on an H100 host that cost more time than the kernel itself).
    """
    key = _launch_key(tuner, shape_key, tuple(a.dtype for a in args if isinstance(a, torch.Tensor)), constexprs)
    config = _chosen.get(key)
    if config is None:
        tuner[grid](*args, **constexprs)
        _chosen[key] = config = tuner.best_config
        return config
    tuner.fn[grid(config.all_kwargs())](*args, **constexprs, **config.all_kwargs())
    return config


def _cdiv(a: int, b: int) -> int:
    """``⌈a / b⌉``. The launchers' host arithmetic avoids ``triton.cdiv`` / ``triton.next_power_of_2``:
    those are ``constexpr_function`` objects costing ~4 µs per host call (Triton 3.8), ~19 calls per
    forward+backward (``benchmarks/bench_adapter_host.py``)."""
    return -(-a // b)


def _row_blocks(M: int):
    return lambda meta: (_cdiv(M, meta["BLOCK_M"]),)


def _bucket(tokens: int) -> int:
    """Autotuning bucket of a token count: the next power of two, at least 1024 and at most 65536."""
    return min(max(1 << (tokens - 1).bit_length(), 1024), 1 << 16)


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
    _launch(_fwd, _row_blocks(M), (_bucket(M), C, C_out, H), (
        x2, w_down, b_down if b_down is not None else w_down, w_up, b_up if b_up is not None else w_up, res, out,
        M, C, H, C_out, _bucket(M),
        x2.stride(0), x2.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        res.stride(0), res.stride(1), out.stride(0), out.stride(1),
        float(scale),
    ), dict(
        ACT=ACTIVATION_CODES[activation], HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        HAS_RES=residual2 is not None, HA=ha, HB=hb, PRECISION=_precision(x2.dtype), UPCAST=_INTERPRET,
    ))
    return out


def adapter_backward(x2: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, w_up: torch.Tensor,
                     grad2: torch.Tensor, scale: float, activation: str, needs: tuple[bool, bool, bool, bool, bool],
                     add_grad_to_dx: bool = False, backward_mode: str | None = None):
    """Every gradient of one adapter call: one fused pass over the tokens, then the weight gradients.

    Args:
        x2, grad2: ``(M, C)`` input and ``(M, C_out)`` output gradient (any strides).
        needs: which of ``(dx, dW_down, db_down, dW_up, db_up)`` to compute.
        add_grad_to_dx: ``dx += grad`` (the sequential adapter, whose residual is ``x`` itself).
        backward_mode: ``"wgrad_kernel"`` (every weight and bias gradient from a second Triton pass, dx
            as cuBLAS), ``"cublas"`` (GEMMs on the stored ``h`` and ``dpre``), ``"auto"``
            (``_backward_plan``) or None for ``BACKWARD_MODE``. dx is one cuBLAS GEMM on ``dpre`` in
            every mode, with ``grad`` as its addend for the sequential adapter. With no weight gradient
            needed, ``wgrad_kernel`` runs as ``cublas`` (dx alone).

    Returns:
        ``(dx, dW_down, db_down, dW_up, db_up)``, None where not needed; dx in x's dtype, the others in
        the weights' dtype.
    """
    need_dx, need_dwd, need_dbd, need_dwu, need_dbu = needs
    mode = backward_mode or BACKWARD_MODE
    if mode not in _BACKWARD_MODES:
        raise ValueError(f"backward_mode must be one of {_BACKWARD_MODES}, got {mode!r}")
    M, C = x2.shape
    H, C_out = w_down.shape[0], w_up.shape[0]
    auto_mode, merged = _backward_plan(C, C_out, H)
    mode = auto_mode if mode == "auto" else mode
    if mode == "wgrad_kernel" and not any(needs[1:]):
        mode = "cublas"
    dtype, device = w_up.dtype, x2.device
    second_pass = mode == "wgrad_kernel"
    store_dpre = second_pass or need_dx or need_dwd or need_dbd
    h_width = H if second_pass else H + 8  # the cuBLAS path's ones column gives db_up from the dW_up GEMM
    h1 = torch.empty((M, h_width), device=device, dtype=dtype) if second_pass or need_dwu or need_dbu else None
    dpre = torch.empty((M, H), device=device, dtype=dtype) if store_dpre else None
    dummy = x2  # never written: its stores are compiled out
    ha, hb = hidden_split(H)
    _launch(_bwd, _row_blocks(M), (_bucket(M), C, C_out, H), (
        x2, w_down, b_down if b_down is not None else w_down, w_up, grad2, _or(h1, dummy), _or(dpre, dummy),
        M, C, H, C_out, _bucket(M),
        x2.stride(0), x2.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        grad2.stride(0), grad2.stride(1), h1.stride(0) if h1 is not None else 0,
        dpre.stride(0) if dpre is not None else 0, float(scale),
    ), dict(
        ACT=ACTIVATION_CODES[activation], HAS_BD=b_down is not None, STORE_H=h1 is not None,
        ONES_COLUMN=not second_pass, STORE_DPRE=store_dpre, GATE_FP16=dtype in (torch.float16, torch.bfloat16),
        MERGED_LOOP=merged, HA=ha, HB=hb, PRECISION=_precision(x2.dtype), UPCAST=_INTERPRET,
    ))
    d_w_up = d_b_up = dx = None
    g = grad2.to(dtype)
    with _autocast_off(device):
        if need_dx:  # dx = dpre W_down (+ g), the addend in the GEMM's epilogue
            dx = torch.addmm(g, dpre, w_down) if add_grad_to_dx else dpre @ w_down
            dx = dx.to(x2.dtype)
        if second_pass:
            grads = (dx, *_weight_gradient_pass(x2, g, h1, dpre, w_down, scale))
            return tuple(t if need else None for t, need in zip(grads, needs))
        d_w_down = dpre.t() @ x2.to(dtype) if need_dwd else None
        d_b_down = column_sum(dpre).to(dtype) if need_dbd else None
        if h1 is not None:  # scale · gᵀ [h | 1 0 … 0] = [dW_up | db_up | 0 …]
            up = scaled_matmul(g.t(), h1, scale)
            d_w_up = up[:, :H].contiguous() if need_dwu else None
            d_b_up = up[:, H].contiguous() if need_dbu else None
    return dx, d_w_down, d_b_down, d_w_up, d_b_up


def _weight_gradient_pass(x2, grad2, h, dpre, w_down, scale):
    """``(dW_down, db_down, dW_up, db_up)`` from ``adapter_wgrad_kernel``: a grid of column slices (of ``x`` for
    dW_down, of ``g`` for dW_up) × row chunks, about ``WAVES`` programs per SM, each writing one row of fp32
    partial sums; one ``sum(0)`` of those rows and one cast give all four (views of one buffer). With
    ``WGRAD_LAUNCHES = 2`` each problem is its own launch, its own grid and its own buffer. ``grad2`` is in
    ``x2``'s dtype (the compute dtype): one loop reads either through the same pointer type."""
    M, C = x2.shape
    H, C_out = w_down.shape[0], grad2.shape[1]
    o_wu, o_bu, o_bd, total = wgrad_part_offsets(C, C_out, H)
    if WGRAD_LAUNCHES == 1:
        part, rows = _wgrad_launch(x2, grad2, h, dpre, scale, 0, (o_wu, o_bu, o_bd, total))
        sums = part[:rows].sum(0).to(w_down.dtype)
        return sums[:o_wu].view(H, C), sums[o_bd:total], sums[o_wu:o_bu].view(C_out, H), sums[o_bu:o_bd]
    # one buffer per problem: dW_down then db_down; dW_up then db_up (offsets the kernel does not use: 0)
    part, rows = _wgrad_launch(x2, grad2, h, dpre, scale, 1, (0, 0, H * C, H * C + H))
    down = part[:rows].sum(0).to(w_down.dtype)
    part, rows = _wgrad_launch(x2, grad2, h, dpre, scale, 2, (0, C_out * H, 0, C_out * H + C_out))
    up = part[:rows].sum(0).to(w_down.dtype)
    return down[:H * C].view(H, C), down[H * C:], up[:C_out * H].view(C_out, H), up[C_out * H:]


def _wgrad_launch(x2, grad2, h, dpre, scale, problem: int, offsets: tuple[int, int, int, int]):
    """One launch of ``adapter_wgrad_kernel`` for ``problem`` (0 both, 1 dW_down, 2 dW_up) into a new fp32
    buffer of partial-sum rows ``offsets[3]`` wide; returns the buffer and how many of its rows were written."""
    M, C = x2.shape
    H, C_out = h.shape[1], grad2.shape[1]
    sms = _sm_count(x2.device)
    tile = WGRAD_HIDDEN_TILE
    if tile is not None and (tile < 16 or tile & (tile - 1)):
        raise ValueError(f"WGRAD_HIDDEN_TILE must be None or a power of two >= 16, got {tile!r}")
    ha, hb = (tile, 0) if tile is not None else hidden_split(H)
    tiles = _cdiv(H, ha) if tile is not None else 1

    def slices(meta) -> int:
        down, up = _cdiv(C, meta["BLOCK_C"]), _cdiv(C_out, meta["BLOCK_C"])
        return down + up if problem == 0 else down if problem == 1 else up

    def splits(meta) -> int:
        return max(1, min(_cdiv(M, meta["BLOCK_M"]), meta["WAVES"] * sms // (slices(meta) * tiles)))

    o_wu, o_bu, o_bd, total = offsets
    shape_key = (_bucket(M), C, C_out, H)
    constexprs = dict(HA=ha, HB=hb, PRECISION=_precision(x2.dtype), UPCAST=_INTERPRET, PROBLEM=problem)
    # one row per row chunk: as many as the chosen configuration uses once it is known (the buffer is
    # 1.2 MB per row at ViT-B), as many as the widest candidate while the autotuner times them all
    dtypes = (x2.dtype, grad2.dtype, h.dtype, dpre.dtype, torch.float32)  # the tensor arguments below, in order
    chosen = _chosen.get(_launch_key(_wgrad, shape_key, dtypes, constexprs))
    rows = splits(chosen.kwargs) if chosen is not None else max(splits(c.kwargs) for c in _wgrad.configs)
    part = torch.empty((rows, total), device=x2.device, dtype=torch.float32)
    config = _launch(_wgrad, lambda meta: (slices(meta), splits(meta), tiles), shape_key, (
        x2, grad2, h, dpre, part, M, C, H, C_out, _bucket(M), o_wu, o_bu, o_bd,
        x2.stride(0), x2.stride(1), grad2.stride(0), grad2.stride(1), h.stride(0), dpre.stride(0), part.stride(0),
        float(scale),
    ), constexprs)
    return part, splits(config.kwargs)


def column_sum(a: torch.Tensor) -> torch.Tensor:
    """``a.sum(0)`` in fp32 for a 2-D ``a`` with unit column stride (``column_sum_kernel``, then the partials)."""
    rows, cols = a.shape
    block_n = max(16, 1 << (cols - 1).bit_length())
    block_m = max(1, 8192 // block_n)  # 32 fp32 accumulators per thread at 8 warps
    programs = max(1, min(_cdiv(rows, block_m), 4 * _sm_count(a.device)))
    part = torch.empty((programs, block_n), device=a.device, dtype=torch.float32)
    column_sum_kernel[(programs,)](a, part, rows, cols, a.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                   num_warps=8 if not _INTERPRET else 4)
    return part[:, :cols].sum(0)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _autocast_off(device: torch.device):
    """Autocast disabled for the backward's GEMMs; a no-op context when it is off already (the usual case:
    entering ``torch.autocast`` costs microseconds of host time per call)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _or(t: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return t if t is not None else default
