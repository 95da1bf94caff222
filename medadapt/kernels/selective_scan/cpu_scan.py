"""Selective scan by a compiled C kernel on CPU tensors (``csrc/scan_cpu.c``), forward and backward.

Everything of the op runs in C, fused: ``δ = softplus(delta + delta_bias)``, the recurrence
``h_t = exp(δ_t A) h_{t−1} + δ_t u_t B_t``, ``y_t = Σ_n C_t,n h_t,n + D u_t`` and the gate
``out = y ⊙ silu(z)``, one tile of 16 channels at a time (vector instructions across the channels),
tiles split over ``torch.get_num_threads()`` Python threads (ctypes releases the GIL). The forward keeps
the state before every chunk of 64 steps (``(B, D, L/64, N)``: 1/4 of u's size at N = 16); the backward
recomputes each chunk's states from them, so nothing of size ``(B, D, L, N)`` ever exists. float64
inputs run the float64 build (tests); every other dtype runs in float32 (e^x by a vectorised 2^x
polynomial, relative error ≈ 1e-7).

Needs variable B and C (``(B, N, L)`` or ``(B, G, N, L)``, as in Mamba) and a C compiler (built once,
cached; see ``medadapt.kernels._cbuild``). ``cpu_kernel_available()`` says whether it can run.
"""

from __future__ import annotations

import ctypes
import math
import os
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from .._cbuild import build_error, load_library
from ._validate import bc_groups, check_scan_inputs

__all__ = ["cpu_kernel_available", "selective_scan_cpu", "SelectiveScanCpuFn", "LANES"]

LANES, CHUNK = 16, 64  # channels per tile and steps per checkpoint, as in csrc/scan_cpu.c
_SOURCE = Path(__file__).with_name("csrc") / "scan_cpu.c"
_P, _I = ctypes.c_void_p, ctypes.c_int64
_FWD_ARGS = [_P] * 3 + [_I] + [_P] * 9 + [_I] * 8
_BWD_ARGS = [_P] * 3 + [_I] + [_P] * 16 + [_I] * 8
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def _library() -> ctypes.CDLL | None:
    lib = load_library("scan_cpu", str(_SOURCE))
    if lib is not None and not getattr(lib, "_medadapt_typed", False):
        for suffix in ("f32", "f64"):
            getattr(lib, f"scan_fwd_{suffix}").argtypes = _FWD_ARGS
            getattr(lib, f"scan_bwd_{suffix}").argtypes = _BWD_ARGS
            getattr(lib, f"scan_fwd_{suffix}").restype = ctypes.c_int
            getattr(lib, f"scan_bwd_{suffix}").restype = ctypes.c_int
        lib._medadapt_typed = True
    return lib


def cpu_kernel_available() -> bool:
    """True when the C kernel is built (or can be built now) and loads."""
    return _library() is not None


def _require_library() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the CPU selective-scan kernel is unavailable: {build_error('scan_cpu')}")
    return lib


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of at least ``workers`` threads, made anew in a forked child (its parent's threads are gone)."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < workers:
        _pool, _pool_pid = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medadapt-scan"), os.getpid()
    return _pool


def _run_tiles(fn, args: list, tiles: int, args_for=None) -> None:
    """Run ``fn(*args, begin, end)`` over ``[0, tiles)`` split into ``torch.get_num_threads()`` ranges,
    one per thread (the calling thread takes the first). ``args_for(i)``, when given, is the argument
    list of range ``i`` instead of ``args`` (private accumulators per call)."""
    workers = _workers(tiles)
    bounds = [tiles * i // workers for i in range(workers + 1)]

    def call(i):
        if fn(*(args if args_for is None else args_for(i)), bounds[i], bounds[i + 1]) != 0:
            raise MemoryError("the CPU selective-scan kernel could not allocate its work buffers")

    others = [_thread_pool(workers - 1).submit(call, i) for i in range(1, workers)] if workers > 1 else []
    try:
        call(0)
    finally:
        wait(others)  # never leave a call writing into buffers the caller may free
    for f in others:
        f.result()


def _bc_var(m: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """Variable B or C as contiguous ``(B, G, N, L)`` in ``cdt``."""
    return (m[:, None] if m.dim() == 3 else m).to(cdt).contiguous()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _compute_copies(cdt: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each tensor contiguous in ``cdt`` (no copy when it already is); B and C (4th, 5th) as
    ``(B, G, N, L)``."""
    return [_bc_var(t, cdt) if i in (3, 4) else None if t is None else t.to(cdt).contiguous()
            for i, t in enumerate(tensors)]


def _suffix(cdt: torch.dtype) -> str:
    return "f64" if cdt == torch.float64 else "f32"


def _workers(tiles: int) -> int:
    return max(1, min(torch.get_num_threads(), tiles))


class _Geometry:
    """Sizes of one call and the tile count: tiles never cross a B or C group boundary."""

    def __init__(self, u: torch.Tensor, A: torch.Tensor, Bv: torch.Tensor, Cv: torch.Tensor):
        self.batch, self.dim, self.length = u.shape
        self.nst = A.shape[1]
        self.gb, self.gc = Bv.shape[1], Cv.shape[1]
        self.seg = math.gcd(self.dim // self.gb, self.dim // self.gc)
        self.tiles = self.batch * (self.dim // self.seg) * -(-self.seg // LANES)

    def sizes(self) -> list[int]:
        return [self.dim, self.length, self.nst, self.gb, self.gc, self.seg]


class SelectiveScanCpuFn(torch.autograd.Function):
    """C-kernel selective scan with a recomputing backward; returns ``(out, last_state)``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        lib = _require_library()
        cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        uc, dc, Ac, Bv, Cv, Dc, zc, bias, h0 = _compute_copies(cdt, u, delta, A, B, C, D, z, delta_bias, initial_state)
        geo = _Geometry(u, A, Bv, Cv)
        out = torch.empty_like(uc)
        last = uc.new_empty(geo.batch, geo.dim, geo.nst)
        chunks = -(-geo.length // CHUNK)
        ckpt = uc.new_empty(geo.tiles, chunks, geo.nst, LANES) if any(ctx.needs_input_grad) else None
        args = [_ptr(uc), _ptr(dc), _ptr(bias), int(delta_softplus)]
        args += [_ptr(t) for t in (Ac, Bv, Cv, Dc, zc, h0, out, last, ckpt)]
        _run_tiles(getattr(lib, f"scan_fwd_{_suffix(cdt)}"), args + geo.sizes(), geo.tiles)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt)
        ctx.softplus = delta_softplus
        ctx.set_materialize_grads(False)
        return out.to(u.dtype), last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt = ctx.saved_tensors
        lib = _require_library()
        cdt = ckpt.dtype
        uc, dc, Ac, Bv, Cv, Dc, zc, bias, _ = _compute_copies(cdt, u, delta, A, B, C, D, z, delta_bias, None)
        geo = _Geometry(u, A, Bv, Cv)
        dout = uc.new_zeros(uc.shape) if dout is None else dout.to(cdt).contiguous()
        dlast = None if dlast is None else dlast.to(cdt).contiguous()
        du, ddelta = torch.empty_like(uc), torch.empty_like(uc)
        dz = None if z is None else torch.empty_like(uc)
        dA_rows, dh0 = uc.new_empty(geo.batch, geo.dim, geo.nst), uc.new_empty(geo.batch, geo.dim, geo.nst)
        dD_rows = uc.new_empty(geo.batch, geo.dim)
        workers = _workers(geo.tiles)
        dB, dC = Bv.new_zeros((workers, *Bv.shape)), Cv.new_zeros((workers, *Cv.shape))
        head = [_ptr(uc), _ptr(dc), _ptr(bias), int(ctx.softplus)]
        head += [_ptr(t) for t in (Ac, Bv, Cv, Dc, zc, ckpt, dout, dlast, du, ddelta, dz, dA_rows, dD_rows)]
        tail = [_ptr(dh0)] + geo.sizes()

        def with_private_accumulators(i):  # dB, dC sum over the channels of a group: one copy per thread
            return head + [dB[i].data_ptr(), dC[i].data_ptr()] + tail

        _run_tiles(getattr(lib, f"scan_bwd_{_suffix(cdt)}"), [], geo.tiles, with_private_accumulators)
        return (
            du.to(u.dtype), ddelta.to(delta.dtype), dA_rows.sum(0).to(A.dtype),
            dB.sum(0).reshape(B.shape).to(B.dtype), dC.sum(0).reshape(C.shape).to(C.dtype),
            None if D is None else dD_rows.sum(0).to(D.dtype), None if z is None else dz.to(z.dtype),
            None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype),
            None if initial_state is None else dh0.to(initial_state.dtype),
            None,
        )


def selective_scan_cpu(
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
):
    """Selective scan by the compiled CPU kernel; same contract as ``selective_scan``.

    Raises:
        ValueError: bad inputs (as ``selective_scan``), tensors not on the CPU, or a fixed ``(D, N)``
            B or C (the kernel needs variable B/C; ``selective_scan_torch`` handles fixed ones).
        RuntimeError: the kernel cannot be built here (no C compiler); the message says why.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if u.device.type != "cpu":
        raise ValueError(f"u: selective_scan_cpu needs CPU tensors, got {u.device}")
    for name, m in (("B", B), ("C", C)):
        if bc_groups(m) == 0:
            raise ValueError(f"{name}: selective_scan_cpu needs a variable {name} of shape (B, N, L) or "
                             f"(B, G, N, L), got fixed {tuple(m.shape)}; use selective_scan_torch")
    out, last = SelectiveScanCpuFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus))
    return (out, last) if return_last_state else out
