"""Selective scan in plain torch, chunked over time: bounded memory, closed form per chunk.

Forward: per chunk of at most ``max_chunk`` steps, the states come from one cumulative sum
(``_torch_chunk.chunk_forward``); only the state at each chunk start is kept (for the backward).
Backward: chunks in reverse; each recomputes its states from the saved chunk-start state and runs the
reverse scan ``dh_t = C_t dy_t + e^{δ_{t+1} A} dh_{t+1}`` in closed form. No ``(B, D, L, N)`` tensor
exists at any time: the largest temporaries are a few ``(B, max_chunk, D, N)`` buffers, plus
``(B, L, D)`` copies of the per-channel inputs. State and arithmetic in float32 (float64 for float64
inputs); output in u's dtype.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._torch_chunk import LOG2E, chunk_backward, chunk_bounds, chunk_forward, cumsum_time_, sum_over_n
from ._validate import bc_groups, check_scan_inputs

__all__ = ["selective_scan_torch", "SelectiveScanTorchFn"]


def _transpose(x: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, X, Y)`` -> contiguous ``(B, Y, X)``, one 2-D copy per batch (torch's blocked transpose).

    ``into``: a free contiguous tensor of the same size whose memory is reused (fresh sequence-sized
    allocations cost page faults on CPU).
    """
    x = x.contiguous()
    shape = (x.shape[0], x.shape[2], x.shape[1])
    out = x.new_empty(shape) if into is None else into.view(shape)
    for b in range(x.shape[0]):
        out[b].copy_(x[b].t())
    return out


def _bc_layout(m: torch.Tensor, groups: int, cdt: torch.dtype) -> torch.Tensor:
    """B or C -> variable ``(B, L, G, N, 1)`` or fixed ``(G, N, Dg)``."""
    m = m.to(cdt)
    if m.dim() == 2:  # (D, N)
        dim, n = m.shape
        return m.view(groups, dim // groups, n).transpose(1, 2).contiguous()
    if m.dim() == 3:
        m = m[:, None]
    tm = m.permute(0, 3, 1, 2)  # (B, L, Gm, N)
    if groups != m.shape[1]:
        tm = tm.repeat_interleave(groups // m.shape[1], dim=2)
    return tm.unsqueeze(-1).contiguous()


def _state_layout(h: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, D, N)`` -> ``(B, G, N, Dg)``."""
    batch, dim, n = h.shape
    return h.view(batch, groups, dim // groups, n).transpose(2, 3).contiguous()


def _state_from_layout(h: torch.Tensor) -> torch.Tensor:
    """``(B, G, N, Dg)`` -> ``(B, D, N)``."""
    batch, _, n, _ = h.shape
    return h.transpose(2, 3).reshape(batch, -1, n)


def _centre_chunks(delta_t: torch.Tensor, bounds: list[tuple[int, int]]):
    """Chunk-local ``Δ_t − m`` ``(B, L, D)``, in place of ``delta_t``, and the centres ``m``
    (one ``(B, D)`` per chunk).

    Runs of equal-length chunks are done together through a ``(B, chunks, T, D)`` view.
    """
    dcen, mids, i = delta_t, [], 0
    while i < len(bounds):
        steps = bounds[i][1] - bounds[i][0]
        j = i
        while j < len(bounds) and bounds[j][1] - bounds[j][0] == steps:
            j += 1
        run = dcen[:, bounds[i][0] : bounds[j - 1][1]].unflatten(1, (j - i, steps))  # (B, c, T, D)
        cumsum_time_(run, dim=2)
        mid = run.amax(2, keepdim=True).add_(run.amin(2, keepdim=True)).mul_(0.5)
        run.sub_(mid)
        mids.extend(mid.unbind(1))
        i = j
    return dcen, [m[:, 0] for m in mids]


class _Scan:
    """One call's inputs in chunk layout: δ, u, δu, centred Δ (all ``(B, L, D)``), A, B, C, bounds.

    ``for_backward=False`` (the forward) overwrites u's copy with δu and δ with the centred Δ, to keep
    the number of sequence-sized allocations down; the backward keeps all of them.
    """

    def __init__(self, u, delta, A, B, C, delta_bias, softplus, max_chunk, for_backward):
        self.cdt = cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        batch, dim, length = u.shape
        n = A.shape[1]
        delta_t = _transpose(delta.to(cdt))
        if delta_bias is not None:
            delta_t.add_(delta_bias.to(cdt))
        if softplus:
            for s in range(0, length, 256):  # in place, in slices: small temporaries
                delta_t[:, s : s + 256] = F.softplus(delta_t[:, s : s + 256])
        groups = math.lcm(max(1, bc_groups(B)), max(1, bc_groups(C)))
        self.shape = (batch, groups, 1, dim // groups)
        self.A = A.to(cdt).view(groups, dim // groups, n).transpose(1, 2).contiguous()  # (G, N, Dg)
        self.A2n = -self.A * LOG2E
        self.B, self.C = _bc_layout(B, groups, cdt), _bc_layout(C, groups, cdt)
        self.bounds = chunk_bounds(delta_t, A.detach().abs().amax(1), max_chunk)
        self.u = _transpose(u.to(cdt))
        if for_backward:
            self.delta, self.du = delta_t, delta_t * self.u
            self.dcen, self.mids = _centre_chunks(delta_t.clone(), self.bounds)
        else:
            self.delta, self.du = None, self.u.mul_(delta_t)
            self.dcen, self.mids = _centre_chunks(delta_t, self.bounds)
        self.max_steps = max(e - s for s, e in self.bounds)
        self.state_numel = batch * dim * n

    def chunk(self, i: int):
        """``(δ, u, δu, Δ − m, m, B, C)`` of chunk ``i`` in chunk layout."""
        start, end = self.bounds[i]

        def per_channel(x):
            return x[:, start:end].view(self.shape[0], end - start, *self.shape[1:])

        bk = self.B if self.B.dim() == 3 else self.B[:, start:end]
        ck = self.C if self.C.dim() == 3 else self.C[:, start:end]
        mid = self.mids[i].view(self.shape)
        return (*(None if x is None else per_channel(x) for x in (self.delta, self.u, self.du, self.dcen)),
                mid, bk, ck)

    def buffers(self, count: int):
        """``count`` flat buffers; ``view(buf, T)`` gives a contiguous ``(B, T, G, N, Dg)``."""
        return [self.u.new_empty(self.state_numel * self.max_steps) for _ in range(count)]

    def view(self, buf: torch.Tensor, steps: int) -> torch.Tensor:
        batch, groups, _, dg = self.shape
        return buf[: self.state_numel * steps].view(batch, steps, groups, -1, dg)


def _no_autocast(device: torch.device):
    """Autocast off: it would run the state contraction (``sum_over_n``'s matmul) in bf16/fp16."""
    return torch.autocast(device_type=device.type, enabled=False)


class SelectiveScanTorchFn(torch.autograd.Function):
    """Chunked selective scan with a chunked (recomputing) backward; returns ``(out, last_state)``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, max_chunk):
        with _no_autocast(u.device):
            return SelectiveScanTorchFn._forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state,
                                                 delta_softplus, max_chunk)

    @staticmethod
    def _forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, max_chunk):
        sc = _Scan(u, delta, A, B, C, delta_bias, delta_softplus, max_chunk, False)
        cdt, groups = sc.cdt, sc.shape[1]
        batch, dim, _ = u.shape
        h0 = (sc.A.new_zeros((batch, *sc.A.shape)) if initial_state is None
              else _state_layout(initial_state.to(cdt), groups))
        save = any(ctx.needs_input_grad)
        starts = []
        y = torch.empty_like(sc.du)
        work = sc.buffers(2)
        for i, (start, end) in enumerate(sc.bounds):
            _, _, du, dcen, mid, bk, ck = sc.chunk(i)
            h, _ = chunk_forward(h0, dcen, mid, du, bk, sc.A2n, [sc.view(w, end - start) for w in work])
            y[:, start:end] = sum_over_n(h, ck).view(batch, end - start, dim)
            if save:
                starts.append(h0)
            h0 = h[:, -1].clone()
        y_t, y = y, _transpose(y, into=sc.dcen)  # Δ is free now
        if D is not None:
            y.addcmul_(D.to(cdt)[None, :, None], u.to(cdt))
        if z is not None:  # silu(z) = z sigmoid(z), computed in y_t's memory
            y.mul_(torch.sigmoid(z.to(cdt), out=y_t.view(y.shape)).mul_(z))
        del y_t
        out = y
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.starts, ctx.softplus, ctx.max_chunk = starts, delta_softplus, max_chunk
        ctx.set_materialize_grads(False)
        return out.to(u.dtype), _state_from_layout(h0).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        with _no_autocast(ctx.saved_tensors[0].device):
            return SelectiveScanTorchFn._backward(ctx, dout, dlast)

    @staticmethod
    def _backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
        sc = _Scan(u, delta, A, B, C, delta_bias, ctx.softplus, ctx.max_chunk, True)
        cdt, groups = sc.cdt, sc.shape[1]
        batch, dim, _ = u.shape
        dout = u.new_zeros(u.shape, dtype=cdt) if dout is None else dout.to(cdt)
        sig = None
        if z is not None:  # dy = dout ⊙ silu(z) = dout ⊙ z ⊙ σ(z)
            sig = torch.sigmoid(z.to(cdt))
            dy = torch.mul(sig, z.to(cdt)).mul_(dout)
        else:
            dy = dout
        dy_t = _transpose(dy)
        full = {name: torch.empty_like(sc.u) for name in ("y", "u", "delta")}
        for name, lay in (("B", sc.B), ("C", sc.C)):
            full[name] = torch.zeros_like(lay) if lay.dim() == 3 else torch.empty_like(lay)
        grads = {"A": torch.zeros_like(sc.A), "B": full["B"], "C": full["C"]}
        kappa = torch.zeros_like(ctx.starts[0]) if dlast is None else _state_layout(dlast.to(cdt), groups)
        work = sc.buffers(3)
        for i in range(len(sc.bounds) - 1, -1, -1):
            start, end = sc.bounds[i]
            dk, uk, du, dcen, mid, bk, ck = sc.chunk(i)
            w = [sc.view(b, end - start) for b in work]
            h, g = chunk_forward(ctx.starts[i], dcen, mid, du, bk, sc.A2n, w[:2])
            part = {name: torch.empty_like(dk) for name in ("y", "u", "delta")}
            grads.update(part)
            dyk = dy_t[:, start:end].view(dk.shape)
            kappa = chunk_backward(h, g, w[2], kappa, dyk, mid, dk, uk, du, bk, ck, sc.A, sc.A2n, grads)
            for name in ("y", "u", "delta"):
                full[name][:, start:end] = part[name].view(batch, end - start, dim)
            for name in ("B", "C"):
                if full[name].dim() == 5:
                    full[name][:, start:end] = grads[name]
        for name in ("B", "C"):
            if full[name].dim() == 3:  # fixed: accumulated over chunks
                full[name] = grads[name]
        del work, dy_t
        return _input_grads(ctx, sc, full, grads["A"], kappa, dout, dy, sig)


def _input_grads(ctx, sc, full, dA, kappa, dout, dy, sig):
    """Assemble the gradients of ``(u, delta, A, B, C, D, z, delta_bias, initial_state)`` from the
    chunk-layout accumulators: adds the ``D``, gate and softplus terms, transposes back to ``(B, D, L)``
    reusing the memory of the (now free) time-major inputs."""
    u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
    cdt, dim = sc.cdt, u.shape[1]
    uc = u.to(cdt)
    if ctx.softplus:  # softplus'(x) = σ(x) = 1 − e^{−softplus(x)}; 1 above torch's threshold 20
        big = sc.delta > 20
        dsp = sc.delta.neg_().expm1_().neg_().masked_fill_(big, 1.0)
        full["delta"].mul_(dsp)
    ddelta = _transpose(full["delta"], into=sc.delta)
    du = _transpose(full["u"], into=sc.u)
    dz = None
    if D is not None:
        du.addcmul_(D.to(cdt)[None, :, None], dy)
    if z is not None:  # dz = dout ⊙ y ⊙ σ(z) (1 + z (1 − σ(z)))
        y = _transpose(full["y"], into=sc.du)
        if D is not None:
            y.addcmul_(D.to(cdt)[None, :, None], uc)
        y.mul_(dout).mul_(sig)
        dz = y.mul_(sig.neg_().add_(1).mul_(z).add_(1)).to(z.dtype)

    def bc_grad(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() == 2:  # (G, N, Dg) -> (D, N)
            return g.transpose(1, 2).reshape(dim, -1).to(like.dtype)
        own = max(1, bc_groups(like))  # (B, L, G, N, 1) -> (B, Gm, N, L), summing repeated groups
        batch, length, groups, n, _ = g.shape
        g = g.view(batch, length, own, groups // own, n).sum(3).permute(0, 2, 3, 1)
        return g.reshape(like.shape).to(like.dtype)

    return (
        du.to(u.dtype), ddelta.to(delta.dtype), dA.transpose(1, 2).reshape(dim, -1).to(A.dtype),
        bc_grad(full["B"], B), bc_grad(full["C"], C),
        None if D is None else torch.einsum("bdl,bdl->d", dy, uc).to(D.dtype), dz,
        None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype),
        None if initial_state is None else _state_from_layout(kappa).to(initial_state.dtype),
        None, None,
    )


def selective_scan_torch(
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
    max_chunk: int = 64,
):
    """Selective scan by the chunked torch path (any device); same contract as ``selective_scan``.

    ``max_chunk`` is the longest chunk of time steps (memory ~ a few ``B · max_chunk · D · N`` floats);
    chunks are cut shorter where ``|A| · Σδ`` over the chunk would overflow the closed form.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if isinstance(max_chunk, bool) or not isinstance(max_chunk, numbers.Integral) or max_chunk < 1:
        raise ValueError(f"max_chunk must be a positive integer (time steps per chunk), got {max_chunk!r}")
    out, last = SelectiveScanTorchFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                           bool(delta_softplus), int(max_chunk))
    return (out, last) if return_last_state else out
