"""The intervention math (METHODS.md §2), in float64 at odd sizes."""

import pytest
import torch

from medadapt.prompts import (
    ClassTokenIntervention,
    ConditionalIntervention,
    DiReFT,
    LoReFT,
    LowRankProjection,
)

D, R, C = 13, 3, 7


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("orthogonal", [True, False])
def test_loreft_identity_when_w_equals_r(orthogonal):
    torch.manual_seed(0)
    m = LoReFT(D, R, orthogonal=orthogonal).double()
    with torch.no_grad():
        m.source.weight.copy_(m.rotation.weight)
        m.source.bias.zero_()
    h = torch.randn(5, 4, D, dtype=torch.float64)
    torch.testing.assert_close(m(h), h, rtol=0, atol=1e-12)


def test_loreft_subspace_facts_orthonormal():
    torch.manual_seed(1)
    m = LoReFT(D, R, orthogonal=True).double()
    with torch.no_grad():
        m.source.weight.normal_()
        m.source.bias.normal_()
    h = torch.randn(6, D, dtype=torch.float64)
    out = m(h)
    rot = m.rotation.weight
    torch.testing.assert_close(rot @ rot.T, torch.eye(R, dtype=torch.float64), rtol=0, atol=1e-12)
    # R Φ(h) = W h + b
    torch.testing.assert_close(out @ rot.T, m.source(h), rtol=0, atol=1e-11)
    # the edit lies in R's row space: (I − RᵀR)(Φ(h) − h) = 0
    complement = torch.eye(D, dtype=torch.float64) - rot.T @ rot
    torch.testing.assert_close((out - h) @ complement, torch.zeros_like(h), rtol=0, atol=1e-11)
    assert (out - h).abs().max() > 1e-3  # a real edit


def test_rotation_stays_orthonormal_after_optimizer_steps():
    torch.manual_seed(2)
    m = LoReFT(D, R, orthogonal=True).double()
    free = LoReFT(D, R, orthogonal=False).double()
    for module in (m, free):
        opt = torch.optim.Adam(module.parameters(), lr=0.05)
        target = torch.randn(16, D, dtype=torch.float64)
        for _ in range(25):
            opt.zero_grad()
            loss = (module(torch.randn(16, D, dtype=torch.float64)) - target).pow(2).mean()
            loss.backward()
            opt.step()
    eye = torch.eye(R, dtype=torch.float64)
    rot = m.rotation.weight.detach()
    torch.testing.assert_close(rot @ rot.T, eye, rtol=0, atol=1e-10)
    free_rot = free.rotation.weight.detach()
    assert (free_rot @ free_rot.T - eye).abs().max() > 1e-4  # the CILMP-code form drifts


def test_conditional_with_zero_phi_is_loreft_with_first_half_of_ws():
    torch.manual_seed(3)
    cond = ConditionalIntervention(D, R, C, dropout=0.0).double()
    with torch.no_grad():
        cond.source.weight.normal_()
        cond.condition[1].weight.zero_()
        cond.condition[1].bias.zero_()  # φ ≡ 0
    lo = LoReFT(D, R, orthogonal=True).double()
    lo.rotation.load_state_dict(cond.rotation.state_dict())
    with torch.no_grad():
        lo.source.weight.copy_(cond.source.weight[:, :D])
        lo.source.bias.copy_(cond.source.bias)
    h = torch.randn(4, 5, D, dtype=torch.float64)
    f = torch.randn(3, C, dtype=torch.float64)
    out = cond(h, f)
    assert out.shape == (3, 4, 5, D)
    for b in range(3):
        torch.testing.assert_close(out[b], lo(h), rtol=0, atol=1e-12)


def test_conditional_batched_matches_per_image_formula():
    torch.manual_seed(4)
    m = ConditionalIntervention(D, R, C, orthogonal=False, dropout=0.0).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    h = torch.randn(2, 3, D, dtype=torch.float64)
    f = torch.randn(5, C, dtype=torch.float64)
    out = m(h, f)
    rot = m.rotation.weight
    u1, u2 = m.condition
    for b in range(5):
        phi = u2.weight @ (u1.weight @ f[b] + u1.bias) + u2.bias
        s = torch.cat([h, phi * h], -1) @ m.source.weight.T + m.source.bias
        torch.testing.assert_close(out[b], h + (s - h @ rot.T) @ rot, rtol=1e-12, atol=1e-12)


def test_parameter_counts():
    d, r, c = 37, 5, 11
    assert _n_params(LoReFT(d, r)) == 2 * d * r + r
    assert _n_params(DiReFT(d, r)) == 2 * d * r + r
    assert _n_params(ConditionalIntervention(d, r, c)) == 4 * d * r + c * r + 2 * r + d
    assert _n_params(ConditionalIntervention(4096, 8, 512)) == 139_280
    assert _n_params(LowRankProjection(d, r, c)) == d * r + r * c


def test_direft_formula():
    torch.manual_seed(5)
    m = DiReFT(D, R).double()
    h = torch.randn(3, D, dtype=torch.float64)
    torch.testing.assert_close(m(h), h + m.source(h) @ m.rotation.weight, rtol=0, atol=1e-12)


def test_class_tokens_edit_prefix_and_suffix_only():
    torch.manual_seed(6)
    lengths = [9, 6, 11]
    m = ClassTokenIntervention(D, R, 5, lengths, prefix_length=2, suffix_length=3, cond_dim=C, dropout=0.0).double()
    reps = torch.zeros(3, 11, D, dtype=torch.float64)
    for i, n in enumerate(lengths):
        reps[i, :n] = torch.randn(n, D, dtype=torch.float64)
    f = torch.randn(4, C, dtype=torch.float64)
    out = m(reps, f)
    assert out.shape == (4, 3, 11, 5)
    proj = m.projection
    for i, n in enumerate(lengths):
        pre = m.prefix(reps[i, :2], f)
        suf = m.suffix(reps[i, n - 3 : n], f)
        torch.testing.assert_close(out[:, i, :2], proj(pre), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[:, i, n - 3 : n], proj(suf), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[:, i, 2 : n - 3], proj(reps[i, 2 : n - 3]).expand(4, -1, -1))
        assert torch.all(out[:, i, n:] == 0)  # padding stays empty


def test_bad_inputs_raise_value_error_naming_them():
    with pytest.raises(ValueError, match="rank"):
        LoReFT(4, 5)
    with pytest.raises(ValueError, match="dropout"):
        ConditionalIntervention(8, 2, 3, dropout=1.5)
    with pytest.raises(ValueError, match="condition"):
        ConditionalIntervention(8, 2, 3)(torch.randn(2, 8), torch.randn(2, 4))
    with pytest.raises(ValueError, match="lengths"):
        ClassTokenIntervention(8, 2, 4, [3, 9], prefix_length=2, suffix_length=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_orthonormal_rotation_survives_a_cast_to_half_precision(dtype):
    """A model cast to bf16/fp16 after injection: R is formed in fp32 (torch has no half-precision Householder
    product), stays orthonormal to the dtype's rounding, trains, and keeps its state-dict keys."""
    torch.manual_seed(0)
    module = LoReFT(16, 4, orthogonal=True)
    keys = list(module.state_dict())
    h = torch.randn(3, 16)
    want = module(h)
    module = module.to(dtype)
    r = module.rotation.weight
    assert r.dtype == dtype and list(module.state_dict()) == keys
    torch.testing.assert_close(r.float() @ r.float().T, torch.eye(4), atol=1e-2, rtol=0)
    got = module(h.to(dtype))
    torch.testing.assert_close(got.float(), want.detach(), atol=5e-2, rtol=5e-2)
    got.float().square().sum().backward()
    assert module.rotation.proj.parametrizations.weight.original.grad.abs().sum() > 0
