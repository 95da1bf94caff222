"""Injected adapters live where the host computes: its device, float32 weights (float64 on a float64 host)."""

import pytest
import torch

pytest.importorskip("segment_anything")

from tiny_models import tiny_sam  # noqa: E402

import medadapt as ma  # noqa: E402
from medadapt.core.base import adapter_state_names  # noqa: E402

ALL_FAMILIES = dict(space_depth=True, depth_pos_embed=4, hyper_prompt=True)


def _adapter_tensors(model):
    state = model.state_dict()
    return {name: state[name] for name in adapter_state_names(model)}


@pytest.mark.parametrize(("host_dtype", "adapter_dtype"), [(torch.bfloat16, torch.float32),
                                                           (torch.float64, torch.float64)])
def test_adapters_take_the_hosts_device_and_a_training_dtype(host_dtype, adapter_dtype):
    torch.manual_seed(0)
    model = tiny_sam(img_size=64, embed_dim=24, prompt_dim=32, depth=2).to(host_dtype)
    ma.inject(model, ma.MedSAConfig(**ALL_FAMILIES))
    tensors = _adapter_tensors(model)
    assert any("depth_pos_embed" in n for n in tensors) and any("hyper_adapter" in n for n in tensors)
    assert {t.dtype for t in tensors.values()} == {adapter_dtype}
    assert all(p.dtype == host_dtype for n, p in model.named_parameters() if n not in tensors)  # host untouched


def test_injecting_into_a_model_on_another_device_moves_no_host_weight():
    """Meta stands in for CUDA: every adapter weight is created on the host's device, none on the CPU."""
    model = tiny_sam(img_size=64, embed_dim=24, prompt_dim=32, depth=2).to("meta")
    ma.inject(model, ma.MedSAConfig(**ALL_FAMILIES))
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}


def test_bf16_host_runs_unchanged_at_init_without_a_cast_after_inject():
    torch.manual_seed(0)
    model = tiny_sam(img_size=64, embed_dim=24, prompt_dim=32, depth=2).eval().to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model.image_encoder(x)
        ma.inject(model, ma.MedSAConfig())
        assert torch.equal(model.image_encoder(x), ref)


def test_disabled_adapter_with_another_output_width_returns_zeros_of_that_width():
    adapter = ma.adapters.BottleneckAdapter(8, 0.5, out_dim=4, zero_init=False)
    x = torch.randn(3, 8)
    assert adapter(x).shape == (3, 4)
    adapter.set_adapters_enabled(False)
    assert torch.equal(adapter(x), torch.zeros(3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inject_into_a_sam_already_on_cuda_runs_the_fused_kernels():
    torch.manual_seed(0)
    model = tiny_sam(img_size=64, embed_dim=64, prompt_dim=32, depth=2).eval().cuda().to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model.image_encoder(x)
    ma.inject(model, ma.MedSAConfig(**ALL_FAMILIES))
    assert {t.device.type for t in _adapter_tensors(model).values()} == {"cuda"}
    out = model.image_encoder(x)
    assert torch.equal(out, ref)
    out.float().square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "image_encoder" in n
               and "depth" not in n)
