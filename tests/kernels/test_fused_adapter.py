"""Fused bottleneck adapter: torch path, dispatch, validation (no Triton needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from medadapt.kernels import fused_adapter, fused_adapter_reference
from medadapt.kernels.fused_adapter import ACTIVATIONS, MAX_TRITON_HIDDEN, fused_adapter_backend


def _params(c: int, h: int, c_out: int, dtype=torch.float64, seed: int = 0, biases: bool = True):
    gen = torch.Generator().manual_seed(seed)
    w_down = torch.randn(h, c, generator=gen, dtype=dtype) * c**-0.5
    w_up = torch.randn(c_out, h, generator=gen, dtype=dtype) * h**-0.5
    b_down = torch.randn(h, generator=gen, dtype=dtype) * 0.1 if biases else None
    b_up = torch.randn(c_out, generator=gen, dtype=dtype) * 0.1 if biases else None
    return w_down, b_down, w_up, b_up


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_torch_path_gradcheck(activation, monkeypatch):
    """The recomputing backward is the exact derivative (float64, finite differences)."""
    monkeypatch.setenv("MEDADAPT_KERNELS", "torch")
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in _params(5, 4, 6)]

    def fn(x, wd, bd, wu, bu, res):
        return fused_adapter(x, wd, bd, wu, bu, scale=0.7, residual=res, activation=activation)

    assert torch.autograd.gradcheck(fn, (x, *params, res))


@pytest.mark.parametrize("biases", [True, False])
@pytest.mark.parametrize("use_residual", [True, False])
def test_torch_path_matches_reference(biases, use_residual, monkeypatch):
    monkeypatch.setenv("MEDADAPT_KERNELS", "torch")
    x = torch.randn(3, 7, 5, 40, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() if p is not None else None for p in _params(40, 12, 40, biases=biases)]
    res = torch.randn(3, 7, 5, 40, dtype=torch.float64, requires_grad=True) if use_residual else None
    leaves = [t for t in (x, *params, res) if t is not None]
    g = torch.randn(3, 7, 5, 40, dtype=torch.float64)
    out = fused_adapter(x, *params, scale=0.5, residual=res)
    ref = fused_adapter_reference(x, *params, scale=0.5, residual=res)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_saves_only_input_and_weights(monkeypatch):
    """The backward recomputes the hidden activation: nothing of size M·H is kept."""
    monkeypatch.setenv("MEDADAPT_KERNELS", "torch")
    x = torch.randn(4, 9, 16, requires_grad=True)
    params = [p.float().requires_grad_() for p in _params(16, 8, 16)]
    inputs = {t.data_ptr() for t in (x, *params)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_adapter(x, *params, residual=x)
    assert saved and all(t.data_ptr() in inputs for t in saved)


def test_zero_up_projection_gives_residual_exactly(monkeypatch):
    monkeypatch.setenv("MEDADAPT_KERNELS", "torch")
    x = torch.randn(2, 5, 24, dtype=torch.bfloat16)
    res = torch.randn(2, 5, 24, dtype=torch.bfloat16)
    w_down, b_down, w_up, b_up = (p.bfloat16() for p in _params(24, 6, 24))
    out = fused_adapter(x, w_down, b_down, torch.zeros_like(w_up), torch.zeros_like(b_up), 0.5, res)
    assert torch.equal(out, res)


def test_autocast_computes_in_autocast_dtype(monkeypatch):
    monkeypatch.setenv("MEDADAPT_KERNELS", "torch")
    x = torch.randn(3, 16, requires_grad=True)
    params = [p.float().requires_grad_() for p in _params(16, 8, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_adapter(x, *params, residual=None)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in params)
    ref = fused_adapter_reference(x.bfloat16(), *(p.bfloat16() for p in params))
    torch.testing.assert_close(out, ref)


def test_empty_input(monkeypatch):
    monkeypatch.delenv("MEDADAPT_KERNELS", raising=False)
    x = torch.randn(0, 7, 16, requires_grad=True)
    out = fused_adapter(x, *(p.float() for p in _params(16, 8, 12)))
    assert out.shape == (0, 7, 12)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_dispatch_picks_torch_on_cpu_and_honours_env(monkeypatch):
    x = torch.randn(2, 16)
    w_down, _, w_up, _ = (p.float() if p is not None else None for p in _params(16, 8, 16))
    monkeypatch.delenv("MEDADAPT_KERNELS", raising=False)
    assert fused_adapter_backend(x, w_down, w_up) == "torch"
    monkeypatch.setenv("MEDADAPT_KERNELS", "torch")
    assert fused_adapter_backend(x, w_down, w_up) == "torch"
    out = fused_adapter(x.requires_grad_(), w_down, None, w_up, None)
    assert type(out.grad_fn).__name__ == "FusedAdapterTorchFunctionBackward"
    monkeypatch.setenv("MEDADAPT_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MEDADAPT_KERNELS"):
        fused_adapter_backend(x, w_down, w_up)


def test_forced_triton_falls_back_for_uncovered_problems(monkeypatch):
    """float64 and hidden widths above MAX_TRITON_HIDDEN take the torch path even when forced."""
    pytest.importorskip("triton")
    monkeypatch.setenv("MEDADAPT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x64 = torch.randn(2, 16, dtype=torch.float64)
    w_down, _, w_up, _ = _params(16, 8, 16)
    assert fused_adapter_backend(x64, w_down, w_up) == "torch"
    wide_down, _, wide_up, _ = _params(16, MAX_TRITON_HIDDEN + 1, 16, dtype=torch.float32)
    assert fused_adapter_backend(x64.float(), wide_down, wide_up) == "torch"
    assert fused_adapter_backend(x64.float(), w_down.float(), w_up.float()) == "triton"


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("ON", True), ("Yes", True), ("y", True),
                                      ("0", False), ("", False), ("false", False), ("off", False), ("no", False)])
def test_interpret_mode_reads_triton_interpret_as_triton_does(value, on, monkeypatch):
    """``TRITON_INTERPRET=false`` is off for Triton: forcing Triton on CPU tensors must then be refused
    by name, not handed to a Triton without a CPU driver."""
    from medadapt.kernels._dispatch import interpret_mode

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpret_mode() is on
    if not on:
        pytest.importorskip("triton")
        monkeypatch.setenv("MEDADAPT_KERNELS", "triton")
        w_down, _, w_up, _ = (p.float() if p is not None else None for p in _params(16, 8, 16))
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fused_adapter_backend(torch.randn(2, 16), w_down, w_up)


def _bad_cases():
    x = torch.randn(2, 3, 16)
    w_down, b_down, w_up, b_up = (p.float() for p in _params(16, 8, 16))
    ok = dict(x=x, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)
    return [
        ("w_down", dict(ok, w_down=torch.randn(8, 15))),
        ("w_down", dict(ok, w_down=torch.randn(8, 16, 1))),
        ("w_up", dict(ok, w_up=torch.randn(16, 7))),
        ("b_down", dict(ok, b_down=torch.randn(7))),
        ("b_up", dict(ok, b_up=torch.randn(15))),
        ("residual", dict(ok, residual=torch.randn(2, 3, 15))),
        ("x", dict(ok, x=torch.randint(0, 5, (2, 3, 16)))),
        ("w_down", dict(ok, w_down=torch.randint(0, 5, (8, 16)))),
        ("w_up", dict(ok, w_up=w_up.to("meta"))),
        ("b_up", dict(ok, b_up=b_up.to("meta"))),
        ("residual", dict(ok, residual=torch.randn(2, 3, 16, device="meta"))),
        ("activation", dict(ok, activation="swish")),
        ("scale", dict(ok, scale=torch.tensor(0.5, requires_grad=True))),
        ("scale", dict(ok, scale="half")),
        ("x", dict(ok, x=torch.randn(2, 3, 0), w_down=torch.randn(8, 0))),  # C = 0
        ("w_up", dict(ok, w_up=torch.randn(0, 8), b_up=None)),  # C_out = 0
    ]


@pytest.mark.parametrize("name,kwargs", _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise_value_error_naming_argument(name, kwargs):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        fused_adapter(**kwargs)


@pytest.mark.parametrize("trainable", [("w_up",), ("x", "b_down"), ("b_up", "w_down")])
def test_torch_path_partial_requires_grad(trainable, monkeypatch):
    monkeypatch.setenv("MEDADAPT_KERNELS", "torch")
    names = ("x", "w_down", "b_down", "w_up", "b_up")
    values = dict(zip(names, (torch.randn(4, 6, 16, dtype=torch.float64), *_params(16, 8, 16))))
    leaves = {k: v.requires_grad_(k in trainable) for k, v in values.items()}
    inputs = [leaves[k] for k in trainable]
    out = fused_adapter(*leaves.values(), scale=0.5)
    got = torch.autograd.grad(out, inputs, torch.ones_like(out))
    exact = torch.autograd.grad(fused_adapter_reference(*leaves.values(), scale=0.5), inputs, torch.ones_like(out))
    for g, e in zip(got, exact):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_imports_and_runs_without_triton():
    """``medadapt.kernels`` needs torch alone: with Triton unimportable the torch path still runs."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from medadapt.kernels import fused_adapter\n"
        "x = torch.randn(2, 3, 8, requires_grad=True)\n"
        "out = fused_adapter(x, torch.randn(4, 8), torch.zeros(4), torch.randn(8, 4), None, residual=x)\n"
        "out.sum().backward()\n"
        "assert 'triton' not in sys.modules or sys.modules['triton'] is None\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MEDADAPT_KERNELS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
