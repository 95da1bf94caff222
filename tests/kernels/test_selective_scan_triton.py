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
