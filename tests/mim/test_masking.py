"""Bottom-up hybrid masking: counts, raster order, upsampling, visible-only normalisation."""

import pytest
import torch
from torch import nn

from medadapt.mim import (
    gather_visible_tokens,
    random_visible_mask,
    scatter_visible_tokens,
    upsample_mask,
    visible_count,
    visible_norm,
)
from medadapt.mim.hooks import MaskingHooks
from medadapt.mim.targets import EncoderSpec
from medadapt.models import LayerNorm3d


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_every_sample_keeps_round_one_minus_ratio(batch):
    visible = random_visible_mask(batch, (6, 6, 6), 0.75, torch.Generator().manual_seed(batch))
    assert visible.shape == (batch, 6, 6, 6) and visible.dtype == torch.bool
    assert visible.flatten(1).sum(1).tolist() == [54] * batch
    assert visible_count(216, 0.75) == 54 and visible_count(27, 0.75) == 7 and visible_count(8, 0.99) == 1


def test_masks_differ_between_samples():
    visible = random_visible_mask(4, (3, 3, 3), 0.5, torch.Generator().manual_seed(0))
    assert len({tuple(v.flatten().tolist()) for v in visible}) == 4


def test_upsample_mask_repeats_cells_into_blocks():
    visible = torch.tensor([[[[True, False]], [[False, True]]]])  # (1, 2, 1, 2)
    up = upsample_mask(visible, (4, 2, 6))
    assert up.shape == (1, 1, 4, 2, 6)
    assert up[0, 0, :2, :, :3].all() and not up[0, 0, :2, :, 3:].any()
    assert not up[0, 0, 2:, :, :3].any() and up[0, 0, 2:, :, 3:].all()
    with pytest.raises(ValueError, match="multiple"):
        upsample_mask(visible, (3, 2, 6))


def test_gather_is_per_sample_raster_order_and_scatter_inverts():
    """Public defects 2 and 3: per-sample counts and raster (ascending) order, for any batch size."""
    gen = torch.Generator().manual_seed(1)
    visible = random_visible_mask(5, (3, 2, 4), 0.6, gen).flatten(1)
    tokens = torch.arange(24.0).view(1, 24, 1).expand(5, 24, 2) + torch.arange(5.0).view(5, 1, 1) * 100
    kept, index = gather_visible_tokens(tokens, visible)
    assert kept.shape == (5, 10, 2)
    assert (index.diff(dim=1) > 0).all()
    for b in range(5):
        positions = visible[b].nonzero().squeeze(1)
        assert torch.equal(index[b], positions)
        assert torch.equal(kept[b, :, 0], positions.float() + 100 * b)
    full = scatter_visible_tokens(kept, index, 24)
    assert torch.equal(full[visible], tokens[visible]) and not full[~visible].any()


def test_gather_rejects_unequal_counts():
    visible = torch.tensor([[True, False], [True, True]])
    with pytest.raises(ValueError, match="same count"):
        gather_visible_tokens(torch.randn(2, 2, 3), visible)


def _manual_norm(x, m, dims, weight, bias, eps, groups=None):
    if groups is not None:  # group norm: fold channels into groups
        b, c = x.shape[:2]
        xg, mg = x.reshape(b, groups, -1), m.expand_as(x).reshape(b, groups, -1)
        vals = [[xg[i, g][mg[i, g]] for g in range(groups)] for i in range(b)]
        mean = torch.stack([torch.stack([v.mean() for v in row]) for row in vals])
        var = torch.stack([torch.stack([v.var(unbiased=False) for v in row]) for row in vals])
        y = (xg - mean[..., None]) / torch.sqrt(var[..., None] + eps)
        y = y.view_as(x)
    else:
        xm = x.masked_fill(~m, float("nan"))
        mean = xm.nanmean(dims, keepdim=True)
        var = ((xm - mean) ** 2).nanmean(dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + eps)
    shape = (1, -1, 1, 1, 1)
    return (y * weight.view(shape) + bias.view(shape)) * m


@pytest.mark.parametrize("kind", ["group", "instance", "batch", "layer"])
def test_visible_norm_uses_visible_statistics_only(kind):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, 2, 6, dtype=torch.float64)
    m = upsample_mask(random_visible_mask(3, (2, 1, 3), 0.5, torch.Generator().manual_seed(2)), (4, 2, 6))
    weight, bias = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    module = {"group": nn.GroupNorm(2, 4), "instance": nn.InstanceNorm3d(4, affine=True),
              "batch": nn.BatchNorm3d(4), "layer": LayerNorm3d(4)}[kind].double()
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    out = visible_norm(module, x, m)
    eps = module.eps
    expected = {
        "group": lambda: _manual_norm(x, m, None, weight, bias, eps, groups=2),
        "instance": lambda: _manual_norm(x, m, (2, 3, 4), weight, bias, eps),
        "batch": lambda: _manual_norm(x, m, (0, 2, 3, 4), weight, bias, eps),
        "layer": lambda: module.forward(x) * m,
    }[kind]()
    torch.testing.assert_close(out, expected)
    garbage = x.masked_fill(~m, 1e3)  # masked voxels must not influence visible outputs
    torch.testing.assert_close(visible_norm(module, garbage, m), out)


def test_batch_norm_running_stats_from_visible_voxels():
    torch.manual_seed(0)
    bn = nn.BatchNorm3d(2, momentum=0.5).double()
    x = torch.randn(2, 2, 2, 2, 2, dtype=torch.float64)
    m = torch.zeros(2, 1, 2, 2, 2, dtype=torch.bool)
    m[0, 0, 0] = True
    visible_norm(bn, x, m)
    values = x.permute(1, 0, 2, 3, 4)[:, m[:, 0]]  # (C, n_visible)
    torch.testing.assert_close(bn.running_mean, 0.5 * values.mean(1))
    torch.testing.assert_close(bn.running_var, 0.5 + 0.5 * values.var(1, unbiased=True))
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("momentum", [None, 0.1])
def test_hooked_running_stats_match_torch_with_everything_visible(norm, momentum):
    """InstanceNorm: momentum=None is 0 (stats unchanged), num_batches_tracked stays 0; BatchNorm: cumulative."""
    make = {"instance": lambda: nn.InstanceNorm3d(3, momentum=momentum, track_running_stats=True, affine=True),
            "batch": lambda: nn.BatchNorm3d(3, momentum=momentum)}[norm]
    reference, hooked = make().double(), nn.Sequential(make()).double()
    hooks = MaskingHooks(hooked, EncoderSpec(feature_modules=("0",)))
    torch.manual_seed(0)
    for _ in range(3):
        x = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64) * 2 + 1
        expected = reference(x)
        with hooks.masking(torch.ones(2, 2, 2, 2, dtype=torch.bool)):
            out = hooked(x)
        torch.testing.assert_close(out, expected)
    module = hooked[0]
    torch.testing.assert_close(module.running_mean, reference.running_mean)
    torch.testing.assert_close(module.running_var, reference.running_var)
    assert int(module.num_batches_tracked) == int(reference.num_batches_tracked)
