"""Fused bottleneck adapter: the Triton kernels against the reference.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by
tests/conftest.py); with a GPU the same tests run on CUDA tensors. Every output and every gradient
(x, both weights, both biases, residual) is compared with the float64 reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from medadapt.kernels import fused_adapter, fused_adapter_reference
from medadapt.kernels._dispatch import interpret_mode

LEAVES = ("x", "w_down", "b_down", "w_up", "b_up")

pytest.importorskip("triton")

if interpret_mode():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MEDADAPT_KERNELS", "triton")


def _problem(shape, c_out, hidden, dtype, biases=True, residual=True, seed=0):
    """Inputs already representable in ``dtype`` (so float64 math on them is the exact answer)."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[-1]

    def make(*size, std=1.0):
        return (torch.randn(*size, generator=gen) * std).to(dtype).to(torch.float64)

    tensors = {
        "x": make(*shape), "w_down": make(hidden, c, std=c**-0.5), "b_down": make(hidden, std=0.3),
        "w_up": make(c_out, hidden, std=hidden**-0.5), "b_up": make(c_out, std=0.3),
        "residual": make(*shape[:-1], c_out),
    }
    if not biases:
        tensors["b_down"] = tensors["b_up"] = None
    if not residual:
        tensors["residual"] = None
    return tensors, make(*shape[:-1], c_out)


def _run(fn, tensors, grad, dtype, scale, activation):
    leaves = {k: v.detach().to(DEVICE, dtype).requires_grad_() for k, v in tensors.items() if v is not None}
    args = {k: leaves.get(k) for k in tensors}
    out = fn(args["x"], args["w_down"], args["b_down"], args["w_up"], args["b_up"], scale=scale,
             residual=args["residual"], activation=activation)
    grads = torch.autograd.grad(out, list(leaves.values()), grad.to(DEVICE, out.dtype))
    results = {"out": out, **{f"d_{k}": g for k, g in zip(leaves, grads)}}
    return {k: v.detach().cpu().double() for k, v in results.items()}, out


@pytest.mark.parametrize(
    "shape,c_out,hidden,activation,biases,residual,scale",
    [
        ((3, 7, 5, 40), 40, 12, "gelu", True, True, 0.5),
        ((3, 7, 5, 40), 40, 12, "gelu_tanh", True, False, 1.0),
        ((3, 7, 5, 40), 40, 12, "relu", False, True, 2.0),
        ((4, 33, 24), 17, 20, "gelu", False, False, 0.5),  # C_out ≠ C, hidden split 16 + 16
        ((2, 37, 96), 96, 48, "gelu_tanh", True, True, 1.0),  # hidden split 32 + 16, several K/N tiles
    ],
)
def test_fp32_matches_reference(shape, c_out, hidden, activation, biases, residual, scale):
    tensors, grad = _problem(shape, c_out, hidden, torch.float32, biases, residual)
    exact, _ = _run(fused_adapter_reference, tensors, grad, torch.float64, scale, activation)
    got, out = _run(fused_adapter, tensors, grad, torch.float32, scale, activation)
    assert type(out.grad_fn).__name__ == "FusedAdapterTritonFunctionBackward"
    assert got.keys() == exact.keys()
    for name in exact:
        torch.testing.assert_close(got[name], exact[name], rtol=2e-5, atol=2e-5 * exact[name].abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "dtype,activation,hidden",
    [(torch.bfloat16, "gelu", 12), (torch.bfloat16, "gelu_tanh", 20), (torch.float16, "relu", 12)],
)
def test_low_precision_as_accurate_as_reference(dtype, activation, hidden):
    """Error vs exact is at most about the reference's own error in that dtype (fp32 accumulation)."""
    tensors, grad = _problem((3, 7, 5, 40), 40, hidden, dtype)
    exact, _ = _run(fused_adapter_reference, tensors, grad, torch.float64, 0.5, activation)
    ref, _ = _run(fused_adapter_reference, tensors, grad, dtype, 0.5, activation)
    got, out = _run(fused_adapter, tensors, grad, dtype, 0.5, activation)
    assert out.dtype == dtype
    for name in exact:
        size = exact[name].abs().max().item()
        err = (got[name] - exact[name]).abs().max().item()
        ref_err = (ref[name] - exact[name]).abs().max().item()
        assert err <= 2.0 * ref_err + 4e-3 * size, f"{name}: error {err:.3g}, reference's {ref_err:.3g}"


BACKWARD_MODES = ["cublas", "wgrad_kernel"]


@pytest.mark.parametrize("mode", BACKWARD_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", ["x", "separate"])
def test_backward_modes_and_sequential_adapter(mode, dtype, residual, monkeypatch):
    """Weight gradients by cuBLAS or the weight-gradient kernel; ``residual=x`` (the sequential adapter)
    folds the residual's gradient into dx: both match the reference, which lets autograd add the two
    paths."""
    from medadapt.kernels.fused_adapter import triton_launch

    monkeypatch.setattr(triton_launch, "BACKWARD_MODE", mode)
    tensors, grad = _problem((3, 7, 5, 40), 40, 12, dtype, seed=3)
    tensors["residual"] = None
    leaves = {k: v.detach().to(DEVICE, dtype).requires_grad_() for k, v in tensors.items() if v is not None}
    exact_leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items() if v is not None}
    outs, grads = [], []
    for fn, ls, g in ((fused_adapter, leaves, grad.to(DEVICE, dtype)), (fused_adapter_reference, exact_leaves, grad)):
        x = ls["x"]
        res = x if residual == "x" else x.detach() * 0.5
        out = fn(x, ls["w_down"], ls["b_down"], ls["w_up"], ls["b_up"], scale=0.5, residual=res)
        outs.append(out)
        grads.append([t.detach().cpu().double() for t in torch.autograd.grad(out, list(ls.values()), g)])
    assert type(outs[0].grad_fn).__name__ == "FusedAdapterTritonFunctionBackward"
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0].detach().cpu().double(), outs[1].detach(), rtol=tol, atol=tol)
    for name, got, want in zip(leaves, *grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(),
                                   msg=lambda m, name=name: f"d_{name}: {m}")


@pytest.mark.parametrize("rows,cols", [(1, 3), (37, 12), (1000, 192), (333, 320)])
def test_column_sum_matches_torch(rows, cols):
    """db_down's column sum: fp32 partials per program, any row count, padded column block."""
    from medadapt.kernels.fused_adapter.triton_launch import column_sum

    a = torch.randn(rows, cols + 5, device=DEVICE).bfloat16()[:, :cols]  # row stride ≠ width
    torch.testing.assert_close(column_sum(a), a.float().sum(0), rtol=1e-5, atol=1e-4)


def test_launcher_remembers_the_autotuned_configuration(monkeypatch):
    """The first call per shape and flags goes through the autotuner; repeats launch its choice directly,
    with the same result."""
    from medadapt.kernels.fused_adapter import triton_launch

    monkeypatch.setattr(triton_launch, "_chosen", {})
    monkeypatch.setattr(triton_launch, "BACKWARD_MODE", "wgrad_kernel")
    tensors, grad = _problem((2, 9, 40), 40, 12, torch.float32, seed=5)
    first, _ = _run(fused_adapter, tensors, grad, torch.float32, 0.5, "gelu")
    assert len(triton_launch._chosen) == 3  # the forward kernel and the two backward kernels
    assert all(isinstance(c, triton_launch.triton.Config) for c in triton_launch._chosen.values())
    again, _ = _run(fused_adapter, tensors, grad, torch.float32, 0.5, "gelu")
    assert len(triton_launch._chosen) == 3
    for name in first:
        assert torch.equal(first[name], again[name]), name
    _run(fused_adapter, tensors, grad, torch.float32, 0.5, "relu")  # other flags: tuned separately
    assert len(triton_launch._chosen) == 5  # the weight-gradient kernel has no activation flag


@pytest.mark.parametrize(
    "rows,width,c_out,hidden,needs",
    [
        (150, 24, 24, 12, (True,) * 5),  # one column slice, four row chunks, the last one empty
        (105, 40, 40, 48, (True,) * 5),  # two slices, hidden split 32 + 16
        (131, 33, 17, 20, (True,) * 5),  # C_out < C: slices cover the wider of the two
        (70, 17, 40, 12, (False, True, True, True, True)),  # C_out > C, no dx
        (70, 40, 40, 12, (True, False, False, False, True)),  # db_up alone
    ],
)
@pytest.mark.parametrize("launches,hidden_tile", [(1, None), (2, None), (1, 16), (2, 16)])
def test_weight_gradient_kernel_matches_float64(rows, width, c_out, hidden, needs, launches, hidden_tile,
                                                monkeypatch):
    """The second backward pass: dx, dW_down, db_down, dW_up, db_up from fp32 partial sums per row chunk; both
    problems in one grid, or one launch per problem (each compiled for its problem, its own buffer); the hidden
    rows whole per program or in tiles of 16 (hidden 48: three tiles, 20: a full and a masked one)."""
    from medadapt.kernels.fused_adapter import triton_launch
    from medadapt.kernels.fused_adapter.reference import fused_adapter_reference as ref
    from medadapt.kernels.fused_adapter.triton_launch import adapter_backward

    monkeypatch.setattr(triton_launch, "WGRAD_LAUNCHES", launches)
    monkeypatch.setattr(triton_launch, "WGRAD_HIDDEN_TILE", hidden_tile)

    gen = torch.Generator().manual_seed(rows)
    x, g = torch.randn(rows, width, generator=gen), torch.randn(rows, c_out, generator=gen)
    w_down, b_down = torch.randn(hidden, width, generator=gen) * width**-0.5, torch.randn(hidden, generator=gen)
    w_up, b_up = torch.randn(c_out, hidden, generator=gen) * hidden**-0.5, torch.randn(c_out, generator=gen)
    leaves = [t.double().requires_grad_() for t in (x, w_down, b_down, w_up, b_up)]
    exact = torch.autograd.grad(ref(*leaves, scale=0.7, activation="gelu_tanh"), leaves, g.double())
    got = adapter_backward(*(t.to(DEVICE) for t in (x, w_down, b_down, w_up, g)), 0.7, "gelu_tanh", needs,
                           backward_mode="wgrad_kernel")
    for name, need, have, want in zip(LEAVES, needs, got, exact):
        if not need:
            assert have is None, name
            continue
        torch.testing.assert_close(have.double().cpu(), want, rtol=2e-5, atol=2e-5 * want.abs().max().item(),
                                   msg=lambda m, name=name: f"d_{name}: {m}")


def test_bad_hidden_tile_is_named(monkeypatch):
    from medadapt.kernels.fused_adapter import triton_launch

    monkeypatch.setattr(triton_launch, "WGRAD_HIDDEN_TILE", 24)
    x, g = torch.randn(8, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="WGRAD_HIDDEN_TILE"):
        triton_launch._weight_gradient_pass(x, g, torch.randn(8, 4, device=DEVICE), torch.randn(8, 4, device=DEVICE),
                                            torch.randn(4, 16, device=DEVICE), 1.0)


def test_weight_gradient_part_offsets():
    from medadapt.kernels.fused_adapter.triton_weight_grads import wgrad_part_offsets

    assert wgrad_part_offsets(768, 768, 192) == (147456, 294912, 295680, 295872)
    assert wgrad_part_offsets(5, 3, 2) == (10, 16, 19, 21)


def test_backward_plan_by_hidden_width(monkeypatch):
    """``auto``: the weight-gradient kernel up to a padded hidden width of 256, one merged column loop up to
    192 (and only when C == C_out); explicit settings win."""
    from medadapt.kernels.fused_adapter import triton_launch

    plan = triton_launch._backward_plan
    assert plan(768, 768, 192) == ("wgrad_kernel", True)
    assert plan(1024, 1024, 256) == ("wgrad_kernel", False)
    assert plan(1280, 1280, 320) == ("cublas", False)
    assert plan(768, 512, 192) == ("wgrad_kernel", False)
    monkeypatch.setattr(triton_launch, "BACKWARD_MODE", "wgrad_kernel")
    monkeypatch.setattr(triton_launch, "MERGE_LOOPS", True)
    assert plan(1280, 1280, 320) == ("wgrad_kernel", True)
    assert plan(1280, 640, 320) == ("wgrad_kernel", False)


def test_backward_mode_rejects_unknown_value():
    from medadapt.kernels.fused_adapter.triton_launch import adapter_backward

    x = torch.randn(4, 40, device=DEVICE)
    w_down, w_up = torch.randn(12, 40, device=DEVICE), torch.randn(40, 12, device=DEVICE)
    with pytest.raises(ValueError, match="backward_mode"):
        adapter_backward(x, w_down, None, w_up, x, 1.0, "gelu", (True,) * 5, backward_mode="fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_up_projection_gives_residual_exactly(dtype):
    tensors, grad = _problem((3, 7, 5, 40), 40, 12, dtype)
    tensors["w_up"].zero_()
    tensors["b_up"].zero_()
    got, _ = _run(fused_adapter, tensors, grad, dtype, 0.5, "gelu")
    assert torch.equal(got["out"], tensors["residual"])
    assert torch.equal(got["d_residual"], grad)
    assert torch.equal(got["d_x"], torch.zeros_like(got["d_x"]))  # W_up = 0 stops the gradient into x
    assert torch.equal(got["d_w_down"], torch.zeros_like(got["d_w_down"]))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a view with last-dimension stride 2 (every other element of a wider tensor)."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]


def test_non_contiguous_inputs_weights_and_grad():
    tensors, grad = _problem((3, 5, 7, 40), 40, 12, torch.float32)
    exact, _ = _run(fused_adapter_reference, tensors, grad, torch.float64, 0.5, "gelu")
    on = {k: v.float().to(DEVICE) for k, v in tensors.items()}
    x = _strided(on["x"]).requires_grad_()  # column stride 2: the kernel reads it in place
    res = on["residual"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # permuted: copied
    w_down = on["w_down"].t().contiguous().t().requires_grad_()  # column-major weight
    others = [on[k].requires_grad_() for k in ("b_down", "w_up", "b_up")]
    g = _strided(grad.float().to(DEVICE))
    assert not any(t.is_contiguous() for t in (x, res, w_down, g))
    out = fused_adapter(x, w_down, others[0], others[1], others[2], scale=0.5, residual=res)
    grads = torch.autograd.grad(out, [x, w_down, *others, res], g)
    names = ["d_x", "d_w_down", "d_b_down", "d_w_up", "d_b_up", "d_residual"]
    torch.testing.assert_close(out.double().cpu(), exact["out"], rtol=2e-5, atol=2e-5)
    for name, got in zip(names, grads):
        torch.testing.assert_close(got.double().cpu(), exact[name], rtol=2e-5, atol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_strided_and_expanded_biases(layout):
    """The kernels read biases with unit stride: a column of a matrix (stride 2) or an expanded scalar
    (stride 0) is made contiguous first; an expanded bias's gradient is summed back to its own shape."""
    tensors, grad = _problem((5, 11), 9, 7, torch.float32)
    if layout == "expanded":
        tensors["b_down"] = tensors["b_down"][:1].expand(7)
        tensors["b_up"] = tensors["b_up"][:1].expand(9)
    exact, _ = _run(fused_adapter_reference, tensors, grad, torch.float64, 0.5, "gelu")
    on = {k: v.float().to(DEVICE) for k, v in tensors.items()}
    if layout == "strided":
        b_down, b_up = _strided(on["b_down"]).requires_grad_(), _strided(on["b_up"]).requires_grad_()
        bases, want = (b_down, b_up), (exact["d_b_down"], exact["d_b_up"])
        assert b_down.stride() == b_up.stride() == (2,)
    else:
        # fresh storage of one element each (shapes (1,) and ()): reading past it is out of bounds
        bases = (on["b_down"][:1].clone().requires_grad_(), on["b_up"][0].clone().requires_grad_())
        b_down, b_up = bases[0].expand(7), bases[1].expand(9)
        want = (exact["d_b_down"].sum(0, keepdim=True), exact["d_b_up"].sum())
    x, w_down, w_up = (on[k].requires_grad_() for k in ("x", "w_down", "w_up"))
    out = fused_adapter(x, w_down, b_down, w_up, b_up, scale=0.5, residual=on["residual"])
    grads = torch.autograd.grad(out, [x, w_down, w_up, *bases], grad.float().to(DEVICE))
    torch.testing.assert_close(out.double().cpu(), exact["out"], rtol=2e-5, atol=2e-5)
    for name, got, ref in zip(("d_x", "d_w_down", "d_w_up", "d_b_down", "d_b_up"), grads,
                              (exact["d_x"], exact["d_w_down"], exact["d_w_up"], *want)):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got.double().cpu(), ref, rtol=2e-5, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_partial_requires_grad():
    """Frozen x (first block) and frozen down-projection: the kernel skips dx and dW_down."""
    tensors, grad = _problem((3, 7, 5, 40), 40, 12, torch.float32)
    exact, _ = _run(fused_adapter_reference, tensors, grad, torch.float64, 0.5, "gelu")
    x, w_down, b_down, w_up, b_up, res = (tensors[k].float().to(DEVICE) for k in tensors)
    b_down.requires_grad_()
    w_up.requires_grad_()
    out = fused_adapter(x, w_down, b_down, w_up, b_up, scale=0.5, residual=res)
    d_b_down, d_w_up = torch.autograd.grad(out, [b_down, w_up], grad.float().to(DEVICE))
    torch.testing.assert_close(d_b_down.double().cpu(), exact["d_b_down"], rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(d_w_up.double().cpu(), exact["d_w_up"], rtol=2e-5, atol=1e-4)


def test_hidden_split_covers_widths():
    from medadapt.kernels.fused_adapter.triton_kernels import hidden_split

    assert hidden_split(12) == (16, 0)
    assert hidden_split(192) == (128, 64)
    assert hidden_split(256) == (256, 0)
    assert hidden_split(320) == (256, 64)
    assert hidden_split(20) == (16, 16)
    for width in range(1, 600):
        first, second = hidden_split(width)
        assert first + second >= width and first >= 16 and (second == 0 or second >= 16)
        assert first & (first - 1) == 0 and second & (second - 1) == 0


_COMPILE_SCRIPT = textwrap.dedent("""
    import sys
    import triton
    sys.path.insert(0, {benchmarks!r})
    from adapter_registers import compile_kernel

    compile_kernel("fwd", 192, (64, 64, 64, 8, 3))
    compile_kernel("bwd", 320, (64, 64, 64, 8, 3))
    compile_kernel("bwd_two_loops", 192, (64, 64, 128, 8, 3))
    compile_kernel("wgrad", 320, (64, 64, 1, 8, 3))
    compile_kernel("wgrad_down", 192, (64, 128, 1, 8, 3))
    compile_kernel("wgrad_up", 320, (64, 128, 1, 8, 3))
    compile_kernel("wgrad_down", 128, (64, 128, 1, 8, 3))  # a hidden tile of 128 (HB = 0)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from medadapt.kernels.fused_adapter.triton_weight_grads import column_sum_kernel
    sig = dict(a_ptr="*bf16", part_ptr="*fp32", M="i32", N="i32", stride_am="i32", BLOCK_M="constexpr",
               BLOCK_N="constexpr")
    src = ASTSource(column_sum_kernel, sig, constexprs=dict(BLOCK_M=32, BLOCK_N=256))
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    print("compiled")
""")


def test_kernels_compile_for_hopper():
    """The interpreter accepts code the GPU compiler rejects: compile for sm_90 (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    benchmarks = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT.format(benchmarks=benchmarks)],
                          capture_output=True, text=True, env=env,
                          timeout=300)
    last_line = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    if proc.returncode != 0 and last_line.startswith(("ImportError", "ModuleNotFoundError", "AttributeError")):
        pytest.skip(f"this Triton has no CUDA toolchain or another AOT API: {last_line}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_residual_dtype_promotes_output():
    """bf16 adapter on an fp32 residual stream: fp32 output, gradients in each input's dtype."""
    tensors, grad = _problem((3, 7, 5, 40), 40, 12, torch.bfloat16)
    x, w_down, b_down, w_up, b_up = (tensors[k].to(DEVICE, torch.bfloat16).requires_grad_() for k in LEAVES)
    res = tensors["residual"].to(DEVICE, torch.float32).requires_grad_()
    out = fused_adapter(x, w_down, b_down, w_up, b_up, scale=0.5, residual=res)
    ref = fused_adapter_reference(x, w_down, b_down, w_up, b_up, scale=0.5, residual=res)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    d_x, d_res = torch.autograd.grad(out, [x, res], grad.to(DEVICE, torch.float32))
    assert d_x.dtype == torch.bfloat16 and d_res.dtype == torch.float32
    assert torch.equal(d_res.cpu(), grad.float())


def test_broadcast_output_gradient():
    """``out.sum().backward()`` hands the kernel a gradient with zero strides."""
    tensors, _ = _problem((2, 9, 40), 40, 12, torch.float32)
    ones = torch.ones(2, 9, 40, dtype=torch.float64)
    exact, _ = _run(fused_adapter_reference, tensors, ones, torch.float64, 0.5, "gelu_tanh")
    x, w_down, b_down, w_up, b_up = (tensors[k].float().to(DEVICE).requires_grad_() for k in LEAVES)
    fused_adapter(x, w_down, b_down, w_up, b_up, scale=0.5, activation="gelu_tanh").sum().backward()
    for name, t in zip(LEAVES, (x, w_down, b_down, w_up, b_up)):
        torch.testing.assert_close(t.grad.double().cpu(), exact[f"d_{name}"], rtol=2e-5, atol=1e-4)


def test_unverified_tiles_are_opt_in_and_added_once(monkeypatch):
    """The backward kernel's tiles not yet run on a GPU stay out of its autotuning list until asked for."""
    from medadapt.kernels.fused_adapter import triton_launch

    monkeypatch.setattr(triton_launch._bwd, "configs", list(triton_launch._bwd.configs))
    monkeypatch.setattr(triton_launch, "_chosen", {})
    shown = {str(c) for c in triton_launch._bwd.configs}
    unverified = triton_launch._gpu_configs(triton_launch._BWD_SHAPES_UNVERIFIED)
    assert not any(str(c) in shown for c in unverified)
    before = len(triton_launch._bwd.configs)
    triton_launch.include_unverified_tiles()
    triton_launch.include_unverified_tiles()
    assert len(triton_launch._bwd.configs) == before + len(unverified)


def test_weight_gradient_buffer_has_the_chosen_configurations_rows(monkeypatch):
    """The fp32 partial-sum buffer holds as many rows as the chosen configuration writes once it is known (the
    widest candidate's count only while the autotuner times them all), with identical gradients."""
    import triton

    from medadapt.kernels.fused_adapter import triton_launch

    monkeypatch.setattr(triton_launch, "_chosen", {})
    wide = triton.Config({"BLOCK_M": 32, "BLOCK_C": 32, "WAVES": 64}, num_warps=4, num_stages=1)
    monkeypatch.setattr(triton_launch._wgrad, "configs", [*triton_launch._wgrad.configs, wide])
    launch = triton_launch._launch

    def first_config_chosen(tuner, grid, shape_key, args, constexprs):  # the autotuner's choice, without timing
        saved, tuner.configs = tuner.configs, tuner.configs[:1]
        try:
            return launch(tuner, grid, shape_key, args, constexprs)
        finally:
            tuner.configs = saved

    monkeypatch.setattr(triton_launch, "_launch", first_config_chosen)
    x, g = torch.randn(300, 40, device=DEVICE), torch.randn(300, 40, device=DEVICE)
    h, dpre = torch.randn(300, 12, device=DEVICE), torch.randn(300, 12, device=DEVICE)
    offsets = triton_launch.wgrad_part_offsets(40, 40, 12)
    part1, rows1 = triton_launch._wgrad_launch(x, g, h, dpre, 0.5, 0, offsets)
    part2, rows2 = triton_launch._wgrad_launch(x, g, h, dpre, 0.5, 0, offsets)
    assert rows1 == rows2 == part2.shape[0] < part1.shape[0]  # the wide candidate's rows only the first time
    assert torch.equal(part1[:rows1], part2)
