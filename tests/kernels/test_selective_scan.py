"""Selective scan: METHODS.md §4 facts on the reference, the chunked torch path against the reference
(float64 outputs and all gradients), input validation and backend dispatch."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from scan_helpers import F64, NAMES, LargestTensor, make_inputs, run_with_grads

from medadapt.kernels import selective_scan, selective_scan_reference
from medadapt.kernels.selective_scan import cpu_kernel_available, selective_scan_cpu, selective_scan_torch


# the C kernel (variable B/C only) where it builds; METHODS.md §4 facts hold for it exactly as for the others
def cpu_kernel(*more):
    return pytest.param(selective_scan_cpu, *more, marks=pytest.mark.skipif(not cpu_kernel_available(),
                                                                            reason="no C compiler"))

# ----------------------------------------------------------------------------- reference facts


def test_length_one_closed_form():
    x = make_inputs(length=1, b_layout="var", c_layout=2)
    out = selective_scan_reference(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                   x["delta_bias"], delta_softplus=True)
    delta = F.softplus(x["delta"] + x["delta_bias"][:, None])
    c = x["C"].repeat_interleave(3, dim=1)[..., 0]  # (B, D, N): groups of 3 channels
    bc = (x["B"][:, None, :, 0] * c).sum(-1)  # Σ_n B_n C_n
    expected = (delta[..., 0] * x["u"][..., 0] * bc + x["D"] * x["u"][..., 0]) * F.silu(x["z"][..., 0])
    torch.testing.assert_close(out[..., 0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [selective_scan_reference, selective_scan_torch, cpu_kernel()])
def test_zero_step_gives_skip_only(fn):
    x = make_inputs()
    out = fn(x["u"], torch.zeros_like(x["delta"]), x["A"], x["B"], x["C"], x["D"])
    torch.testing.assert_close(out, x["D"][:, None] * x["u"], rtol=0, atol=0)


@pytest.mark.parametrize("fn,c_layout", [(selective_scan_reference, "fixed"), (selective_scan_torch, "fixed"),
                                         (selective_scan_reference, 2), cpu_kernel(2)])
def test_split_and_carry_state_equals_full_run(fn, c_layout):
    x = make_inputs(length=41, b_layout=3, c_layout=c_layout)
    full, last = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, True)
    s = 17
    part = {k: (v[..., :s], v[..., s:]) for k, v in x.items() if k in ("u", "delta", "z", "B", "C")}
    c_parts = part["C"] if c_layout != "fixed" else (x["C"], x["C"])
    first, mid = fn(part["u"][0], part["delta"][0], x["A"], part["B"][0], c_parts[0], x["D"], part["z"][0],
                    x["delta_bias"], True, True)
    second, last2 = fn(part["u"][1], part["delta"][1], x["A"], part["B"][1], c_parts[1], x["D"], part["z"][1],
                       x["delta_bias"], True, True, initial_state=mid)
    torch.testing.assert_close(torch.cat([first, second], -1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last2, last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn,tol", [(selective_scan_reference, 0.0), (selective_scan_torch, 1e-13),
                                    cpu_kernel(0.0)])
def test_causal(fn, tol):
    """Perturbing step t0 leaves steps t < t0 unchanged (the torch path: up to rounding, because each
    chunk's exponents are centred on that chunk's own steps)."""
    x = make_inputs(length=30)
    args = (x["A"], x["B"], x["C"], x["D"])
    base = fn(x["u"], x["delta"], *args, z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    u2, d2, z2, b2 = x["u"].clone(), x["delta"].clone(), x["z"].clone(), x["B"].clone()
    t0 = 13
    u2[..., t0] += 1.0
    d2[..., t0] -= 0.7
    z2[..., t0] += 2.0
    b2[..., t0] *= -3.0
    moved = fn(u2, d2, x["A"], b2, x["C"], x["D"], z=z2, delta_bias=x["delta_bias"], delta_softplus=True)
    torch.testing.assert_close(moved[..., :t0], base[..., :t0], rtol=0, atol=tol)
    assert (moved[..., t0:] - base[..., t0:]).abs().amax() > 1e-3


@pytest.mark.parametrize("fn,b_layout", [(selective_scan_reference, "fixed"), (selective_scan_torch, "fixed"),
                                         cpu_kernel(3)])
def test_delta_bias_softplus_equals_precomputed_delta(fn, b_layout):
    x = make_inputs(b_layout=b_layout, c_layout=2)
    args = (x["A"], x["B"], x["C"], x["D"], x["z"])
    with_bias = fn(x["u"], x["delta"], *args, delta_bias=x["delta_bias"], delta_softplus=True)
    pre = F.softplus(x["delta"] + x["delta_bias"][:, None])
    torch.testing.assert_close(with_bias, fn(x["u"], pre, *args), rtol=1e-13, atol=1e-13)


def test_reference_dtypes():
    x = make_inputs(dtype=torch.bfloat16)
    out, last = selective_scan_reference(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32 and last.shape == (2, 6, 5)


# ----------------------------------------------------------------------------- torch path vs reference

LAYOUTS = [("var", "var"), ("fixed", "fixed"), (3, 3), ("fixed", 2), (2, 3), ("var", 6)]


@pytest.mark.parametrize("b_layout,c_layout", LAYOUTS)
@pytest.mark.parametrize("max_chunk", [8, 64])
def test_torch_path_matches_reference_float64(b_layout, c_layout, max_chunk):
    x = make_inputs(b_layout=b_layout, c_layout=c_layout)
    ref_out, ref_last, ref_grads = run_with_grads(selective_scan_reference, x)
    out, last, grads = run_with_grads(selective_scan_torch, x, max_chunk=max_chunk)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)
    assert set(grads) == set(NAMES)
    for name in NAMES:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("optional", [(), ("D",), ("z",), ("delta_bias",), ("initial_state",)])
@pytest.mark.parametrize("softplus", [False, True])
def test_torch_path_optional_arguments(optional, softplus):
    x = make_inputs(batch=1, dim=4, length=19, n=3, b_layout="var", c_layout="fixed", seed=1)
    x = {k: (v if k in ("u", "delta", "A", "B", "C") or k in optional else None) for k, v in x.items()}
    ref = run_with_grads(selective_scan_reference, x, softplus=softplus)
    got = run_with_grads(selective_scan_torch, x, softplus=softplus, max_chunk=8)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("fn", [selective_scan_torch, selective_scan_reference])
def test_gradient_through_last_state_only(fn):
    """The loss uses only the last state (out unused): gradients still reach every input."""
    x = make_inputs(b_layout="var", c_layout="fixed")
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    _, last = fn(*(leaves[k] for k in NAMES[:8]), True, True, initial_state=leaves["initial_state"])
    grads = torch.autograd.grad(last.pow(2).sum(), [leaves[k] for k in NAMES], allow_unused=True)
    ref = selective_scan_reference(*(x[k] for k in NAMES[:8]), True, True, initial_state=x["initial_state"])
    torch.testing.assert_close(last, ref[1], rtol=1e-10, atol=1e-10)
    for name, g in zip(NAMES, grads):
        if name in ("C", "D", "z"):  # the last state does not depend on them
            assert g is None or g.abs().max() == 0, name
        else:
            assert g is not None and g.abs().max() > 0, name
    if fn is selective_scan_torch:
        expected = torch.autograd.grad(
            selective_scan_reference(*(leaves[k] for k in NAMES[:8]), True, True,
                                     initial_state=leaves["initial_state"])[1].pow(2).sum(),
            [leaves[k] for k in ("u", "delta", "A", "B", "delta_bias", "initial_state")])
        for name, g in zip(("u", "delta", "A", "B", "delta_bias", "initial_state"), expected):
            torch.testing.assert_close(grads[NAMES.index(name)], g, rtol=1e-9, atol=1e-9, msg=name)


def test_torch_path_large_decays_stay_finite_and_exact():
    """|A|·δ far beyond what one closed-form chunk can hold: chunks are cut shorter, single huge steps
    (δ|A| ~ 1e3, the state fully reset) still work."""
    x = make_inputs(batch=1, dim=4, length=40, n=3, dtype=torch.float32, a_scale=30.0, delta_scale=3.0)
    delta = x["delta"].clone()
    delta[..., 20] = 60.0
    args = (x["u"], delta, x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, True)
    out, last = selective_scan_torch(*args, max_chunk=64)
    ref_out, ref_last = selective_scan_reference(*(a.double() if torch.is_tensor(a) else a for a in args))
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    torch.testing.assert_close(out.double(), ref_out, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last.double(), ref_last, rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 6e-4, 2e-3), (torch.bfloat16, 3e-2, 5e-2)])
def test_torch_path_low_precision(dtype, rtol, atol):
    x = make_inputs(b_layout=2, c_layout="var", dtype=dtype)
    ref = run_with_grads(selective_scan_reference, x)
    got = run_with_grads(selective_scan_torch, x)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=rtol, atol=atol)
    for name in NAMES:
        assert got[2][name].dtype == dtype
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=rtol, atol=atol, msg=name)


def test_torch_path_stays_float32_under_autocast():
    """CPU autocast (bf16) must not reach the state arithmetic (``sum_over_n``'s matmul would run in bf16,
    relative error ~5e-3): forward and backward inside autocast match float64 to float32 accuracy."""
    x = make_inputs(batch=2, dim=5, length=37, n=4, b_layout=5, dtype=torch.float32)
    ref = run_with_grads(selective_scan_reference, {k: v.to(F64) for k, v in x.items()})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_with_grads(selective_scan_torch, x, max_chunk=16)
    assert got[0].dtype == torch.float32
    for name, g, r in [("out", got[0], ref[0]), ("last", got[1], ref[1]), *((k, got[2][k], ref[2][k]) for k in NAMES)]:
        torch.testing.assert_close(g.to(F64), r, rtol=1e-5, atol=1e-5 * float(r.detach().abs().max()), msg=name)


def test_torch_path_never_materialises_the_state_sequence():
    """No tensor of B·D·L·N elements, forward or backward: only chunk-sized state buffers."""
    x = make_inputs(batch=1, dim=8, length=512, n=4, dtype=torch.float32)
    leaves = {k: v.requires_grad_(True) for k, v in x.items()}
    with LargestTensor() as mode:
        out = selective_scan_torch(*(leaves[k] for k in NAMES[:8]), True, max_chunk=16)
        out.sum().backward()
    assert mode.largest <= 8 * 512  # (B, L, D) copies at most; the full state sequence would be 16384


# ----------------------------------------------------------------------------- validation, dispatch


@pytest.mark.parametrize("change,name", [
    (lambda x: x.update(delta=x["delta"][..., :-1]), "delta"),
    (lambda x: x.update(A=x["A"][:-1]), "A"),
    (lambda x: x.update(B=x["B"][..., :-1]), "B"),
    (lambda x: x.update(C=x["C"][:, :, :-1]), "C"),
    (lambda x: x.update(D=x["D"][:-1]), "D"),
    (lambda x: x.update(z=x["z"][:1]), "z"),
    (lambda x: x.update(delta_bias=x["delta_bias"][None]), "delta_bias"),
    (lambda x: x.update(initial_state=x["initial_state"][..., :-1]), "initial_state"),
    (lambda x: x.update(B=torch.randn(2, 4, 5, 37, dtype=F64)), "divisible"),
    (lambda x: x.update(A=torch.randn(6, 257, dtype=F64)), "N must be between"),
    (lambda x: x.update(u=x["u"].long()), "u"),
    (lambda x: x.update(delta=x["delta"].int()), "delta"),
    (lambda x: x.update(C=x["C"].to(torch.int16)), "C"),
    (lambda x: x.update(u=x["u"][0]), "u"),
    *((lambda x, k=k: x.update({k: None}), k) for k in ("u", "delta", "A", "B", "C")),  # required, not optional
])
@pytest.mark.parametrize("fn", [selective_scan, selective_scan_reference, selective_scan_torch, selective_scan_cpu])
def test_bad_inputs_raise_value_error_naming_argument(change, name, fn):
    x = make_inputs()
    change(x)
    with pytest.raises(ValueError, match=name):
        fn(*(x[k] for k in NAMES[:8]), initial_state=x["initial_state"])


@pytest.mark.parametrize("max_chunk", [0, -4, 2.5, True])
def test_torch_path_rejects_bad_max_chunk(max_chunk):
    x = make_inputs(batch=1, dim=3, length=5, n=2)
    with pytest.raises(ValueError, match="max_chunk"):
        selective_scan_torch(*(x[k] for k in NAMES[:5]), max_chunk=max_chunk)


def test_dispatch_honours_medadapt_kernels(monkeypatch):
    pkg = importlib.import_module("medadapt.kernels.selective_scan")
    calls = []
    for name in ("torch", "triton", "cpu"):
        monkeypatch.setattr(pkg, f"selective_scan_{name}", lambda *a, _n=name, **k: calls.append(_n))
    x = make_inputs(batch=1, dim=2, length=3, n=2)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    fixed_b = [x["u"], x["delta"], x["A"], x["A"].clone(), x["C"]]
    monkeypatch.delenv("MEDADAPT_KERNELS", raising=False)
    selective_scan(*args)  # CPU tensors, auto -> the C kernel where it builds, else torch
    selective_scan(*fixed_b)  # fixed B: the C kernel does not take it -> torch
    monkeypatch.setenv("MEDADAPT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    selective_scan(*args)
    monkeypatch.setenv("MEDADAPT_KERNELS", "torch")
    selective_scan(*args)
    monkeypatch.setenv("MEDADAPT_KERNELS", "cpu")
    selective_scan(*args)
    auto = "cpu" if pkg.cpu_kernel_available() else "torch"
    assert calls == [auto, "torch", "triton", "torch", "cpu"]
    monkeypatch.setenv("MEDADAPT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        selective_scan(*args)
