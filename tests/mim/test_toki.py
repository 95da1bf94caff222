"""TOKI: against a plain loop of each exponent convention, visible tokens untouched, layout, vectorisation."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medadapt.mim import TOKI, toki, toki_grid


def loop_toki(x, visible, A, exponent):
    """METHODS.md §3 written as loops over samples, segments and tokens, with matrix powers."""
    batch, length, channels = x.shape
    out = x.clone()
    for b in range(batch):
        anchors = [l for l in range(length) if visible[b, l] or l in (0, length - 1)]
        for n, i in enumerate(anchors):
            nxt = anchors[n + 1] if n + 1 < len(anchors) else length
            g = nxt - i
            alpha = [j / (g - 1) if g > 1 else 0.0 for j in range(g)]
            y_end = x[b, nxt] if nxt < length else x[b, i]
            xt = [(1 - a) * x[b, i] + a * y_end for a in alpha]
            for j in range(g):
                if visible[b, i + j]:
                    continue
                z = torch.zeros(channels, dtype=x.dtype)
                for m in range(j + 1):
                    power = j - m if exponent == "causal" else g - 1 - m
                    z = z + torch.linalg.matrix_power(A, power) @ xt[m]
                out[b, i + j] = z
    return out


def _case(seed, batch=3, length=29, channels=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=gen, dtype=torch.float64)
    visible = torch.rand(batch, length, generator=gen) < 0.3
    visible[0, 0] = False  # first/last positions masked in one sample, visible in another
    visible[0, -1] = False
    visible[1, 0] = visible[1, -1] = True
    A = torch.randn(channels, channels, generator=gen, dtype=torch.float64) * 0.4
    return x, visible, A


@pytest.mark.parametrize("exponent", ["causal", "official"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_plain_loop(exponent, seed):
    x, visible, A = _case(seed)
    torch.testing.assert_close(toki(x, visible, A, exponent), loop_toki(x, visible, A, exponent),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("exponent", ["causal", "official"])
def test_visible_tokens_unchanged(exponent):
    x, visible, A = _case(2)
    out = toki(x, visible, A, exponent)
    assert torch.equal(out[visible], x[visible])
    assert not torch.equal(out[~visible], x[~visible])


def test_zero_A_causal_is_linear_interpolation_and_official_is_sparse():
    x = torch.randn(1, 8, 3, dtype=torch.float64)
    visible = torch.tensor([[True, False, False, False, True, False, False, True]])
    A = torch.zeros(3, 3, dtype=torch.float64)
    causal, official = toki(x, visible, A, "causal"), toki(x, visible, A, "official")
    for l, alpha in ((1, 1 / 3), (2, 2 / 3), (3, 1.0)):  # segment 0..4, g = 4
        torch.testing.assert_close(causal[0, l], (1 - alpha) * x[0, 0] + alpha * x[0, 4])
    torch.testing.assert_close(causal[0, 5], 0.5 * x[0, 4] + 0.5 * x[0, 7])  # segment 4..7, g = 3
    assert torch.equal(official[0, 1:3], torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(official[0, 3], x[0, 4])  # last token of its segment: A^0 x̃_{g-1}


def test_layout_channels_stay_with_their_token():
    """Public defect 1: a token's output mixes only its anchors' same channels (A = 0, causal)."""
    length, channels = 9, 4
    f = torch.arange(length, dtype=torch.float64) ** 2 + 1  # per-token factor
    g = torch.tensor([1.0, -2.0, 10.0, 0.5], dtype=torch.float64)  # per-channel factor
    x = (f[:, None] * g[None, :]).unsqueeze(0)
    visible = torch.zeros(1, length, dtype=torch.bool)
    visible[0, [0, 3, 8]] = True
    out = toki(x, visible, torch.zeros(channels, channels, dtype=torch.float64))
    interp = out[0] / g  # must be the same per-token scalar in every channel
    assert torch.allclose(interp, interp[:, :1].expand_as(interp))
    torch.testing.assert_close(interp[1, 0], f[0] + (f[3] - f[0]) / 2)


def test_grid_form_keeps_visible_cells_and_transposes_back():
    """Public defect 1 at the map level: (B, C, g³) → tokens → TOKI → the same cell's channels."""
    gen = torch.Generator().manual_seed(3)
    feature = torch.randn(2, 7, 3, 2, 3, generator=gen, dtype=torch.float64)
    visible = torch.rand(2, 3, 2, 3, generator=gen) < 0.5
    A = torch.randn(7, 7, generator=gen, dtype=torch.float64) * 0.3
    out = toki_grid(feature, visible, A, "causal")
    keep = visible.unsqueeze(1).expand_as(feature)
    assert torch.equal(out[keep], feature[keep])
    tokens = loop_toki(feature.flatten(2).transpose(1, 2), visible.flatten(1), A, "causal")
    torch.testing.assert_close(out, tokens.transpose(1, 2).reshape(feature.shape))


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.matmul.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _matmuls(visible, channels=4):
    x = torch.randn(*visible.shape, channels)
    with _CountMatmuls() as counter:
        toki(x, visible, torch.randn(channels, channels))
    return counter.count


def test_vectorised_no_loop_over_gaps_or_samples():
    """Public defect 4: work is one matmul per power (longest gap), not per gap or per sample."""
    one_gap = torch.zeros(1, 40, dtype=torch.bool)
    one_gap[0, [0, 6, 39]] = True  # longest segment 33
    many = one_gap.repeat(5, 1)
    many[1:, 7:30:2] = True  # many short gaps in other samples, same longest segment
    assert _matmuls(one_gap) == _matmuls(many) == 33 - 1


def test_gradients_reach_A_and_tokens_from_zero_init():
    module = TOKI(4)
    assert torch.equal(module.A, torch.zeros(4, 4))
    x = torch.randn(2, 12, 4, requires_grad=True)
    visible = torch.zeros(2, 12, dtype=torch.bool)
    visible[:, [2, 7]] = True
    module(x, visible).square().sum().backward()
    assert module.A.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_all_visible_is_identity():
    x = torch.randn(2, 5, 3)
    assert torch.equal(toki(x, torch.ones(2, 5, dtype=torch.bool), torch.randn(3, 3)), x)


@pytest.mark.parametrize("args, word", [
    ((torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool), torch.zeros(3, 3)), "x must"),
    ((torch.randn(2, 5, 3), torch.ones(2, 5), torch.zeros(3, 3)), "visible"),
    ((torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.bool), torch.zeros(4, 4)), "A must"),
])
def test_bad_inputs_raise(args, word):
    with pytest.raises(ValueError, match=word):
        toki(*args)


def test_bad_exponent_raises():
    with pytest.raises(ValueError, match="exponent"):
        TOKI(3, exponent="acausal")


def test_causal_is_the_default_exponent_of_the_module_and_the_config():
    """METHODS.md §3: ``exponent="causal"`` is the default everywhere, not only for ``toki()``."""
    from medadapt.mim import MambaMIMConfig
    from medadapt.mim.pretrain import build_parser

    module = TOKI(5)
    assert module.exponent == "causal" and MambaMIMConfig().toki_exponent == "causal"
    assert build_parser().parse_args([]).toki_exponent == "causal"
    x, visible, A = _case(3)
    with torch.no_grad():
        module.A.copy_(A.float())
    x = x.float()
    causal, official = toki(x, visible, module.A, "causal"), toki(x, visible, module.A, "official")
    assert not torch.allclose(causal, official)
    torch.testing.assert_close(module(x, visible), causal, rtol=0, atol=0)
    grid = x[:1, :27].transpose(1, 2).reshape(1, 5, 3, 3, 3)
    cells = visible[:1, :27].reshape(1, 3, 3, 3)
    torch.testing.assert_close(module.fill_grid(grid, cells), toki_grid(grid, cells, module.A, "causal"),
                               rtol=0, atol=0)
