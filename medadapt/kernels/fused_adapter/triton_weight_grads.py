"""Triton kernels for the fused adapter's weight and bias gradients (after ``adapter_bwd_kernel``).

``adapter_wgrad_kernel``: ``dW_down = dpreᵀ x``, ``db_down = Σ dpre``, ``dW_up = scale · gᵀ h``,
``db_up = scale · Σ g`` as fp32 partial sums over chunks of rows, one row of partials per chunk, added by the
launcher (deterministic, no atomics). ``column_sum_kernel``: ``Σ_rows a`` the same way, for the cuBLAS path's
``db_down``. Importing this module imports Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import _cast, _mm

__all__ = ["adapter_wgrad_kernel", "column_sum_kernel", "wgrad_part_offsets"]


@triton.jit(do_not_specialize=["M"])
def column_sum_kernel(a_ptr, part_ptr, M, N, stride_am, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``part[p, :N] = Σ a[r, :N]`` (fp32) over the row blocks ``r ∈ {p, p + P, p + 2P, …}`` of ``BLOCK_M`` rows,
    ``P`` programs; one column block (``N ≤ BLOCK_N``). The launcher sums the ``P`` partial rows.

    ``db_down = Σ_rows dpre`` this way reads ``dpre`` once at full bandwidth; torch's ``sum(0)`` of a tall
    ``(M, H)`` tensor took 67 µs at M = 32768, H = 192 on an H100 (four times the adapter's dx GEMM).
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        acc += tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_am + cols[None, :],
                       mask=(rows[:, None] < M) & (cols[None, :] < N), other=0.0).to(tl.float32)
    tl.store(part_ptr + pid * BLOCK_N + cols, tl.sum(acc, axis=0), mask=cols < N)


def wgrad_part_offsets(C: int, C_out: int, H: int) -> tuple[int, int, int, int]:
    """Where ``dW_down (H×C)``, ``dW_up (C_out×H)``, ``db_up (C_out)``, ``db_down (H)`` start in one row of the
    weight-gradient kernel's fp32 partial sums, and the row's length."""
    o_wu = H * C
    o_bu = o_wu + C_out * H
    o_bd = o_bu + C_out
    return o_wu, o_bu, o_bd, o_bd + H


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def adapter_wgrad_kernel(
    x_ptr, g_ptr, h_ptr, dpre_ptr, part_ptr,
    M, C, H, C_OUT, M_BUCKET, O_WU, O_BU, O_BD,
    stride_xm, stride_xc, stride_gm, stride_gn, stride_hm, stride_dpm, stride_part,
    scale,
    HA: tl.constexpr, HB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, WAVES: tl.constexpr, PROBLEM: tl.constexpr = 0,
):
    """Both weight gradients and both bias gradients as fp32 partial sums over chunks of rows.

    Programs ``(j, s)`` with ``j < cdiv(C, BLOCK_C)`` sum ``dpreᵀ x[:, cols]`` (``dW_down[:, cols]``) and, in
    slice 0, ``Σ dpre`` (``db_down``); the others sum ``scale · hᵀ g[:, cols]`` (``dW_upᵀ``, stored transposed)
    and ``scale · Σ g[:, cols]`` (``db_up``), over the ``s``-th chunk of ``BLOCK_M``-row blocks, into row ``s``
    of ``part`` (at the offsets ``O_WU, O_BU, O_BD`` from ``wgrad_part_offsets``); the launcher adds the rows
    (deterministic, no atomics). The two problems differ only in pointers, strides and the scale, so one loop
    serves both: the left operand (``dpre`` or ``h``, ``M × H``) is read once per column slice (from L2 for all
    but one), the right one (``x`` or ``g``) exactly once. Bias sums are products with a ones block, keeping
    the loop a chain of ``tl.dot``s (an in-loop ``tl.sum`` broke the pipelined loop on an H100); both sums are
    formed in every program (small products) and each problem stores its own. ``WAVES`` only sets the grid.

    ``PROBLEM``: 0 for both problems in one grid (the runtime choice above); 1 (dW_down, db_down) or 2
    (dW_up, db_up) for one problem per launch, chosen at compile time: no pointer selection, and only the
    bias sum the problem stores is formed (``WGRAD_LAUNCHES = 2`` in ``triton_launch``).

    Hidden tiles (``WGRAD_HIDDEN_TILE`` in ``triton_launch``; ``HB = 0``): grid axis 2 splits the hidden rows
    into tiles of ``HA``, program ``t`` owning rows ``[t·HA, (t+1)·HA)`` of both weights (and of ``db_down``);
    ``db_up`` is stored by tile 0. Each program then holds an ``[HA × BLOCK_C]`` accumulator instead of the
    whole hidden width, and the right operand is read once per tile. One tile (the default) is the above.
    """
    j = tl.program_id(0)
    s = tl.program_id(1)
    t = tl.program_id(2)
    if PROBLEM == 0:
        n_down = tl.cdiv(C, BLOCK_C)
        up = j >= n_down
        if up:
            j = j - n_down
    else:
        up = PROBLEM == 2  # a compile-time constant: the branches below fold
    if up:
        left_ptr, stride_lm = h_ptr, stride_hm
        right_ptr, stride_rm, stride_rc = g_ptr, stride_gm, stride_gn
        width, mult = C_OUT, scale
        out_h, out_c, o_out, o_sum = 1, H, O_WU, O_BU  # dW_up[c, h], db_up[c]
    else:
        left_ptr, stride_lm = dpre_ptr, stride_dpm
        right_ptr, stride_rm, stride_rc = x_ptr, stride_xm, stride_xc
        width, mult = C, 1.0
        out_h, out_c, o_out, o_sum = C, 1, 0, O_BD  # dW_down[h, c], db_down[h]
    n_blocks = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(n_blocks, tl.num_programs(1))
    cols = j * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < width
    HBW: tl.constexpr = HB if HB > 0 else 16
    hid_a = t * HA + tl.arange(0, HA)  # t = 0 unless the hidden rows are tiled (then HB = 0)
    hid_b = HA + tl.arange(0, HBW)
    ha_ok = hid_a < H
    hb_ok = hid_b < H
    dtype = h_ptr.dtype.element_ty
    ones = tl.full((BLOCK_M, 16), 1.0, tl.float32).to(dtype)
    acc_a = tl.zeros((HA, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((HBW, BLOCK_C), dtype=tl.float32)
    sum_left_a = tl.zeros((HA, 16), dtype=tl.float32)
    sum_left_b = tl.zeros((HBW, 16), dtype=tl.float32)
    sum_right = tl.zeros((BLOCK_C, 16), dtype=tl.float32)
    first = s * per_split
    last = tl.minimum(first + per_split, n_blocks)
    for blk in range(first, last):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        right = _cast(tl.load(right_ptr + rows64[:, None] * stride_rm + cols[None, :] * stride_rc,
                              mask=row_ok[:, None] & col_ok[None, :], other=0.0), dtype, UPCAST)
        left_a = tl.load(left_ptr + rows64[None, :] * stride_lm + hid_a[:, None],
                         mask=ha_ok[:, None] & row_ok[None, :], other=0.0)  # [hidden, rows]
        acc_a = _mm(left_a, right, acc_a, PRECISION, UPCAST)
        if PROBLEM != 2:  # db_down
            sum_left_a = _mm(left_a, ones, sum_left_a, PRECISION, UPCAST)
        if PROBLEM != 1:  # db_up
            sum_right = _mm(tl.trans(right), ones, sum_right, PRECISION, UPCAST)  # rows ≥ 64 for wgmma
        if HB > 0:
            left_b = tl.load(left_ptr + rows64[None, :] * stride_lm + hid_b[:, None],
                             mask=hb_ok[:, None] & row_ok[None, :], other=0.0)
            acc_b = _mm(left_b, right, acc_b, PRECISION, UPCAST)
            if PROBLEM != 2:
                sum_left_b = _mm(left_b, ones, sum_left_b, PRECISION, UPCAST)
    part = part_ptr + s.to(tl.int64) * stride_part
    tl.store(part + o_out + hid_a[:, None] * out_h + cols[None, :] * out_c, acc_a * mult,
             mask=ha_ok[:, None] & col_ok[None, :])
    first_col = tl.arange(0, 16)[None, :] == 0
    if up:  # db_up[cols]
        tl.store(part + o_sum + cols, tl.sum(tl.where(first_col, sum_right, 0.0), axis=1) * mult,
                 mask=col_ok & (t == 0))
    else:  # db_down, from slice 0 only
        tl.store(part + o_sum + hid_a, tl.sum(tl.where(first_col, sum_left_a, 0.0), axis=1), mask=ha_ok & (j == 0))
    if HB > 0:
        tl.store(part + o_out + hid_b[:, None] * out_h + cols[None, :] * out_c, acc_b * mult,
                 mask=hb_ok[:, None] & col_ok[None, :])
        if not up:
            tl.store(part + o_sum + hid_b, tl.sum(tl.where(first_col, sum_left_b, 0.0), axis=1),
                     mask=hb_ok & (j == 0))
