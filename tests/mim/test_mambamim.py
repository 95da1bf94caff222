"""MambaMIM around unmodified encoders: exact zeros per scale, tokens reaching Mamba, loss, grads, detach."""

import pytest
import torch
from torch import nn

from medadapt.mim import MambaMIM, MambaMIMConfig, masked_patch_mse, normalised_patch_targets, upsample_mask
from medadapt.models import HybridMambaEncoder


def _encoder(norm=None, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(channels=(2, 3, 4, 4, 6), depths=(1, 1, 1, 0, 1), expansions=(2, 2, 2, 2, 2),
                  mamba_depth=1, d_state=2, mlp_ratio=1.0)
    if norm is not None:
        kwargs["norm_layer"] = norm
    return HybridMambaEncoder(**kwargs)


NORMS = {"layer": None, "group": lambda c: nn.GroupNorm(1, c), "batch": nn.BatchNorm3d,
         "instance": lambda c: nn.InstanceNorm3d(c, affine=True)}


def _record_outputs(encoder):
    seen = {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
               for n, m in encoder.named_modules() if n]
    return seen, handles


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_masked_patches_exactly_zero_at_every_cnn_scale(norm):
    encoder = _encoder(NORMS[norm])
    mim = MambaMIM(encoder, MambaMIMConfig(mask_ratio=0.5))
    assert mim.patch_size == 16
    seen, _ = _record_outputs(encoder)  # registered after MambaMIM's hooks: sees what the next op sees
    volume = torch.rand(2, 1, 32, 32, 48) + 0.5
    visible = mim.random_mask(volume, torch.Generator().manual_seed(0))
    mim(volume, visible)
    maps = {n: o for n, o in seen.items() if torch.is_tensor(o) and o.dim() == 5}
    assert {o.shape[2] for o in maps.values()} == {32, 16, 8, 4, 2}
    for name, out in maps.items():
        keep = upsample_mask(visible, out.shape[2:])
        assert not out.masked_select(~keep).any(), name
        assert out.masked_select(keep).abs().sum() > 0, name


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_same_visible_tokens_reach_mamba_as_a_batch_of_one(batch):
    """Public defects 2 and 3: per-sample counts, raster order, batch-size independence."""
    encoder = _encoder(NORMS["group"])
    mim = MambaMIM(encoder)
    sequence = encoder.get_submodule(encoder.sequence_module_name)
    full, kept = [], []
    sequence.register_forward_pre_hook(lambda m, a: full.append(a[0]), prepend=True)  # before the gather
    sequence.register_forward_pre_hook(lambda m, a: kept.append(a[0]))  # what Mamba receives
    volume = torch.rand(batch, 1, 32, 48, 32)
    visible = mim.random_mask(volume, torch.Generator().manual_seed(batch))
    with torch.no_grad():
        mim(volume, visible)
        singles = []
        for b in range(batch):
            mim(volume[b:b + 1], visible[b:b + 1])
            singles.append(kept[-1])
    tokens, grid_tokens = kept[0], full[0]
    assert tokens.shape == (batch, round(0.25 * 12), 6)
    for b in range(batch):
        order = visible[b].flatten().nonzero().squeeze(1)  # raster order
        assert torch.equal(tokens[b], grid_tokens[b, order])
        torch.testing.assert_close(tokens[b:b + 1], singles[b], rtol=1e-5, atol=1e-6)


def test_loss_ignores_visible_patches_and_targets_are_patch_normalised():
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(2, 1, 8, 8, 12, generator=gen) * 3 + 1
    target, mean, std = normalised_patch_targets(volume, 4)
    assert target.shape == (2, 12, 64)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 12), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(-1), torch.ones(2, 12), atol=1e-3, rtol=0)
    visible = torch.rand(2, 12, generator=gen) < 0.5
    rec = torch.randn(2, 12, 64, generator=gen, requires_grad=True)
    loss = masked_patch_mse(rec, target, visible)
    loss.backward()
    assert not rec.grad[visible].any() and rec.grad[~visible].abs().sum() > 0
    wild = rec.detach().clone()
    wild[visible] = float("nan")
    torch.testing.assert_close(masked_patch_mse(wild, target, visible), loss.detach())
    manual = ((rec.detach() - target) ** 2).mean(-1)[~visible].mean()
    torch.testing.assert_close(loss.detach(), manual)


def test_gradients_reach_toki_A_and_the_encoder():
    encoder = _encoder()
    mim = MambaMIM(encoder)
    assert torch.equal(mim.toki.A, torch.zeros(6, 6))
    mim(torch.rand(2, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0)).backward()
    assert mim.toki.A.grad.abs().sum() > 0
    for name in ("stages.0.stem.weight", "stages.2.blocks.0.conv_expand.weight",
                 "mamba_stage.sequence.layers.0.mixer.in_proj.weight", "mamba_stage.sequence.layers.0.mixer.A_log"):
        assert encoder.get_parameter(name).grad.abs().sum() > 0, name


def test_wrapping_is_invisible_until_masking_and_detach_returns_the_untouched_encoder():
    encoder = _encoder()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = encoder(x)
        keys = list(encoder.state_dict())
        mim = MambaMIM(encoder)
        torch.testing.assert_close(encoder(x), before, rtol=0, atol=0)  # hooks idle without a mask
        mim(torch.rand(2, 1, 32, 32, 32))
        detached = mim.detach()
        assert detached is encoder and list(detached.state_dict()) == keys
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in encoder.modules())
        plain = _encoder(seed=1)
        plain.load_state_dict(detached.state_dict(), strict=True)
        torch.testing.assert_close(plain(x), encoder(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="detached"):
        mim(x)


def test_reconstruct_outputs_and_deterministic_masks():
    mim = MambaMIM(_encoder())
    volume = torch.rand(1, 1, 32, 32, 32)
    out = mim.reconstruct(volume, generator=torch.Generator().manual_seed(4))
    assert out["reconstruction"].shape == volume.shape and out["visible"].sum() == 2
    keep = upsample_mask(out["visible"], volume.shape[2:])
    assert torch.equal(out["merged"][keep], volume[keep]) and not out["masked"][~keep].any()
    again = mim.reconstruct(volume, generator=torch.Generator().manual_seed(4))
    assert torch.equal(again["visible"], out["visible"])


def test_reconstruct_leaves_batch_norm_buffers_and_training_flags_unchanged(monkeypatch):
    mim = MambaMIM(_encoder(NORMS["batch"]), MambaMIMConfig(mask_ratio=0.5))
    mim.train()
    mim.encoder.get_submodule(mim.spec.feature_modules[0]).eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in mim.named_modules()}
    buffers = {name: b.clone() for name, b in mim.named_buffers()}
    assert any(isinstance(m, nn.BatchNorm3d) for m in mim.encoder.modules())
    out = mim.reconstruct(torch.rand(2, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    for name, buffer in mim.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert {name: m.training for name, m in mim.named_modules()} == modes

    def fail(volume, visible):
        assert not mim.encoder.training
        raise RuntimeError("boom")

    monkeypatch.setattr(mim, "_reconstruct", fail)
    with pytest.raises(RuntimeError, match="boom"):
        mim.reconstruct(torch.rand(1, 1, 32, 32, 32))
    assert {name: m.training for name, m in mim.named_modules()} == modes


def test_monai_segresnet_is_detected_and_masked():
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = monai_nets.SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2,
                               blocks_down=(1, 1, 1), blocks_up=(1, 1))
    mim = MambaMIM(net, MambaMIMConfig(mask_ratio=0.5))
    assert mim.spec.encode_method == "encode" and mim.patch_size == 4 and mim.feature_strides == [1, 2, 4]
    seen, _ = _record_outputs(net)
    volume = torch.rand(2, 1, 16, 8, 8)
    visible = mim.random_mask(volume, torch.Generator().manual_seed(0))
    mim(volume, visible).backward()
    checked = [n for n, o in seen.items() if torch.is_tensor(o) and o.dim() == 5]
    assert any(n.startswith("down_layers.2") for n in checked)
    for name in checked:
        keep = upsample_mask(visible, seen[name].shape[2:])
        assert not seen[name].masked_select(~keep).any(), name
    assert mim.toki.A.grad.abs().sum() > 0


def test_user_given_targets_on_an_unknown_encoder():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv3d(1, 4, 3, padding=1)
            self.down = nn.Conv3d(4, 8, 2, stride=2)

        def forward(self, x):
            return self.down(torch.relu(self.first(x)))

    with pytest.raises(ValueError, match="feature_modules"):
        MambaMIM(Plain())
    with pytest.raises(ValueError, match="no submodule"):
        MambaMIM(Plain(), MambaMIMConfig(feature_modules=["nope"]))
    mim = MambaMIM(Plain(), MambaMIMConfig(feature_modules=["first", "down"], patch_size=2))
    assert mim.feature_channels == [4, 8] and mim.feature_strides == [1, 2]
    assert torch.isfinite(mim(torch.rand(2, 1, 4, 4, 4)))


@pytest.mark.parametrize("kwargs, word", [(dict(mask_ratio=1.0), "mask_ratio"), (dict(patch_size=6), "patch_size"),
                                          (dict(toki_exponent="x"), "toki_exponent"),
                                          (dict(feature_modules="a"), "feature_modules")])
def test_config_validates(kwargs, word):
    with pytest.raises(ValueError, match=word):
        MambaMIMConfig(**kwargs)
    config = MambaMIMConfig(mask_ratio=0.6, feature_modules=["a"])
    assert MambaMIMConfig.from_dict(config.to_dict()) == config


def test_bad_volume_and_mask_raise():
    mim = MambaMIM(_encoder())
    with pytest.raises(ValueError, match="multiples"):
        mim(torch.rand(1, 1, 32, 32, 24))
    with pytest.raises(ValueError, match="visible"):
        mim(torch.rand(1, 1, 32, 32, 32), torch.ones(1, 2, 2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"visible: each sample needs at least one visible cell.*\[0\]"):
        mim(torch.rand(1, 1, 32, 32, 32), torch.zeros(1, 2, 2, 2, dtype=torch.bool))  # was a Conv1d error
    visible = torch.ones(2, 2, 2, 2, dtype=torch.bool)
    visible[1] = False
    with pytest.raises(ValueError, match=r"visible: each sample needs at least one visible cell.*\[1\]"):
        mim(torch.rand(2, 1, 32, 32, 32), visible)
    with pytest.raises(ValueError, match="at least one visible cell"):
        mim.reconstruct(torch.rand(2, 1, 32, 32, 32), visible)


def test_deepcopy_gets_its_own_hooks():
    import copy

    mim = MambaMIM(_encoder())
    clone = copy.deepcopy(mim)
    volume = torch.rand(1, 1, 32, 32, 32)
    visible = mim.random_mask(volume, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(clone(volume, visible), mim(volume, visible), rtol=0, atol=0)
        clone.detach()
        assert not any(m._forward_hooks for m in clone.encoder.modules())
        assert torch.isfinite(mim(volume, visible))  # the original keeps its hooks


def _norm_pix_reference(reconstruction, volume, visible, p):
    """METHODS.md §3 written out: per-patch targets ``(x − mean) / sqrt(var_unbiased + 1e-6)`` of each p³
    patch (raster order), MSE per patch, averaged over the masked patches of all samples."""
    batch = volume.shape[0]
    grid = [s // p for s in volume.shape[2:]]

    def patches(x):  # (B, L, p³·C), with C innermost as patchify does (C = 1 here)
        out = x.unfold(2, p, p).unfold(3, p, p).unfold(4, p, p)  # (B, C, gd, gh, gw, p, p, p)
        return out.permute(0, 2, 3, 4, 5, 6, 7, 1).reshape(batch, grid[0] * grid[1] * grid[2], -1)

    target = patches(volume)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (patches(reconstruction) - target).square().mean(-1)
    return per_patch[~visible.flatten(1)].mean()


def test_forward_loss_is_norm_pix_mse_over_masked_patches_only(monkeypatch):
    """MambaMIM.forward's loss = the documented formula on its own reconstruction; changing the
    reconstruction at visible patches leaves it unchanged, at masked patches changes it."""
    mim = MambaMIM(_encoder(), MambaMIMConfig(mask_ratio=0.5))
    assert mim.toki.exponent == "causal"  # the default config's TOKI
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(2, 1, 32, 32, 32, generator=gen) * 5 + 3  # far from zero mean / unit variance
    visible = mim.random_mask(volume, gen)
    assert visible.any() and (~visible).any()
    with torch.no_grad():
        reconstruction = mim._reconstruct(volume, visible)
        loss = mim(volume, visible)
    torch.testing.assert_close(loss, _norm_pix_reference(reconstruction, volume, visible, 16))
    raw = ((reconstruction - volume).square().mean((1,)).unfold(1, 16, 16).unfold(2, 16, 16).unfold(3, 16, 16)
           .mean((-3, -2, -1)))[~visible].mean()
    assert not torch.allclose(loss, raw)  # the targets are normalised, not raw intensities

    keep = upsample_mask(visible, volume.shape[2:])
    noise = torch.randn(volume.shape, generator=gen) * 10
    monkeypatch.setattr(mim, "_reconstruct", lambda v, vis: reconstruction + noise * keep)
    with torch.no_grad():
        torch.testing.assert_close(mim(volume, visible), loss)  # visible patches do not count
        monkeypatch.setattr(mim, "_reconstruct", lambda v, vis: reconstruction + noise * ~keep)
        moved = mim(volume, visible)
    torch.testing.assert_close(moved, _norm_pix_reference(reconstruction + noise * ~keep, volume, visible, 16))
    assert moved > loss + 1


class _ConvNormDown(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.first = nn.Conv3d(1, 3, 3, padding=1)
        self.norm = norm
        self.down = nn.Conv3d(3, 4, 2, stride=2)

    def forward(self, x):
        return self.down(torch.relu(self.norm(self.first(x))))


def _visible_columns(x, keep):
    """``(B, C, n, 1, 1)``: each sample's visible voxels (the same count per sample), raster order."""
    flat, mask = x.flatten(2), keep.flatten(1)
    return torch.stack([flat[b][:, mask[b]] for b in range(x.shape[0])])[..., None, None]


NORM_MODULES = {
    "batch": lambda: nn.BatchNorm3d(3, momentum=0.3),
    "batch_cumulative": lambda: nn.BatchNorm3d(3, momentum=None),
    "instance": lambda: nn.InstanceNorm3d(3, affine=True, track_running_stats=True, momentum=0.3),
    "group": lambda: nn.GroupNorm(3, 3),
}


@pytest.mark.parametrize("kind", sorted(NORM_MODULES))
def test_hooked_norms_equal_torch_norms_on_the_visible_voxels_only(kind):
    """The norm hooks MambaMIM installs: in train mode, outputs at visible voxels, zeros elsewhere, and the
    running statistics equal those of a plain torch module applied to the visible voxels alone."""
    torch.manual_seed(0)
    encoder = _ConvNormDown(NORM_MODULES[kind]()).double()
    with torch.no_grad():
        if encoder.norm.weight is not None:
            encoder.norm.weight.uniform_(0.5, 2)
            encoder.norm.bias.uniform_(-1, 1)
    reference = NORM_MODULES[kind]().double()
    reference.load_state_dict(encoder.norm.state_dict())
    mim = MambaMIM(encoder, MambaMIMConfig(feature_modules=["first", "down"], patch_size=2, mask_ratio=0.5))
    mim.double().train()
    seen = {}
    encoder.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    encoder.norm.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))  # after MambaMIM's hook
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        volume = torch.rand(2, 1, 4, 6, 4, generator=gen, dtype=torch.float64) * 4 - 1
        visible = mim.random_mask(volume, gen)
        with torch.no_grad():
            mim(volume, visible)
        keep = upsample_mask(visible, volume.shape[2:])
        x, out = seen["in"], seen["out"]
        expected = reference(_visible_columns(x, keep))
        assert not out.masked_select(~keep).any()
        torch.testing.assert_close(_visible_columns(out, keep), expected)
        with torch.no_grad(), mim._hooks.masking(visible):  # masked voxels' values do not matter
            again = encoder.norm(x.masked_fill(~keep, 1e3))
        torch.testing.assert_close(again, out)
        reference(_visible_columns(x, keep))  # the extra call above updated the stats a second time
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(encoder.norm.get_buffer(name), buffer, msg=name)
    mim.eval()
    reference.eval()
    with torch.no_grad():
        mim(volume, visible)  # eval: running statistics (where tracked) normalise, none is updated
    torch.testing.assert_close(_visible_columns(seen["out"], keep), reference(_visible_columns(seen["in"], keep)))
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(encoder.norm.get_buffer(name), buffer, msg=name)
