"""The Mamba-1 block: shapes, init, the exact definition over the reference scan, causality, bidirectional."""

import math

import pytest
import torch
import torch.nn.functional as F

from medadapt.kernels import selective_scan_reference
from medadapt.models import Mamba


def _block(**kwargs) -> Mamba:
    torch.manual_seed(0)
    return Mamba(d_model=6, d_state=3, d_conv=3, expand=2, **kwargs).double()


def _manual(block: Mamba, h: torch.Tensor) -> torch.Tensor:
    """The docstring's definition, written out: explicit causal conv loop and the reference scan."""
    xz = h @ block.in_proj.weight.t()
    x, z = xz[..., : block.d_inner], xz[..., block.d_inner:]  # (B, L, d_inner)
    w = block.conv1d.weight[:, 0]  # (d_inner, K)
    k = w.shape[1]
    conv = torch.stack([
        sum(w[:, i] * x[:, t - (k - 1) + i] for i in range(k) if t - (k - 1) + i >= 0) + block.conv1d.bias
        for t in range(x.shape[1])
    ], dim=1)
    x = F.silu(conv)
    dbc = x @ block.x_proj.weight.t()
    r, n = block.dt_rank, block.d_state
    delta = dbc[..., :r] @ block.dt_proj.weight.t()
    y = selective_scan_reference(
        x.transpose(1, 2), delta.transpose(1, 2), -torch.exp(block.A_log), dbc[..., r:r + n].transpose(1, 2),
        dbc[..., r + n:].transpose(1, 2), block.D, z=z.transpose(1, 2), delta_bias=block.dt_proj.bias,
        delta_softplus=True)
    return y.transpose(1, 2) @ block.out_proj.weight.t()


def test_shapes_and_defaults():
    block = Mamba(d_model=20)
    assert block.d_inner == 40 and block.dt_rank == math.ceil(20 / 16)
    assert block(torch.randn(2, 7, 20)).shape == (2, 7, 20)
    assert block.x_proj.out_features == block.dt_rank + 2 * 16
    assert block.conv1d.groups == block.d_inner and block.conv1d.kernel_size == (4,)


def test_init_follows_mamba():
    torch.manual_seed(1)
    block = Mamba(d_model=64, d_state=5, dt_min=0.002, dt_max=0.05)
    assert torch.equal(block.A_log, torch.log(torch.arange(1, 6.0)).repeat(128, 1))
    assert torch.equal(block.D, torch.ones(128))
    dt = F.softplus(block.dt_proj.bias.detach())
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert dt.std() > 0  # log-uniform draws, not a constant
    bound = block.dt_rank**-0.5
    assert block.dt_proj.weight.abs().max() <= bound
    assert block.A_log._no_weight_decay and block.D._no_weight_decay


def test_matches_written_out_definition_float64():
    block = _block()
    h = torch.randn(2, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(block(h), _manual(block, h), rtol=1e-10, atol=1e-12)


def test_unidirectional_block_is_causal():
    block = _block()
    h = torch.randn(1, 11, 6, dtype=torch.float64)
    t0 = 6
    h2 = h.clone()
    h2[:, t0] += 1.0
    out, out2 = block(h), block(h2)
    torch.testing.assert_close(out[:, :t0], out2[:, :t0], rtol=0, atol=1e-12)  # exact up to rounding
    assert (out[:, t0:] - out2[:, t0:]).abs().max() > 1e-6


def test_bidirectional_is_average_of_both_directions():
    bi = _block(bidirectional=True)
    with torch.no_grad():  # give the backward scan the forward scan's parameters
        for name in ("conv1d", "x_proj", "dt_proj"):
            getattr(bi, f"{name}_b").load_state_dict(getattr(bi, name).state_dict())
        bi.A_b_log.copy_(bi.A_log)
        bi.D_b.copy_(bi.D)
    uni = _block()
    uni.load_state_dict({k: v for k, v in bi.state_dict().items() if "_b" not in k.split(".")[0]})
    h = torch.randn(2, 8, 6, dtype=torch.float64)
    expected = 0.5 * (uni(h) + uni(h.flip(1)).flip(1))
    torch.testing.assert_close(bi(h), expected, rtol=1e-10, atol=1e-12)


def test_bidirectional_sees_the_future():
    block = _block(bidirectional=True)
    h = torch.randn(1, 10, 6, dtype=torch.float64)
    h2 = h.clone()
    h2[:, -1] += 1.0
    assert (block(h)[:, 0] - block(h2)[:, 0]).abs().max() > 1e-8
    assert "A_b_log" in dict(block.named_parameters())


def test_gradients_reach_every_parameter():
    block = _block(bidirectional=True)
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    block(h).square().sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs, word", [(dict(d_model=0), "d_model"), (dict(d_model=4, d_state=0), "d_state"),
                                          (dict(d_model=4, dt_rank=0), "dt_rank"),
                                          (dict(d_model=4, dt_init="x"), "dt_init"),
                                          (dict(d_model=4, dt_min=0.2, dt_max=0.1), "dt_min")])
def test_bad_arguments_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Mamba(**kwargs)


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match="hidden"):
        Mamba(d_model=4)(torch.randn(2, 3, 5))
