"""Selective scan by the Triton kernels: launcher and ``autograd.Function``.

Triton is imported when a function here first runs (the package imports without it). On CUDA the
kernels run compiled; on CPU tensors they run in Triton's interpreter (``TRITON_INTERPRET=1``, set
before the first import), which is how the tests check them.
State and arithmetic in float32 (float64 for float64 inputs); outputs in the inputs' dtypes.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._dispatch import interpret_mode
from ._validate import check_scan_inputs

__all__ = ["selective_scan_triton", "SelectiveScanTritonFn", "launch_config"]


def _kernels():
    from medadapt._optional import require

    require("triton", "the Triton selective-scan kernel")
    from . import _triton_kernels

    return _triton_kernels


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def launch_config(length: int, dim: int, block_d: int | None = None, block_t: int | None = None) -> dict:
    """Block sizes and warps. GPU: one channel per program, chunks of up to 1024 steps (the scan's
    items per thread stay at 4–8); interpreter: small blocks so CPU tests stay fast."""
    if interpret_mode():
        bd, bt, warps = min(8, _next_pow2(dim)), 16, 1
    else:
        bd, bt = 1, min(1024, max(16, _next_pow2(length)))
        warps = 4 if bt <= 512 else 8
    bd = block_d or bd
    bt = block_t or bt
    return {"BLOCK_D": bd, "BLOCK_T": bt, "num_warps": warps}


def _bc_args(m: torch.Tensor, dim: int):
    """B or C -> (contiguous tensor, strides (batch, group|channel, state, step), channels per group,
    variable?)."""
    if m.dim() == 2:
        m = m.contiguous()
        return m, (0, m.stride(0), m.stride(1), 0), 1, False
    if m.dim() == 3:
        m = m.unsqueeze(1)
    m = m.contiguous()
    return m, tuple(m.stride()), dim // m.shape[1], True


class SelectiveScanTritonFn(torch.autograd.Function):
    """Triton selective scan; ``forward`` returns ``(out, last_state)``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, block_d, block_t):
        tk = _kernels()
        import triton.language as tl

        batch, dim, length = u.shape
        n = A.shape[1]
        cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
        z = None if z is None else z.contiguous()
        D = None if D is None else D.contiguous()  # the kernels index D and delta_bias as ptr + channel
        delta_bias = None if delta_bias is None else delta_bias.contiguous()
        init = None if initial_state is None else initial_state.contiguous()
        Bc, sb, cpg_b, b_var = _bc_args(B, dim)
        Cc, sc, cpg_c, c_var = _bc_args(C, dim)
        cfg = launch_config(length, dim, block_d, block_t)
        n_chunks = -(-length // cfg["BLOCK_T"])
        save = any(ctx.needs_input_grad)
        out = torch.empty_like(u)
        last = u.new_empty((batch, dim, n), dtype=cdt)
        states = u.new_empty((batch, dim, n_chunks, n) if save else (1,), dtype=cdt)
        grid = (batch, -(-dim // cfg["BLOCK_D"]))
        tk.selective_scan_fwd_kernel[grid](
            u, delta, A, Bc, Cc, u if D is None else D, u if z is None else z,
            u if delta_bias is None else delta_bias, last if init is None else init,
            out, last, states,
            length, dim, n, n_chunks, cpg_b, cpg_c, *sb, *sc,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_INIT=init is not None, SOFTPLUS=bool(delta_softplus), B_VAR=b_var, C_VAR=c_var,
            SAVE_STATES=save, DT=tl.float64 if cdt == torch.float64 else tl.float32,
            BLOCK_D=cfg["BLOCK_D"], BLOCK_T=cfg["BLOCK_T"], BLOCK_N=max(2, _next_pow2(n)),
            num_warps=cfg["num_warps"],
        )
        ctx.save_for_backward(u, delta, A, Bc, Cc, D, z, delta_bias, init, states)
        ctx.shapes = (B.shape, C.shape, B.dtype, C.dtype, initial_state is not None)
        ctx.cfg, ctx.softplus, ctx.meta = cfg, bool(delta_softplus), (sb, sc, cpg_b, cpg_c, b_var, c_var)
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        tk = _kernels()
        import triton.language as tl

        u, delta, A, Bc, Cc, D, z, delta_bias, init, states = ctx.saved_tensors
        b_shape, c_shape, b_dtype, c_dtype, has_init = ctx.shapes
        sb, sc, cpg_b, cpg_c, b_var, c_var = ctx.meta
        cfg = ctx.cfg
        batch, dim, length = u.shape
        n = A.shape[1]
        cdt = states.dtype
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dlast = None if dlast is None else dlast.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dA = torch.zeros(A.shape, dtype=cdt, device=u.device)
        dB = torch.zeros(Bc.shape, dtype=cdt, device=u.device)
        dC = torch.zeros(Cc.shape, dtype=cdt, device=u.device)
        dD = torch.zeros((dim,), dtype=cdt, device=u.device)
        dbias = torch.zeros((dim,), dtype=cdt, device=u.device)
        dinit = torch.empty((batch, dim, n), dtype=cdt, device=u.device) if has_init else dA
        block_d = cfg["BLOCK_D"]
        reduce_d = (not b_var or cpg_b % block_d == 0) and (not c_var or cpg_c % block_d == 0)
        grid = (batch, -(-dim // block_d))
        tk.selective_scan_bwd_kernel[grid](
            u, delta, A, Bc, Cc, u if D is None else D, u if z is None else z,
            u if delta_bias is None else delta_bias, states, dout, dA if dlast is None else dlast,
            du, ddelta, du if dz is None else dz, dA, dB, dC, dD, dbias, dinit,
            length, dim, n, states.shape[2], cpg_b, cpg_c, *sb, *sc,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_DLAST=dlast is not None, HAS_INIT=has_init, SOFTPLUS=ctx.softplus,
            B_VAR=b_var, C_VAR=c_var, REDUCE_D=reduce_d,
            DT=tl.float64 if cdt == torch.float64 else tl.float32,
            BLOCK_D=block_d, BLOCK_T=cfg["BLOCK_T"], BLOCK_N=max(2, _next_pow2(n)),
            num_warps=cfg["num_warps"],
        )
        return (
            du, ddelta, dA.to(A.dtype), dB.reshape(b_shape).to(b_dtype), dC.reshape(c_shape).to(c_dtype),
            None if D is None else dD.to(D.dtype), dz,
            None if delta_bias is None else dbias.to(delta_bias.dtype),
            dinit.to(init.dtype) if has_init else None,
            None, None, None,
        )


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    block_d: int | None = None,
    block_t: int | None = None,
):
    """Selective scan by the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``); same contract
    as ``selective_scan``. ``block_d``/``block_t`` override the launch block sizes (tests, tuning)."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out, last = SelectiveScanTritonFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                            bool(delta_softplus), block_d, block_t)
    return (out, last) if return_last_state else out
