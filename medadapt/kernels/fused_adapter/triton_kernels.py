"""Triton kernels of the fused bottleneck adapter: one forward pass, one backward pass per token block.

Forward, per block of ``BLOCK_M`` tokens (rows of ``x``, any row/column strides):
``pre = x W_downᵀ + b_down`` (fp32, ``BLOCK_K`` columns of ``x`` at a time), ``h = act(pre)`` kept in
registers, then per ``BLOCK_N`` output columns ``out = residual + scale · (h W_upᵀ + b_up)``.

Backward, per block: recompute ``pre`` and ``h``; ``dh = g W_up`` over the output columns;
``dpre = scale · dh ⊙ act'(pre)``; ``[h | 1]`` and ``dpre`` are written (``M × H``, a quarter of ``x`` at
ratio 0.25). The rest of the backward (the launcher's ``backward_mode``): ``dx = dpre W_down`` is a cuBLAS
GEMM; the weight and bias gradients come from a second Triton pass (``wgrad_kernel``, in
``triton_weight_grads.py``) or from cuBLAS GEMMs on the stored ``[h | 1]`` and ``dpre`` (``cublas``).
(``dx`` as a third loop of this kernel lost to the cuBLAS GEMM in every SAM case measured on an H100 and was
removed: benchmarks/adapter_kernel_notes.md.)

The hidden width ``H`` is held as two power-of-two parts ``HA + HB ≥ H`` (each ≥ 16, masked), so
192 = 128 + 64 and 320 = 256 + 64 waste nothing; ``HB = 0`` drops the second part at compile time.
``M_BUCKET`` (the token count rounded up to a power of two) is unused by the code: it is part of the
autotuning key, so few-token and many-token calls get their own tile shapes.
Importing this module imports Triton: only the Triton modules here do, and ``triton_launch.py`` is imported
lazily by ``autograd.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["ACTIVATION_CODES", "adapter_bwd_kernel", "adapter_fwd_kernel", "hidden_split"]

ACTIVATION_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}


def hidden_split(hidden: int) -> tuple[int, int]:
    """Two power-of-two widths ``(HA, HB)`` covering ``hidden``, each ≥ 16 (``tl.dot``'s minimum); HB may be 0.

    Plain integer arithmetic: it runs on every launch, and Triton's own helpers are ``constexpr_function``
    objects that cost microseconds per host call."""
    first = max(16, 1 << (hidden.bit_length() - 1))
    rest = hidden - first
    return first, (0 if rest <= 0 else max(16, 1 << (rest - 1).bit_length()))


@triton.jit
def _act(z, ACT: tl.constexpr):
    """gelu: ``z Φ(z)``; gelu_tanh: ``z σ(2u)``, ``u = √(2/π)(z + 0.044715 z³)``; relu: ``max(z, 0)``."""
    if ACT == 0:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 1:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = z * tl.sigmoid(2.0 * u)
    else:
        out = tl.maximum(z, 0.0)
    return out


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """gelu: ``Φ(z) + z φ(z)``; gelu_tanh: ``σ + 2 z σ(1 − σ) u'``; relu: ``[z > 0]``."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        out = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 1:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        s = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        out = s + 2.0 * z * s * (1.0 - s) * du
    else:
        out = tl.where(z > 0.0, 1.0, 0.0)
    return out


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a b``; ``UPCAST`` (interpreter only) multiplies in fp32: the interpreter's bf16 dot is wrong."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x.to(dtype)``; under the interpreter (``UPCAST``) fp32 → bf16 is first rounded to nearest even by
    hand, because the interpreter's cast truncates where the GPU rounds."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _down_projection(x_ptr, wd_ptr, bd_ptr, rows, row_ok, C, H, stride_xm, stride_xc, stride_wdh, stride_wdc,
                     HAS_BD: tl.constexpr, HA: tl.constexpr, HB: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``pre = x[rows] W_downᵀ + b_down`` in fp32 as two column parts ``(pre_a, pre_b)``."""
    hid_a = tl.arange(0, HA)
    hid_b = HA + tl.arange(0, HB if HB > 0 else 16)
    pre_a = tl.zeros((BLOCK_M, HA), dtype=tl.float32)
    pre_b = tl.zeros((BLOCK_M, HB if HB > 0 else 16), dtype=tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    for k0 in range(0, C, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < C
        x_tile = tl.load(x_rows + cols[None, :] * stride_xc, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w_a = tl.load(wd_ptr + hid_a[None, :] * stride_wdh + cols[:, None] * stride_wdc,
                      mask=col_ok[:, None] & (hid_a[None, :] < H), other=0.0)
        pre_a = _mm(x_tile, w_a, pre_a, PRECISION, UPCAST)
        if HB > 0:
            w_b = tl.load(wd_ptr + hid_b[None, :] * stride_wdh + cols[:, None] * stride_wdc,
                          mask=col_ok[:, None] & (hid_b[None, :] < H), other=0.0)
            pre_b = _mm(x_tile, w_b, pre_b, PRECISION, UPCAST)
    if HAS_BD:
        pre_a += tl.load(bd_ptr + hid_a, mask=hid_a < H, other=0.0).to(tl.float32)[None, :]
        if HB > 0:
            pre_b += tl.load(bd_ptr + hid_b, mask=hid_b < H, other=0.0).to(tl.float32)[None, :]
    return pre_a, pre_b


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one binary for every token count
def adapter_fwd_kernel(
    x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, res_ptr, out_ptr,
    M, C, H, C_OUT, M_BUCKET,
    stride_xm, stride_xc, stride_wdh, stride_wdc, stride_wun, stride_wuh,
    stride_rm, stride_rn, stride_om, stride_on,
    scale,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_RES: tl.constexpr,
    HA: tl.constexpr, HB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out[rows] = residual[rows] + scale · (act(x[rows] W_downᵀ + b_down) W_upᵀ + b_up)``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    pre_a, pre_b = _down_projection(x_ptr, wd_ptr, bd_ptr, rows, row_ok, C, H, stride_xm, stride_xc,
                                    stride_wdh, stride_wdc, HAS_BD, HA, HB, PRECISION, UPCAST, BLOCK_M, BLOCK_K)
    h_a = _cast(_act(pre_a, ACT), wu_ptr.dtype.element_ty, UPCAST)
    h_b = _cast(_act(pre_b, ACT), wu_ptr.dtype.element_ty, UPCAST)
    hid_a = tl.arange(0, HA)
    hid_b = HA + tl.arange(0, HB if HB > 0 else 16)
    rows64 = rows.to(tl.int64)
    for n0 in range(0, C_OUT, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        out_ok = outs < C_OUT
        w_a = tl.load(wu_ptr + outs[None, :] * stride_wun + hid_a[:, None] * stride_wuh,
                      mask=(hid_a[:, None] < H) & out_ok[None, :], other=0.0)
        acc = _mm(h_a, w_a, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION, UPCAST)
        if HB > 0:
            w_b = tl.load(wu_ptr + outs[None, :] * stride_wun + hid_b[:, None] * stride_wuh,
                          mask=(hid_b[:, None] < H) & out_ok[None, :], other=0.0)
            acc = _mm(h_b, w_b, acc, PRECISION, UPCAST)
        if HAS_BU:
            acc += tl.load(bu_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        acc = acc * scale
        mask = row_ok[:, None] & out_ok[None, :]
        if HAS_RES:
            res = tl.load(res_ptr + rows64[:, None] * stride_rm + outs[None, :] * stride_rn, mask=mask, other=0.0)
            acc += res.to(tl.float32)
        tl.store(out_ptr + rows64[:, None] * stride_om + outs[None, :] * stride_on,
                 _cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _up_projection_grad(g_ptr, wu_ptr, rows64, row_ok, H, C_OUT, stride_gm, stride_gn, stride_wun, stride_wuh,
                        HA: tl.constexpr, HB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``dh = g[rows] W_up`` in fp32 as two column parts ``(dh_a, dh_b)``."""
    hid_a = tl.arange(0, HA)
    hid_b = HA + tl.arange(0, HB if HB > 0 else 16)
    dh_a = tl.zeros((BLOCK_M, HA), dtype=tl.float32)
    dh_b = tl.zeros((BLOCK_M, HB if HB > 0 else 16), dtype=tl.float32)
    for n0 in range(0, C_OUT, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        out_ok = outs < C_OUT
        g = _cast(tl.load(g_ptr + rows64[:, None] * stride_gm + outs[None, :] * stride_gn,
                          mask=row_ok[:, None] & out_ok[None, :], other=0.0), wu_ptr.dtype.element_ty, UPCAST)
        w_a = tl.load(wu_ptr + outs[:, None] * stride_wun + hid_a[None, :] * stride_wuh,
                      mask=out_ok[:, None] & (hid_a[None, :] < H), other=0.0)
        dh_a = _mm(g, w_a, dh_a, PRECISION, UPCAST)
        if HB > 0:
            w_b = tl.load(wu_ptr + outs[:, None] * stride_wun + hid_b[None, :] * stride_wuh,
                          mask=out_ok[:, None] & (hid_b[None, :] < H), other=0.0)
            dh_b = _mm(g, w_b, dh_b, PRECISION, UPCAST)
    return dh_a, dh_b


@triton.jit
def _both_projections(x_ptr, wd_ptr, bd_ptr, g_ptr, wu_ptr, rows64, row_ok, C, H, stride_xm, stride_xc,
                      stride_wdh, stride_wdc, stride_gm, stride_gn, stride_wun, stride_wuh, HAS_BD: tl.constexpr,
                      HA: tl.constexpr, HB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``pre = x[rows] W_downᵀ + b_down`` and ``dh = g[rows] W_up`` in one loop over the ``C = C_out``
    columns (both are sums over them): one pipelined stream of x, g and weight tiles instead of two loops
    that each start their pipeline afresh. Returns ``(pre_a, pre_b, dh_a, dh_b)`` in fp32."""
    hid_a = tl.arange(0, HA)
    hid_b = HA + tl.arange(0, HB if HB > 0 else 16)
    pre_a = tl.zeros((BLOCK_M, HA), dtype=tl.float32)
    pre_b = tl.zeros((BLOCK_M, HB if HB > 0 else 16), dtype=tl.float32)
    dh_a = tl.zeros((BLOCK_M, HA), dtype=tl.float32)
    dh_b = tl.zeros((BLOCK_M, HB if HB > 0 else 16), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < C
        tile_ok = row_ok[:, None] & col_ok[None, :]
        x_tile = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xc, mask=tile_ok, other=0.0)
        g_tile = _cast(tl.load(g_ptr + rows64[:, None] * stride_gm + cols[None, :] * stride_gn, mask=tile_ok,
                               other=0.0), wu_ptr.dtype.element_ty, UPCAST)
        wd_a = tl.load(wd_ptr + hid_a[None, :] * stride_wdh + cols[:, None] * stride_wdc,
                       mask=col_ok[:, None] & (hid_a[None, :] < H), other=0.0)
        wu_a = tl.load(wu_ptr + cols[:, None] * stride_wun + hid_a[None, :] * stride_wuh,
                       mask=col_ok[:, None] & (hid_a[None, :] < H), other=0.0)
        pre_a = _mm(x_tile, wd_a, pre_a, PRECISION, UPCAST)
        dh_a = _mm(g_tile, wu_a, dh_a, PRECISION, UPCAST)
        if HB > 0:
            wd_b = tl.load(wd_ptr + hid_b[None, :] * stride_wdh + cols[:, None] * stride_wdc,
                           mask=col_ok[:, None] & (hid_b[None, :] < H), other=0.0)
            wu_b = tl.load(wu_ptr + cols[:, None] * stride_wun + hid_b[None, :] * stride_wuh,
                           mask=col_ok[:, None] & (hid_b[None, :] < H), other=0.0)
            pre_b = _mm(x_tile, wd_b, pre_b, PRECISION, UPCAST)
            dh_b = _mm(g_tile, wu_b, dh_b, PRECISION, UPCAST)
    if HAS_BD:
        pre_a += tl.load(bd_ptr + hid_a, mask=hid_a < H, other=0.0).to(tl.float32)[None, :]
        if HB > 0:
            pre_b += tl.load(bd_ptr + hid_b, mask=hid_b < H, other=0.0).to(tl.float32)[None, :]
    return pre_a, pre_b, dh_a, dh_b


@triton.jit
def _store_hidden(ptr, a, b, rows64, row_ok, stride_m, H, HA: tl.constexpr, HB: tl.constexpr):
    """Store the two column parts of an ``M × H`` hidden-width tensor (``h`` or ``dpre``)."""
    hid_a = tl.arange(0, HA)
    hid_b = HA + tl.arange(0, HB if HB > 0 else 16)
    base = ptr + rows64[:, None] * stride_m
    tl.store(base + hid_a[None, :], a, mask=row_ok[:, None] & (hid_a[None, :] < H))
    if HB > 0:
        tl.store(base + hid_b[None, :], b, mask=row_ok[:, None] & (hid_b[None, :] < H))


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def adapter_bwd_kernel(
    x_ptr, wd_ptr, bd_ptr, wu_ptr, g_ptr,
    h_ptr, dpre_ptr,
    M, C, H, C_OUT, M_BUCKET,
    stride_xm, stride_xc, stride_wdh, stride_wdc, stride_wun, stride_wuh,
    stride_gm, stride_gn, stride_hm, stride_dpm,
    scale,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, STORE_H: tl.constexpr, ONES_COLUMN: tl.constexpr,
    STORE_DPRE: tl.constexpr, GATE_FP16: tl.constexpr, MERGED_LOOP: tl.constexpr, HA: tl.constexpr,
    HB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per token block: ``h = act(pre)`` (``[h | 1 0 … 0]``, ``H + 8`` columns, with ``ONES_COLUMN``),
    and ``dpre = scale · (g W_up) ⊙ act'(pre)``; the launcher turns them into ``dx`` (a cuBLAS GEMM) and the
    weight and bias gradients.

    ``MERGED_LOOP`` (needs ``C == C_OUT``): ``pre`` and ``g W_up`` accumulate in one loop over the columns;
    otherwise two loops, with ``act'(pre)`` held in fp16 (``GATE_FP16``) between them to free registers.
    The ones column lets one GEMM ``gᵀ [h | e₁]`` give both ``dW_up`` and ``db_up`` (a column sum of ``g``
    inside the loop cost more than the whole GEMM on an H100: cross-warp reductions stall the pipeline).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    compute_dtype = wu_ptr.dtype.element_ty
    if MERGED_LOOP:
        pre_a, pre_b, dh_a, dh_b = _both_projections(
            x_ptr, wd_ptr, bd_ptr, g_ptr, wu_ptr, rows64, row_ok, C, H, stride_xm, stride_xc, stride_wdh, stride_wdc,
            stride_gm, stride_gn, stride_wun, stride_wuh, HAS_BD, HA, HB, PRECISION, UPCAST, BLOCK_M, BLOCK_K)
        gate_a = _act_grad(pre_a, ACT)
        gate_b = _act_grad(pre_b, ACT)
    else:
        pre_a, pre_b = _down_projection(x_ptr, wd_ptr, bd_ptr, rows, row_ok, C, H, stride_xm, stride_xc,
                                        stride_wdh, stride_wdc, HAS_BD, HA, HB, PRECISION, UPCAST, BLOCK_M, BLOCK_K)
        # act'(pre) ∈ [-0.17, 1.13] held in fp16 for 16-bit inputs frees the fp32 pre-activation before the
        # g W_up loop (registers); fp16's 11-bit significand keeps dpre as accurate as autograd's bf16 one
        gate_a = _act_grad(pre_a, ACT)
        gate_b = _act_grad(pre_b, ACT)
        if GATE_FP16:
            gate_a = gate_a.to(tl.float16)
            gate_b = gate_b.to(tl.float16)
    if STORE_H:
        _store_hidden(h_ptr, _cast(_act(pre_a, ACT), compute_dtype, UPCAST),
                      _cast(_act(pre_b, ACT), compute_dtype, UPCAST), rows64, row_ok, stride_hm, H, HA, HB)
        if ONES_COLUMN:
            pad = tl.arange(0, 8)
            tl.store(h_ptr + rows64[:, None] * stride_hm + H + pad[None, :],
                     tl.where(pad[None, :] == 0, 1.0, 0.0).to(compute_dtype)
                     + tl.zeros((BLOCK_M, 8), dtype=compute_dtype), mask=row_ok[:, None])
    if not MERGED_LOOP:
        dh_a, dh_b = _up_projection_grad(g_ptr, wu_ptr, rows64, row_ok, H, C_OUT, stride_gm, stride_gn, stride_wun,
                                         stride_wuh, HA, HB, PRECISION, UPCAST, BLOCK_M, BLOCK_N)

    dpre_a = _cast(dh_a * scale * gate_a.to(tl.float32), compute_dtype, UPCAST)
    dpre_b = _cast(dh_b * scale * gate_b.to(tl.float32), compute_dtype, UPCAST)
    if STORE_DPRE:
        _store_hidden(dpre_ptr, dpre_a, dpre_b, rows64, row_ok, stride_dpm, H, HA, HB)
