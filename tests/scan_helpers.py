"""Shared inputs and helpers of the selective-scan tests."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["F64", "NAMES", "LargestTensor", "make_inputs", "run_with_grads"]

F64 = torch.float64
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch=2, dim=6, length=37, n=5, b_layout="var", c_layout="var", dtype=F64, seed=0,
                a_scale=2.0, delta_scale=0.5, device="cpu"):
    """Random scan inputs; layouts: "fixed" (D, N), "var" (B, N, L) or an int G for (B, G, N, L)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype=dtype, device=device)

    def bc(layout):
        if layout == "fixed":
            return rnd(dim, n)
        if layout == "var":
            return rnd(batch, n, length)
        return rnd(batch, layout, n, length)

    return {
        "u": rnd(batch, dim, length), "delta": rnd(batch, dim, length, scale=delta_scale),
        "A": (-torch.rand(dim, n, generator=gen, dtype=F64) * a_scale).to(dtype=dtype, device=device),
        "B": bc(b_layout), "C": bc(c_layout), "D": rnd(dim), "z": rnd(batch, dim, length),
        "delta_bias": rnd(dim, scale=0.3), "initial_state": rnd(batch, dim, n),
    }


def run_with_grads(fn, inputs, softplus=True, **kwargs):
    """Output, last state and the gradients of a fixed random loss w.r.t. every given tensor."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves.get("D"),
                   leaves.get("z"), leaves.get("delta_bias"), softplus, True,
                   initial_state=leaves.get("initial_state"), **kwargs)
    gen = torch.Generator().manual_seed(123)
    w_out = torch.randn(out.shape, generator=gen, dtype=F64).to(dtype=out.dtype, device=out.device)
    w_last = torch.randn(last.shape, generator=gen, dtype=F64).to(dtype=last.dtype, device=last.device)
    loss = (out.to(F64) * w_out.to(F64)).sum() + (last.to(F64) * w_last.to(F64)).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return out, last, dict(zip(names, grads))



class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


