"""Selective scan Triton kernels (forward + backward) against the reference.

On a machine without CUDA these run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py before Triton is imported) on CPU tensors; shapes are small and odd
(B=2, D=5, L=37, N=4) and the chunk length is 16, so every run crosses chunk boundaries and ends on a
partial chunk.
"""

from __future__ import annotations

import functools

import pytest
import scan_helpers
import torch
import torch.nn.functional as F
from scan_helpers import F64, NAMES, run_with_grads

from medadapt.kernels import selective_scan, selective_scan_reference
from medadapt.kernels._dispatch import interpret_mode, triton_available
from medadapt.kernels.selective_scan import selective_scan_triton

pytestmark = pytest.mark.skipif(
    not triton_available() or not (torch.cuda.is_available() or interpret_mode()),
    reason="needs Triton and CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(b_layout="var", c_layout="var", dtype=F64, batch=2, dim=5, length=37, n=4, seed=0):
    """Random inputs on DEVICE; layouts: "fixed" (D, N), "var" (B, N, L) or an int G for (B, G, N, L)."""
    return scan_helpers.make_inputs(batch, dim, length, n, b_layout, c_layout, dtype, seed, device=DEVICE)


def assert_matches_reference(x, rtol, atol, softplus=True, block_t=16, **kwargs):
    """Chunks of 16 steps (also on CUDA, where the default chunk would hold the whole test sequence)."""
    ref = run_with_grads(selective_scan_reference, x, softplus=softplus)
    got = run_with_grads(selective_scan_triton, x, softplus=softplus, block_t=block_t, **kwargs)
    assert got[0].dtype == x["u"].dtype and got[1].dtype == (F64 if x["u"].dtype == F64 else torch.float32)
    torch.testing.assert_close(got[0], ref[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(got[1], ref[1], rtol=rtol, atol=atol)
    assert set(got[2]) == set(ref[2])
    for name, grad in ref[2].items():
        assert got[2][name].dtype == grad.dtype, name
        torch.testing.assert_close(got[2][name], grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("b_layout,c_layout", [("var", "var"), ("fixed", "fixed"), (5, "fixed"), ("var", 5)])
def test_triton_matches_reference_float64_all_gradients(b_layout, c_layout):
    """Outputs, last state and the gradients of all 9 tensor arguments (incl. through the last state)."""
    assert_matches_reference(make_inputs(b_layout, c_layout), rtol=1e-10, atol=1e-10)


def test_triton_without_optional_arguments():
    x = make_inputs("var", "fixed", seed=1)
    x.update(D=None, z=None, delta_bias=None, initial_state=None)
    assert_matches_reference(x, rtol=1e-10, atol=1e-10, softplus=False)


def test_triton_one_channel_per_program_sums_group_gradients_in_block():
    """block_d=1 takes the path that sums the B/C gradients over the block before the atomic add."""
    x = make_inputs(1, 1, batch=1, dim=3, length=21, n=3)
    assert_matches_reference(x, rtol=1e-10, atol=1e-10, block_d=1)


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 6e-4, 2e-3), (torch.bfloat16, 3e-2, 5e-2)])
def test_triton_low_precision(dtype, rtol, atol):
    assert_matches_reference(make_inputs(5, "var", dtype=dtype), rtol=rtol, atol=atol)


def test_triton_split_and_causal():
    x = make_inputs("var", "var")
    args = (x["A"],)
    full, last = selective_scan_triton(x["u"], x["delta"], *args, x["B"], x["C"], x["D"], x["z"],
                                       x["delta_bias"], True, True, block_t=16)
    s = 20
    head = selective_scan_triton(x["u"][..., :s], x["delta"][..., :s], *args, x["B"][..., :s],
                                 x["C"][..., :s], x["D"], x["z"][..., :s], x["delta_bias"], True, True,
                                 block_t=16)
    tail = selective_scan_triton(x["u"][..., s:], x["delta"][..., s:], *args, x["B"][..., s:],
                                 x["C"][..., s:], x["D"], x["z"][..., s:], x["delta_bias"], True, True,
                                 initial_state=head[1], block_t=16)
    torch.testing.assert_close(torch.cat([head[0], tail[0]], -1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tail[1], last, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head[0], full[..., :s], rtol=0, atol=0)  # causal: the future is unseen


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_triton_non_contiguous_d_and_delta_bias(layout):
    """The kernels index D and delta_bias as ptr + channel: views with stride 3 or 0 are copied first.
    Gradients are compared on the tensors the views were taken from."""
    x = make_inputs("var", "var", batch=2, dim=5, length=21, n=3, seed=3)
    bases = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    if layout == "strided":
        for k in ("D", "delta_bias"):
            bases[k] = torch.stack([x[k]] * 3, -1).requires_grad_(True)  # (D, 3): column 1 has stride 3
        views = {k: bases[k][:, 1] for k in ("D", "delta_bias")}
    else:
        for k in ("D", "delta_bias"):
            bases[k] = x[k][:1].clone().requires_grad_(True)
        views = {k: bases[k].expand(5) for k in ("D", "delta_bias")}
    results = []
    for fn in (selective_scan_reference, functools.partial(selective_scan_triton, block_t=16)):
        args = {**bases, **views}
        out, last = fn(*(args[k] for k in NAMES[:8]), True, True, initial_state=args["initial_state"])
        gen = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=gen, dtype=F64).to(out.device)).sum() + last.pow(2).sum()
        results.append((out, last, *torch.autograd.grad(loss, [bases[k] for k in NAMES])))
    for name, want, got in zip(("out", "last", *NAMES), *results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


def test_dispatch_runs_triton_when_forced(monkeypatch):
    monkeypatch.setenv("MEDADAPT_KERNELS", "triton")
    x = make_inputs("var", "var", dtype=torch.float32, batch=1, dim=3, length=9, n=2)
    out = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], delta_softplus=True)
    ref = selective_scan_reference(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], delta_softplus=True)
    torch.testing.assert_close(out, ref, rtol=6e-4, atol=2e-3)


def test_triton_gradient_through_last_state_only():
    x = make_inputs("var", "fixed", batch=1, dim=3, length=21, n=3, seed=2)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    names = ("u", "delta", "A", "B", "delta_bias", "initial_state")
    results = []
    for fn in (selective_scan_reference, functools.partial(selective_scan_triton, block_t=16)):
        _, last = fn(*(leaves[k] for k in NAMES[:8]), True, True, initial_state=leaves["initial_state"])
        results.append(torch.autograd.grad(last.pow(2).sum(), [leaves[k] for k in names]))
    for name, want, got in zip(names, *results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


# ----------------------------------------------------------------------------- METHODS.md §4 facts on Triton


@pytest.mark.parametrize("b_layout,c_layout", [("var", "var"), ("fixed", 2)])
def test_triton_zero_step_gives_skip_only_and_the_state_never_moves(b_layout, c_layout):
    """δ = 0 (no bias, no softplus): y = D·u exactly, and the last state is the initial state (zeros
    without one), whatever A, B, C hold."""
    x = make_inputs(b_layout, c_layout, dim=6, length=21)
    zero = torch.zeros_like(x["delta"])
    out, last = selective_scan_triton(x["u"], zero, x["A"], x["B"], x["C"], x["D"], None, None, False, True,
                                      block_t=16)
    torch.testing.assert_close(out, x["D"][:, None] * x["u"], rtol=0, atol=0)
    assert not last.any()
    out, last = selective_scan_triton(x["u"], zero, x["A"], x["B"], x["C"], x["D"], x["z"], None, False, True,
                                      initial_state=x["initial_state"], block_t=16)
    torch.testing.assert_close(last, x["initial_state"], rtol=0, atol=0)
    held = (x["initial_state"][..., None] * _per_channel(x["C"], 6)).sum(2)  # <x_0, C_t>: (B, D, L)
    torch.testing.assert_close(out, (held + x["D"][:, None] * x["u"]) * F.silu(x["z"]), rtol=1e-12, atol=1e-12)


def _per_channel(m, dim):
    """B or C as ``(B, D, N, L)`` for a ``(B, G, N, L)`` grouped layout (channel d uses group d // (D/G)),
    or ``(1, D, N, 1)`` for a fixed ``(D, N)``."""
    if m.dim() == 2:
        return m[None, :, :, None]
    if m.dim() == 3:
        m = m[:, None]
    return m.repeat_interleave(dim // m.shape[1], dim=1)


@pytest.mark.parametrize("b_layout,c_layout", [("var", 2), (3, "fixed"), (2, 3)])
def test_triton_length_one_closed_form(b_layout, c_layout):
    """L = 1: out = (δ u Σ_n B_n C_n + D u) ⊙ silu(z), δ = softplus(delta + delta_bias)."""
    x = make_inputs(b_layout, c_layout, dim=6, length=1)
    out = selective_scan_triton(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                True)
    delta = F.softplus(x["delta"] + x["delta_bias"][:, None])[..., 0]
    b, c = _per_channel(x["B"], 6)[..., 0], _per_channel(x["C"], 6)[..., 0]  # (B or 1, D, N)
    u = x["u"][..., 0]
    expected = (delta * u * (b * c).sum(-1) + x["D"] * u) * F.silu(x["z"][..., 0])
    torch.testing.assert_close(out[..., 0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b_layout,c_layout,block_d", [
    (2, 2, None), (3, 3, None), (2, 3, None), (3, "var", None), ("fixed", 2, None),
    (3, 3, 2), (2, 2, 1),  # blocks inside one group: the B/C gradients summed before the atomic add
    (2, 2, 2), (3, 3, 4),  # blocks straddling groups
])
def test_triton_grouped_bc_several_channels_per_group_float64(b_layout, c_layout, block_d):
    """D = 6 channels in G = 2 or 3 groups (3 or 2 channels per group): output, last state and all
    gradients (the grouped B/C gradients sum over their group's channels) equal the reference."""
    x = make_inputs(b_layout, c_layout, dim=6, length=21, n=3)
    assert_matches_reference(x, rtol=1e-10, atol=1e-10, block_d=block_d)
