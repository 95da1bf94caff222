"""Triton kernels of the selective scan (imported lazily: this module imports triton).

One program per (batch, block of ``BLOCK_D`` channels); it walks the sequence in chunks of ``BLOCK_T``
steps, loads u/δ/z of the chunk once, and loops over the N states. Per state n the chunk's recurrence
``h_t = a_t h_{t−1} + b_t`` (``a_t = e^{δ_t A_n}``, ``b_t = δ_t u_t B_{n,t}``) is one
``tl.associative_scan`` over time of the affine maps ``(a, b)``; the state entering the chunk is
carried in registers (``(BLOCK_D, BLOCK_N)``). Steps past L are padded with the identity map
``(1, 0)``, so the last column of a chunk always holds the carried state.

The forward stores the state at the start of every chunk (``(B, D, chunks, N)``); the backward walks
the chunks in reverse, recomputes the chunk's states from it, and runs the reverse scan
``dh_t = C_t dy_t + a_{t+1} dh_{t+1}`` as ``tl.associative_scan(reverse=True)`` over triples
``(first multiplier, product after the first, value)`` — this avoids shifting ``a`` by one step.
Gradients of variable B/C are summed over channels with atomics; per-channel parameters (A, D,
delta_bias, fixed B/C) accumulate in registers and are added once per program.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["selective_scan_fwd_kernel", "selective_scan_bwd_kernel"]

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """(first map, then second): ``x -> a2 (a1 x + b1) + b2``."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _reverse_combine(f_later, p_later, v_later, f_early, p_early, v_early):
    """Reverse scan of ``dh_t = g_t + a_{t+1} dh_{t+1}``: a segment ``[t, s]`` is
    ``(a_t, Π_{r=t+1..s} a_r, Σ_k Π_{r=t+1..k} a_r g_k)``; joining an earlier segment to a later one."""
    link = p_early * f_later
    return f_early, link * p_later, v_early + link * v_later


@triton.jit
def _column(tile, idx, n):
    """``tile[:, n]`` of a ``(BLOCK_D, BLOCK_N)`` register tile."""
    return tl.sum(tl.where(idx[None, :] == n, tile, 0.0), 1)


@triton.jit
def _set_column(tile, idx, n, value):
    return tl.where(idx[None, :] == n, value[:, None], tile)


@triton.jit
def _load_step_inputs(u_ptr, delta_ptr, bias, row, offs_t, mask, SOFTPLUS: tl.constexpr,
                      DT: tl.constexpr):
    """u, δ (bias + softplus applied; 0 past L) and softplus' for one chunk, ``(BLOCK_D, BLOCK_T)``."""
    u = tl.load(u_ptr + row + offs_t[None, :], mask=mask, other=0.0).to(DT)
    raw = tl.load(delta_ptr + row + offs_t[None, :], mask=mask, other=0.0).to(DT) + bias[:, None]
    if SOFTPLUS:
        e = tl.exp(tl.minimum(raw, 20.0))
        dt = tl.where(raw > 20.0, raw, tl.log(1.0 + e))
        dsp = tl.where(raw > 20.0, 1.0, e / (1.0 + e))
    else:
        dt = raw
        dsp = tl.full(raw.shape, 1.0, DT)
    return u, tl.where(mask, dt, 0.0), dsp


@triton.jit
def _load_bc(ptr, pid_b, offs_d, mask_d, group, n, offs_t, mask, s_b, s_g, s_n, s_l,
             VARIABLE: tl.constexpr, DT: tl.constexpr):
    """B or C at state n for the chunk: ``(BLOCK_D, BLOCK_T)`` (variable) or ``(BLOCK_D, 1)`` (fixed)."""
    if VARIABLE:
        p = ptr + pid_b * s_b + group[:, None] * s_g + n * s_n + offs_t[None, :] * s_l
        return tl.load(p, mask=mask, other=0.0).to(DT)
    else:
        return tl.load(ptr + offs_d[:, None] * s_g + n * s_n, mask=mask_d[:, None], other=0.0).to(DT)


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr,
    out_ptr, last_ptr, states_ptr,
    L, DIM, N, n_chunks, cpg_b, cpg_c,
    s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    SOFTPLUS: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr, SAVE_STATES: tl.constexpr,
    DT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Forward. u, delta, z, out: contiguous ``(B, D, L)``; A ``(D, N)``; init/last ``(B, D, N)``;
    states ``(B, D, n_chunks, N)``. B/C strides ``(batch, group or channel, state, step)``."""
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)
    group_b, group_c = offs_d // cpg_b, offs_d // cpg_c
    bias = tl.zeros((BLOCK_D,), DT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(DT)
    d_skip = tl.zeros((BLOCK_D,), DT)
    if HAS_D:
        d_skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(DT)
    state_off = (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), DT)
    if HAS_INIT:
        h = tl.load(init_ptr + state_off, mask=mask_dn, other=0.0).to(DT)
    row = (pid_b * DIM + offs_d[:, None]) * L
    t_local = tl.arange(0, BLOCK_T)
    for c in range(n_chunks):
        offs_t = c * BLOCK_T + t_local
        mask = mask_d[:, None] & (offs_t[None, :] < L)
        if SAVE_STATES:
            s_off = ((pid_b * DIM + offs_d[:, None]) * n_chunks + c) * N + offs_n[None, :]
            tl.store(states_ptr + s_off, h, mask=mask_dn)
        u, dt, _ = _load_step_inputs(u_ptr, delta_ptr, bias, row, offs_t, mask, SOFTPLUS, DT)
        du = dt * u
        y = d_skip[:, None] * u
        for n in range(N):
            b_n = _load_bc(B_ptr, pid_b, offs_d, mask_d, group_b, n, offs_t, mask, s_bb, s_bg, s_bn, s_bl, B_VAR, DT)
            c_n = _load_bc(C_ptr, pid_b, offs_d, mask_d, group_c, n, offs_t, mask, s_cb, s_cg, s_cn, s_cl, C_VAR, DT)
            a2_n = tl.load(A_ptr + offs_d * N + n, mask=mask_d, other=0.0).to(DT) * LOG2E
            decay = tl.exp2(dt * a2_n[:, None])
            acc_a, acc_b = tl.associative_scan((decay, du * b_n), 1, _affine_combine)
            hs = acc_a * _column(h, offs_n, n)[:, None] + acc_b
            y += hs * c_n
            h = _set_column(h, offs_n, n, tl.sum(tl.where(t_local[None, :] == BLOCK_T - 1, hs, 0.0), 1))
        if HAS_Z:
            zt = tl.load(z_ptr + row + offs_t[None, :], mask=mask, other=0.0).to(DT)
            y = y * zt / (1.0 + tl.exp(-zt))
        tl.store(out_ptr + row + offs_t[None, :], y, mask=mask)
    tl.store(last_ptr + state_off, h, mask=mask_dn)


@triton.jit
def selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dinit_ptr,
    L, DIM, N, n_chunks, cpg_b, cpg_c,
    s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
    HAS_INIT: tl.constexpr, SOFTPLUS: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
    REDUCE_D: tl.constexpr, DT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward. dB/dC (variable: same layout as B/C, contiguous; fixed: ``(D, N)``), dA, dD, dbias are
    zero-initialised accumulators (added with atomics). ``REDUCE_D``: every block lies in one group of
    both B and C, so their gradients are summed over the block before the atomic add."""
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)
    group_b, group_c = offs_d // cpg_b, offs_d // cpg_c
    bias = tl.zeros((BLOCK_D,), DT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(DT)
    d_skip = tl.zeros((BLOCK_D,), DT)
    if HAS_D:
        d_skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(DT)
    state_off = (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :]
    kappa = tl.zeros((BLOCK_D, BLOCK_N), DT)  # e^{δ A} dh carried backwards into the previous chunk
    if HAS_DLAST:
        kappa = tl.load(dlast_ptr + state_off, mask=mask_dn, other=0.0).to(DT)
    grad_a = tl.zeros((BLOCK_D, BLOCK_N), DT)
    grad_b_fixed = tl.zeros((BLOCK_D, BLOCK_N), DT)
    grad_c_fixed = tl.zeros((BLOCK_D, BLOCK_N), DT)
    grad_d = tl.zeros((BLOCK_D,), DT)
    grad_bias = tl.zeros((BLOCK_D,), DT)
    row = (pid_b * DIM + offs_d[:, None]) * L
    t_local = tl.arange(0, BLOCK_T)
    ones = tl.full((BLOCK_D, BLOCK_T), 1.0, DT)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        offs_t = c * BLOCK_T + t_local
        mask = mask_d[:, None] & (offs_t[None, :] < L)
        u, dt, dsp = _load_step_inputs(u_ptr, delta_ptr, bias, row, offs_t, mask, SOFTPLUS, DT)
        du = dt * u
        dout = tl.load(dout_ptr + row + offs_t[None, :], mask=mask, other=0.0).to(DT)
        dy = dout
        if HAS_Z:
            zt = tl.load(z_ptr + row + offs_t[None, :], mask=mask, other=0.0).to(DT)
            sig = 1.0 / (1.0 + tl.exp(-zt))
            dy = dout * zt * sig
        h0_row = ((pid_b * DIM + offs_d) * n_chunks + c) * N
        y = d_skip[:, None] * u
        sum_dh_b = tl.zeros((BLOCK_D, BLOCK_T), DT)  # Σ_n dh_n B_n
        sum_a_q = tl.zeros((BLOCK_D, BLOCK_T), DT)  # Σ_n A_n dh_n a_t h_{t−1}
        for n in range(N):
            b_n = _load_bc(B_ptr, pid_b, offs_d, mask_d, group_b, n, offs_t, mask, s_bb, s_bg, s_bn, s_bl, B_VAR, DT)
            c_n = _load_bc(C_ptr, pid_b, offs_d, mask_d, group_c, n, offs_t, mask, s_cb, s_cg, s_cn, s_cl, C_VAR, DT)
            a_n = tl.load(A_ptr + offs_d * N + n, mask=mask_d, other=0.0).to(DT)
            decay = tl.exp2(dt * (a_n * LOG2E)[:, None])
            b_term = du * b_n
            acc_a, acc_b = tl.associative_scan((decay, b_term), 1, _affine_combine)
            h0_n = tl.load(states_ptr + h0_row + n, mask=mask_d, other=0.0).to(DT)
            hs = acc_a * h0_n[:, None] + acc_b
            y += hs * c_n
            g = c_n * dy + tl.where(t_local[None, :] == BLOCK_T - 1, _column(kappa, offs_n, n)[:, None], 0.0)
            _, _, dh = tl.associative_scan((decay, ones, g), 1, _reverse_combine, reverse=True)
            kappa = _set_column(kappa, offs_n, n, tl.sum(tl.where(t_local[None, :] == 0, decay * dh, 0.0), 1))
            q = dh * (hs - b_term)  # dh ⊙ a_t h_{t−1}
            sum_dh_b += dh * b_n
            sum_a_q += q * a_n[:, None]
            grad_a = _set_column(grad_a, offs_n, n, _column(grad_a, offs_n, n) + tl.sum(q * dt, 1))
            gc = hs * dy  # dC summed over channels (variable) or steps (fixed)
            gb = dh * du
            if C_VAR:
                p = dC_ptr + pid_b * s_cb + n * s_cn + offs_t * s_cl
                if REDUCE_D:
                    tl.atomic_add(p + tl.min(group_c, 0) * s_cg, tl.sum(gc, 0), mask=offs_t < L)
                else:
                    tl.atomic_add(p[None, :] + group_c[:, None] * s_cg, gc, mask=mask)
            else:
                grad_c_fixed = _set_column(grad_c_fixed, offs_n, n, _column(grad_c_fixed, offs_n, n) + tl.sum(gc, 1))
            if B_VAR:
                p = dB_ptr + pid_b * s_bb + n * s_bn + offs_t * s_bl
                if REDUCE_D:
                    tl.atomic_add(p + tl.min(group_b, 0) * s_bg, tl.sum(gb, 0), mask=offs_t < L)
                else:
                    tl.atomic_add(p[None, :] + group_b[:, None] * s_bg, gb, mask=mask)
            else:
                grad_b_fixed = _set_column(grad_b_fixed, offs_n, n, _column(grad_b_fixed, offs_n, n) + tl.sum(gb, 1))
        ddelta = (u * sum_dh_b + sum_a_q) * dsp
        tl.store(du_ptr + row + offs_t[None, :], dt * sum_dh_b + d_skip[:, None] * dy, mask=mask)
        tl.store(ddelta_ptr + row + offs_t[None, :], ddelta, mask=mask)
        if HAS_Z:
            tl.store(dz_ptr + row + offs_t[None, :], dout * y * sig * (1.0 + zt * (1.0 - sig)), mask=mask)
        grad_d += tl.sum(dy * u, 1)
        grad_bias += tl.sum(tl.where(mask, ddelta, 0.0), 1)
    tl.atomic_add(dA_ptr + offs_d[:, None] * N + offs_n[None, :], grad_a, mask=mask_dn)
    if not B_VAR:
        tl.atomic_add(dB_ptr + offs_d[:, None] * N + offs_n[None, :], grad_b_fixed, mask=mask_dn)
    if not C_VAR:
        tl.atomic_add(dC_ptr + offs_d[:, None] * N + offs_n[None, :], grad_c_fixed, mask=mask_dn)
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, grad_d, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, grad_bias, mask=mask_d)
    if HAS_INIT:
        tl.store(dinit_ptr + state_off, kappa, mask=mask_dn)
