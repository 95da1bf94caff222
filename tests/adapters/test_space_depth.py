"""SD-Trans: identity at init, slice locality in every block (windowed, padded, global), D = 1, slice order."""

import pytest
import torch
from tiny_models import tiny_monai_vit, tiny_sam_encoder, tiny_timm_vit

import medadapt as ma
from medadapt.adapters.space_depth import SpaceDepthAttention, volume_slices


class Holder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.image_encoder = encoder


def sam_3d(depth_pos_embed=0, **enc_kwargs):
    torch.manual_seed(0)
    model = Holder(tiny_sam_encoder(**enc_kwargs).eval())
    return ma.inject(model, ma.MedSAConfig(space_depth=True, depth_pos_embed=depth_pos_embed))


def randomise_adapters(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def per_slice(vol):
    b, c, d, h, w = vol.shape
    return vol.transpose(1, 2).reshape(b * d, c, h, w)


@pytest.mark.parametrize("depth_pos_embed", [0, 8])  # the depth position embedding starts at zero too
def test_volume_in_per_slice_out_and_identity_at_init(depth_pos_embed):
    torch.manual_seed(0)
    base = tiny_sam_encoder().eval()
    vol = torch.randn(2, 3, 5, 64, 64)
    ref = base(per_slice(vol))
    model = sam_3d(depth_pos_embed)
    out = model.image_encoder(vol)
    assert out.shape == (2, 5, 32, 8, 8)
    assert torch.equal(out.reshape(10, 32, 8, 8), ref)
    assert torch.equal(model.image_encoder(per_slice(vol)), ref)  # 4D input behaves as before


@pytest.mark.parametrize("enc_kwargs", [{}, {"img_size": 48, "window_size": 4}, {"window_size": 3}],
                         ids=["windows", "grid6", "padded-windows"])
def test_slice_locality_in_every_block(enc_kwargs):
    """Perturb slice s at position p: after one block, other slices change only at p (and do change there)."""
    model = sam_3d(depth_pos_embed=4, **enc_kwargs)
    randomise_adapters(model)
    enc = model.image_encoder
    grid = enc_kwargs.get("img_size", 64) // 8
    b, d, c = 2, 4, 48
    kinds = set()
    for block in enc.blocks:
        kinds.add(block.window_size)
        x = torch.randn(b * d, grid, grid, c)
        s, (i, j) = 2, (grid - 1, 1)
        y = x.clone()
        y[1 * d + s, i, j] += 1.0  # volume 1, slice s, position p
        with volume_slices(block, d, b * d), torch.no_grad():
            diff = (block(y) - block(x)).abs().reshape(b, d, grid, grid, c).amax(-1)
        assert diff[0].max() == 0  # the other volume is untouched
        others = torch.cat([diff[1, :s], diff[1, s + 1:]])
        assert (others[:, i, j] > 0).all()  # the depth branch mixes slices at p
        others[:, i, j] = 0
        assert others.max() == 0, f"window_size={block.window_size}: depth branch leaked to other positions"
    assert kinds == {0, enc_kwargs.get("window_size", 4)}


def test_single_slice_volume_equals_2d_even_when_trained():
    model = sam_3d(depth_pos_embed=2)
    randomise_adapters(model)
    vol = torch.randn(2, 3, 1, 64, 64)
    out = model.image_encoder(vol)
    assert out.shape == (2, 1, 32, 8, 8)
    torch.testing.assert_close(out[:, 0], model.image_encoder(vol[:, :, 0]), rtol=0, atol=1e-6)


def test_slice_order_matters_only_with_depth_position_embedding():
    vol = torch.randn(1, 3, 4, 64, 64)
    perm = torch.tensor([2, 0, 3, 1])
    for pos, equivariant in ((0, True), (4, False)):
        model = sam_3d(depth_pos_embed=pos)
        randomise_adapters(model)
        with torch.no_grad():
            out = model.image_encoder(vol)[:, perm]
            out_perm = model.image_encoder(vol[:, :, perm])
        assert torch.allclose(out, out_perm, atol=1e-5) == equivariant


def test_too_many_slices_for_the_position_embedding():
    model = sam_3d(depth_pos_embed=2)
    with pytest.raises(ValueError, match="depth_pos_embed"):
        model.image_encoder(torch.randn(1, 3, 3, 64, 64))


def test_depth_branch_disabled_and_removed():
    torch.manual_seed(0)
    base = tiny_sam_encoder().eval()
    vol = torch.randn(1, 3, 3, 64, 64)
    ref = base(per_slice(vol)).reshape(1, 3, 32, 8, 8)
    model = sam_3d()
    randomise_adapters(model)
    with ma.disable_adapters(model):
        assert torch.equal(model.image_encoder(vol), ref)
    ma.remove_adapters(model)
    assert not any(isinstance(m, SpaceDepthAttention) for m in model.modules())
    assert torch.equal(model.image_encoder(per_slice(vol)), ref.reshape(3, 32, 8, 8))
    assert not model.image_encoder._forward_pre_hooks and not model.image_encoder._forward_hooks


def test_gradients_reach_depth_adapter():
    model = sam_3d(depth_pos_embed=3)
    model.image_encoder(torch.randn(1, 3, 3, 64, 64)).square().mean().backward()
    att = model.image_encoder.blocks[0].attn
    assert isinstance(att, SpaceDepthAttention)
    assert att.depth_adapter.up.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n and "adapter" not in n)


@pytest.mark.parametrize("host", ["timm", "monai"])
def test_token_sequence_hosts(host):
    torch.manual_seed(0)
    if host == "timm":
        base, vol = tiny_timm_vit().eval(), torch.randn(2, 3, 3, 32, 32)
    else:
        from monai.networks.nets import ViT

        base = ViT(in_channels=1, img_size=(16, 16), patch_size=(8, 8), hidden_size=48, mlp_dim=96, num_layers=2,
                   num_heads=3, spatial_dims=2, classification=False).eval()
        vol = torch.randn(2, 1, 3, 16, 16)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    ref = first(base(per_slice(vol)))
    ma.inject(base, ma.MedSAConfig(space_depth=True, depth_pos_embed=3))
    out = first(base(vol))
    assert out.shape == (2, 3, *ref.shape[1:])
    assert torch.equal(out.reshape(ref.shape), ref)
    randomise_adapters(base)
    blocks = base.blocks
    x = torch.randn(2 * 3, 5, 48)
    y = x.clone()
    y[3 + 1, 2] += 1.0  # volume 1, slice 1, token 2
    with volume_slices(blocks[0], 3, 6), torch.no_grad():
        diff = (blocks[0](y) - blocks[0](x)).abs().reshape(2, 3, 5, 48).amax(-1)
    assert diff[0].max() == 0 and (diff[1, [0, 2], 2] > 0).all()
    diff[1, [0, 2], 2] = 0
    assert diff[1, [0, 2]].max() == 0


def test_3d_native_encoder_keeps_its_volume_input():
    torch.manual_seed(0)
    vit = tiny_monai_vit().eval()  # spatial_dims=3: a 5D input is one volume, not a stack of slices
    x = torch.randn(1, 1, 16, 16, 16)
    ref = vit(x)[0]
    ma.inject(vit, ma.MedSAConfig(space_depth=True))
    assert torch.equal(vit(x)[0], ref)


def _timm_sd(**config):
    torch.manual_seed(0)
    model = tiny_timm_vit().double()
    ma.inject(model, ma.MedSAConfig(space_depth=True, **config))
    randomise_adapters(model)
    return model.double()


def test_gradient_checkpointing_gives_the_same_gradients():
    """timm recomputes checkpointed blocks in backward, after the encoder call: the depth branch must run there too."""
    model = _timm_sd(depth_pos_embed=3)
    vol = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)

    def grads(checkpointing):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        model.train()
        model(vol).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and any("depth_adapter" in n for n in plain)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-10, atol=1e-12, msg=n)


def test_image_call_after_a_volume_call_takes_no_depth_branch():
    model = _timm_sd().eval()
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(images)
        model(torch.randn(1, 3, 4, 32, 32, dtype=torch.float64))  # the slice count stays set after this call
        assert torch.equal(model(images), before)


def test_a_volume_given_by_keyword_is_split_like_a_positional_one():
    model = _timm_sd().eval()
    volume = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x=volume), model(volume), rtol=0, atol=0)


def test_modules_to_save_copy_of_a_block_runs_its_depth_branch():
    """modules_to_save deep-copies the block after SD-Trans wrapped it; the trained copy's branch must run."""
    model = _timm_sd(modules_to_save=["blocks.1"]).eval()
    branch = model.blocks[1].trained.attn
    assert isinstance(branch, SpaceDepthAttention) and branch.depth_adapter.up.weight.requires_grad
    vol = torch.randn(1, 3, 4, 32, 32, dtype=torch.float64)
    model(vol).square().sum().backward()
    assert branch.depth_adapter.up.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = model(vol)
        branch.depth_adapter.up.weight.mul_(3)
        assert not torch.allclose(model(vol), out)


def test_depth_branch_leaves_host_hooks_and_saved_attention_alone():
    """The depth branch reuses the host attention's forward; MONAI's att_mat and hooks keep the space attention."""
    from monai.networks.nets import ViT

    from medadapt.adapters.space_depth import innermost

    torch.manual_seed(0)
    vit = ViT(in_channels=1, img_size=(16, 16), patch_size=(4, 4), hidden_size=48, mlp_dim=96, num_layers=1,
              num_heads=3, spatial_dims=2, save_attn=True).eval()
    ma.inject(vit, ma.MedSAConfig(space_depth=True))
    randomise_adapters(vit)
    sab = innermost(vit.blocks[0].attn)
    calls = []
    sab.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    with torch.no_grad():
        vit(torch.randn(2, 1, 3, 16, 16))
    assert calls == [(6, 16, 48)]  # the space call only
    assert sab.att_mat.shape == (6, 3, 16, 16)
    assert vit.blocks[0].attn.att_mat is sab.att_mat  # read through the wrappers


def test_space_depth_on_unetr_warns_that_the_depth_branch_is_unreachable():
    import warnings

    from monai.networks.nets import UNETR
    from tiny_models import tiny_sam

    torch.manual_seed(0)
    unetr = UNETR(in_channels=1, out_channels=2, img_size=(16, 16, 16), feature_size=8, hidden_size=48, mlp_dim=96,
                  num_heads=3)
    with pytest.warns(UserWarning, match=r"vit itself"):
        ma.inject(unetr, ma.MedSAConfig(space_depth=True))
    with warnings.catch_warnings():  # a 2D encoder inside a model gets volumes by direct calls: no warning
        warnings.simplefilter("error")
        ma.inject(tiny_sam(depth=2), ma.MedSAConfig(space_depth=True))
        ma.inject(tiny_monai_vit(), ma.MedSAConfig(space_depth=True))  # the 3D encoder itself: no warning
