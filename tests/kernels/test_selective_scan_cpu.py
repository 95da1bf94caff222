"""The compiled CPU selective scan (``csrc/scan_cpu.c``) against the sequential reference: float64
outputs and all 8 gradients at odd sizes (partial tiles, several chunks, groups), float32/bf16
tolerances, threads, bounded memory, errors, and the build's fallback when there is no compiler."""

from __future__ import annotations

import shlex
import shutil

import pytest
import torch
from scan_helpers import F64, NAMES, LargestTensor, make_inputs, run_with_grads

from medadapt.kernels import _cbuild, selective_scan
from medadapt.kernels.selective_scan import (
    cpu_kernel_available,
    selective_scan_cpu,
    selective_scan_reference,
)

pytestmark = pytest.mark.skipif(not cpu_kernel_available(),
                                reason=f"no CPU kernel: {_cbuild.build_error('scan_cpu')}")


def assert_close_to_reference(x, rtol, atol, softplus=True):
    ref = run_with_grads(selective_scan_reference, {k: v.to(F64) for k, v in x.items()}, softplus)
    got = run_with_grads(selective_scan_cpu, x, softplus)
    for name, r, g in [("out", ref[0], got[0]), ("last", ref[1], got[1]),
                       *((f"d{k}", ref[2][k], got[2][k]) for k in ref[2])]:
        scale = r.detach().abs().max().clamp_min(1.0)
        assert g.shape == r.shape, name
        err = (g.to(F64) - r).abs().max() / scale
        assert err <= rtol, f"{name}: max error {err:.3g} (relative to max |ref| {scale:.3g})"
        torch.testing.assert_close(g.to(F64), r, rtol=rtol, atol=atol * float(scale), msg=name)


@pytest.mark.parametrize("b_layout,c_layout", [("var", "var"), (3, "var"), ("var", 2), (3, 2), (6, 6)])
@pytest.mark.parametrize("dim,length", [(6, 37), (54, 130)])  # one partial tile; 3 full + 1 partial, 3 chunks
def test_cpu_kernel_matches_reference_float64_all_gradients(b_layout, c_layout, dim, length):
    x = make_inputs(batch=2, dim=dim, length=length, n=5, b_layout=b_layout, c_layout=c_layout)
    assert_close_to_reference(x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch,dim,length,n", [(1, 1, 1, 1), (1, 17, 64, 256), (3, 16, 65, 2), (1, 33, 129, 7)])
def test_cpu_kernel_edge_sizes(batch, dim, length, n):
    """One step / one channel / one state; N at its maximum; exactly one chunk; one step past a chunk."""
    x = make_inputs(batch=batch, dim=dim, length=length, n=n)
    assert_close_to_reference(x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("optional", [(), ("D",), ("z",), ("delta_bias",), ("initial_state",)])
@pytest.mark.parametrize("softplus", [False, True])
def test_cpu_kernel_optional_arguments(optional, softplus):
    x = make_inputs(batch=2, dim=5, length=70, n=4)
    kept = {k: v for k, v in x.items() if k in ("u", "delta", "A", "B", "C") or k in optional}
    if not softplus:
        kept["delta"] = kept["delta"].abs()  # positive steps without softplus, as a user would pass
    assert_close_to_reference(kept, rtol=1e-12, atol=1e-12, softplus=softplus)


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 2e-5, 2e-5), (torch.bfloat16, 3e-2, 5e-2)])
def test_cpu_kernel_low_precision(dtype, rtol, atol):
    x = make_inputs(batch=2, dim=21, length=150, n=16, b_layout=3, c_layout="var", dtype=dtype)
    assert_close_to_reference(x, rtol=rtol, atol=atol)


def test_cpu_kernel_same_result_with_one_and_two_threads():
    x = make_inputs(batch=2, dim=40, length=100, n=4, b_layout="var", c_layout=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(selective_scan_cpu, x)
        torch.set_num_threads(2)  # two calls with private dB/dC accumulators, summed afterwards
        two = run_with_grads(selective_scan_cpu, x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one[0], two[0], rtol=0, atol=0)
    for k in one[2]:
        torch.testing.assert_close(one[2][k], two[2][k], rtol=1e-13, atol=1e-13, msg=k)


def test_cpu_kernel_gradient_through_last_state_only():
    x = make_inputs(batch=1, dim=7, length=66, n=3)
    for fn in (selective_scan_reference, selective_scan_cpu):
        leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        _, last = fn(*(leaves[k] for k in NAMES[:8]), True, True, initial_state=leaves["initial_state"])
        grads = torch.autograd.grad(last.sum(), [leaves[k] for k in NAMES], allow_unused=True)
        if fn is selective_scan_reference:
            ref = grads
    for k, r, g in zip(NAMES, ref, grads):
        r = torch.zeros_like(x[k]) if r is None else r
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=k)


def test_cpu_kernel_large_decays_underflow_to_exact_zero_float32():
    x = make_inputs(batch=1, dim=3, length=20, n=4, dtype=torch.float32, a_scale=2000.0, delta_scale=3.0)
    out, last = selective_scan_cpu(*(x[k] for k in NAMES[:8]), True, True)
    ref_out, ref_last = selective_scan_reference(*(x[k] for k in NAMES[:8]), True, True)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=1e-5, atol=1e-6)


def test_cpu_kernel_never_materialises_the_state_sequence():
    batch, dim, length, n = 1, 32, 512, 16  # the state sequence would be 262144 numbers
    x = make_inputs(batch=batch, dim=dim, length=length, n=n, dtype=torch.float32)
    leaves = {k: v.requires_grad_(True) for k, v in x.items()}
    with LargestTensor() as mode:
        out = selective_scan_cpu(*(leaves[k] for k in NAMES[:8]), True, initial_state=leaves["initial_state"])
        out.sum().backward()
    assert mode.largest <= 2 * batch * dim * length  # input-sized (B, D, L) tensors at most


def test_cpu_kernel_rejects_fixed_b_and_c_naming_them():
    x = make_inputs(b_layout="fixed")
    with pytest.raises(ValueError, match="B: selective_scan_cpu needs a variable B"):
        selective_scan_cpu(*(x[k] for k in NAMES[:5]))
    x = make_inputs(c_layout="fixed")
    with pytest.raises(ValueError, match="C: selective_scan_cpu needs a variable C"):
        selective_scan_cpu(*(x[k] for k in NAMES[:5]))


def test_dispatch_uses_cpu_kernel_on_cpu_with_variable_b_c(monkeypatch):
    monkeypatch.delenv("MEDADAPT_KERNELS", raising=False)
    x = make_inputs(batch=2, dim=6, length=37, n=5, b_layout=3)
    torch.testing.assert_close(run_with_grads(selective_scan, x)[2]["B"],
                               run_with_grads(selective_scan_cpu, x)[2]["B"], rtol=0, atol=0)


def test_no_compiler_means_no_kernel_and_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MEDADAPT_CACHE_DIR", str(tmp_path))
    source = _cbuild.Path(__file__).parents[2] / "medadapt/kernels/selective_scan/csrc/scan_cpu.c"
    assert _cbuild.load_library("scan_cpu_without_cc", str(source)) is None
    assert "could not build" in _cbuild.build_error("scan_cpu_without_cc")
    assert "no-such-cc" in _cbuild.build_error("scan_cpu_without_cc")
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left behind


def test_cc_with_arguments_is_split_into_words(tmp_path, monkeypatch):
    """``CC="ccache gcc"`` style: the first word is the program, the rest its arguments (as make reads it)."""
    monkeypatch.delenv("CC", raising=False)
    cc, wrapper = _cbuild.find_compiler(), shutil.which("env")
    if wrapper is None:
        pytest.skip("no env(1) to stand in for ccache")
    monkeypatch.setenv("CC", f"env {shlex.join(cc)} -DMEDADAPT_CC_WORDS")
    assert _cbuild.find_compiler() == [wrapper, *cc, "-DMEDADAPT_CC_WORDS"]
    monkeypatch.setenv("MEDADAPT_CACHE_DIR", str(tmp_path))
    source = _cbuild.Path(__file__).parents[2] / "medadapt/kernels/selective_scan/csrc/scan_cpu.c"
    lib = _cbuild.load_library("scan_cpu_cc_words", str(source))
    assert lib is not None and hasattr(lib, "scan_fwd_f32"), _cbuild.build_error("scan_cpu_cc_words")


def test_cc_that_does_not_split_is_a_failed_build_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", 'gcc "')  # an unbalanced quote
    monkeypatch.setenv("MEDADAPT_CACHE_DIR", str(tmp_path))
    source = _cbuild.Path(__file__).parents[2] / "medadapt/kernels/selective_scan/csrc/scan_cpu.c"
    assert _cbuild.load_library("scan_cpu_bad_cc", str(source)) is None
    assert _cbuild.build_error("scan_cpu_bad_cc")


def test_build_is_cached_and_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDADAPT_CACHE_DIR", str(tmp_path))
    source = _cbuild.Path(__file__).parents[2] / "medadapt/kernels/selective_scan/csrc/scan_cpu.c"
    lib = _cbuild.load_library("scan_cpu_cache_test", str(source))
    assert lib is not None and hasattr(lib, "scan_fwd_f32") and hasattr(lib, "scan_bwd_f64")
    built = sorted(tmp_path.glob("scan_cpu_cache_test-*.so"))
    assert len(built) == 1 and not [p for p in tmp_path.iterdir() if p not in built]


def test_unwritable_cache_dir_falls_back_with_a_reason(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MEDADAPT_CACHE_DIR", str(blocker / "kernels"))
    source = _cbuild.Path(__file__).parents[2] / "medadapt/kernels/selective_scan/csrc/scan_cpu.c"
    assert _cbuild.load_library("scan_cpu_unwritable", str(source)) is None
    assert _cbuild.build_error("scan_cpu_unwritable")


def _scan_in_child(queue):
    torch.set_num_threads(2)
    x = make_inputs(batch=1, dim=40, length=50, n=4, dtype=torch.float32)
    queue.put(selective_scan_cpu(*(x[k] for k in NAMES[:5])).sum().item())


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_cpu_kernel_runs_in_a_forked_child_after_the_parent_used_threads():
    import multiprocessing

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = make_inputs(batch=1, dim=40, length=50, n=4, dtype=torch.float32)
        want = selective_scan_cpu(*(x[k] for k in NAMES[:5])).sum().item()  # the parent's pool now exists
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_scan_in_child, args=(queue,))
        child.start()
        got = queue.get(timeout=60)  # a pool inherited without its threads would hang here
        child.join(timeout=60)
    finally:
        torch.set_num_threads(before)
    assert got == pytest.approx(want, rel=1e-6)
