"""Fused bottleneck adapter on a GPU: SAM's real widths and every autotuning configuration.

Skipped without CUDA. The interpreter tests run one small tile configuration; these check the tile
shapes the autotuner can pick on a real device (bf16, hidden 192/256/320, odd token counts).
"""

from __future__ import annotations

import pytest
import torch

from medadapt.kernels import fused_adapter, fused_adapter_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
pytest.importorskip("triton")

LEAVES = ("x", "w_down", "b_down", "w_up", "b_up", "residual")


def _problem(tokens_shape, width, hidden, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def make(*size, std=1.0):
        return (torch.randn(*size, generator=gen) * std).bfloat16().double()

    tensors = {"x": make(*tokens_shape, width), "w_down": make(hidden, width, std=width**-0.5),
               "b_down": make(hidden, std=0.3), "w_up": make(width, hidden, std=hidden**-0.5),
               "b_up": make(width, std=0.3), "residual": make(*tokens_shape, width)}
    return tensors, make(*tokens_shape, width)


def _run(fn, tensors, grad, dtype):
    leaves = [tensors[k].detach().cuda().to(dtype).requires_grad_() for k in LEAVES]
    out = fn(*leaves[:5], scale=0.5, residual=leaves[5], activation="gelu")
    grads = torch.autograd.grad(out, leaves, grad.cuda().to(out.dtype))
    return out, [t.double() for t in (out, *grads)]


def _check(tensors, grad):
    _, exact = _run(fused_adapter_reference, tensors, grad, torch.float64)
    _, ref = _run(fused_adapter_reference, tensors, grad, torch.bfloat16)
    out, got = _run(fused_adapter, tensors, grad, torch.bfloat16)
    assert type(out.grad_fn).__name__ == "FusedAdapterTritonFunctionBackward"
    for name, g, r, e in zip(("out", *LEAVES), got, ref, exact):
        size, err, ref_err = e.abs().max().item(), (g - e).abs().max().item(), (r - e).abs().max().item()
        assert err <= 2.0 * ref_err + 4e-3 * size, f"{name}: error {err:.3g}, bf16 reference's {ref_err:.3g}"


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("width,hidden", [(768, 192), (1024, 256), (1280, 320)])
def test_sam_widths_bf16(width, hidden, merged, monkeypatch):
    """Default backward mode; the backward kernel with its column loops merged (C == C_out) or not."""
    from medadapt.kernels.fused_adapter import triton_launch

    monkeypatch.delenv("MEDADAPT_KERNELS", raising=False)
    monkeypatch.setattr(triton_launch, "MERGE_LOOPS", merged)
    _check(*_problem((3, 37, 41), width, hidden))


MODES = ["cublas", "wgrad_kernel", "wgrad_kernel_two_launches"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width,hidden", [(768, 192), (1280, 320)])
def test_every_tile_configuration(width, hidden, mode, monkeypatch):
    """Each tile shape the autotuner may pick for this hidden width, in each backward mode (weight
    gradients by cuBLAS or by the weight-gradient kernel, one grid or one launch per problem: its tiles too)."""
    from triton.runtime.errors import OutOfResources

    from medadapt.kernels.fused_adapter import triton_launch
    from medadapt.kernels.fused_adapter.triton_kernels import hidden_split

    monkeypatch.delenv("MEDADAPT_KERNELS", raising=False)
    monkeypatch.setattr(triton_launch._bwd, "configs", list(triton_launch._bwd.configs))
    triton_launch.include_unverified_tiles()  # checked here before the autotuner may pick them by default
    monkeypatch.setattr(triton_launch, "WGRAD_LAUNCHES", 2 if mode.endswith("two_launches") else 1)
    mode = mode.removesuffix("_two_launches")
    monkeypatch.setattr(triton_launch, "BACKWARD_MODE", mode)
    tensors, grad = _problem((2, 23, 29), width, hidden, seed=1)
    tuners = [triton_launch._fwd, triton_launch._bwd]
    tuners += [triton_launch._wgrad] if mode == "wgrad_kernel" else []
    lists = [triton_launch._fitting_configs(t.configs, sum(hidden_split(hidden))) for t in tuners]
    ran = 0
    for i in range(max(map(len, lists))):
        for tuner, configs in zip(tuners, lists):
            monkeypatch.setattr(tuner, "configs", [configs[i % len(configs)]])
        monkeypatch.setattr(triton_launch, "_chosen", {})  # the launcher's memory of the autotuner's choice
        try:
            _check(tensors, grad)
            ran += 1
        except OutOfResources:  # too much shared memory on this GPU: the autotuner skips such configs too
            continue
    assert ran > 0


@pytest.mark.parametrize("mode", [*MODES, "wgrad_kernel_hidden_tiles"])
def test_sequential_adapter_folds_residual_gradient(mode, monkeypatch):
    """``residual=x`` (Med-SA's space adapter): dx = g + adapter gradient from one GEMM epilogue or store."""
    from medadapt.kernels.fused_adapter import triton_launch

    monkeypatch.delenv("MEDADAPT_KERNELS", raising=False)
    monkeypatch.setattr(triton_launch, "WGRAD_LAUNCHES", 1 if mode in ("cublas", "wgrad_kernel") else 2)
    monkeypatch.setattr(triton_launch, "WGRAD_HIDDEN_TILE", 64 if mode.endswith("hidden_tiles") else None)
    monkeypatch.setattr(triton_launch, "BACKWARD_MODE", "cublas" if mode == "cublas" else "wgrad_kernel")
    tensors, grad = _problem((2, 21, 19), 768, 192, seed=4)
    results = {}
    for name, fn, dtype in (("exact", fused_adapter_reference, torch.float64),
                            ("ref", fused_adapter_reference, torch.bfloat16), ("got", fused_adapter, torch.bfloat16)):
        leaves = [tensors[k].detach().cuda().to(dtype).requires_grad_() for k in LEAVES[:5]]
        out = fn(*leaves, scale=1.0, residual=leaves[0], activation="gelu")
        if name == "got":
            assert type(out.grad_fn).__name__ == "FusedAdapterTritonFunctionBackward"
        grads = torch.autograd.grad(out, leaves, grad.cuda().to(dtype))
        results[name] = [t.double() for t in (out, *grads)]
    for label, g, r, e in zip(("out", *LEAVES[:5]), results["got"], results["ref"], results["exact"]):
        size, err, ref_err = e.abs().max().item(), (g - e).abs().max().item(), (r - e).abs().max().item()
        assert err <= 2.0 * ref_err + 4e-3 * size, f"{label}: error {err:.3g}, bf16 reference's {ref_err:.3g}"


def test_fp32_with_and_without_tf32(monkeypatch):
    """fp32: the kernel runs when TF32 is allowed (or forced); full-fp32 matmuls otherwise take torch."""
    tensors, grad = _problem((2, 19, 17), 768, 192)
    _, exact = _run(fused_adapter_reference, tensors, grad, torch.float64)
    monkeypatch.setenv("MEDADAPT_KERNELS", "triton")
    out, got = _run(fused_adapter, tensors, grad, torch.float32)
    assert type(out.grad_fn).__name__ == "FusedAdapterTritonFunctionBackward"
    for g, e in zip(got, exact):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())
    monkeypatch.delenv("MEDADAPT_KERNELS")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    out, _ = _run(fused_adapter, tensors, grad, torch.float32)
    assert type(out.grad_fn).__name__ == "FusedAdapterTorchFunctionBackward"
