"""Med-SA's formulas with trained (non-zero) adapters against references written from METHODS.md, in float64,
and the exact trainable-parameter figures the README reports for SAM ViT-B."""

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("segment_anything")

from segment_anything.modeling.image_encoder import window_partition, window_unpartition  # noqa: E402
from tiny_models import tiny_sam_encoder  # noqa: E402

import medadapt as ma  # noqa: E402
from medadapt.adapters.space_depth import volume_slices  # noqa: E402
from medadapt.core.params import trainable_parameters  # noqa: E402

ADAPTER_VIT_B = 2 * 768 * 192 + 192 + 768  # 295,872


def _adapter(module, v):
    """``W_up · gelu(W_down v + b_down) + b_up`` (METHODS.md §1)."""
    return F.linear(F.gelu(F.linear(v, module.down.weight, module.down.bias)), module.up.weight, module.up.bias)


def _attention(attn, seq):
    """Multi-head softmax attention over ``seq (N, L, C)`` with SAM's qkv/proj weights, no position terms."""
    n, length, c = seq.shape
    q, k, v = attn.qkv(seq).reshape(n, length, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(n, length, c))


def _randomised(model, seed=7):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model


@pytest.mark.parametrize("block_index", [0, 1])  # windowed (4×4 windows, padded: 7×7 tokens), global
def test_sam_block_with_trained_adapters_matches_the_formula(block_index):
    """``h = x + A(Attn(LN1 x))`` with ``A(a) = a + Adapter(a)`` on the (window-partitioned) attention output;
    ``y = h + MLP(LN2 h) + 0.5 · Adapter(LN2 h)``."""
    torch.manual_seed(0)
    encoder = tiny_sam_encoder(img_size=56, global_attn_indexes=(1,)).double().eval()
    base = copy.deepcopy(encoder.blocks[block_index])
    _randomised(ma.inject(encoder, ma.MedSAConfig()))
    block = encoder.blocks[block_index]
    space, mlp = block.attn.adapter, block.mlp.adapter
    x = torch.randn(2, 7, 7, 48, dtype=torch.float64)
    t = base.norm1(x)
    if base.window_size > 0:
        t, pad = window_partition(t, base.window_size)
    a = base.attn(t)
    a = a + _adapter(space, a)
    if base.window_size > 0:
        a = window_unpartition(a, base.window_size, pad, (7, 7))
    h = x + a
    z = base.norm2(h)
    want = h + base.mlp(z) + 0.5 * _adapter(mlp, z)
    torch.testing.assert_close(block(x), want, rtol=1e-12, atol=1e-12)
    assert (want - base(x)).abs().max() > 1e-2  # the adapters do change the block


def test_sd_trans_block_matches_the_formula():
    """Global block, volumes of D = 3 slices: the space branch as above plus
    ``DepthAdapter(Attn_depth(rearrange(LN1 x) + P_depth))`` rearranged back, before the residual."""
    torch.manual_seed(0)
    encoder = tiny_sam_encoder(img_size=32, global_attn_indexes=(1,)).double().eval()
    base = copy.deepcopy(encoder.blocks[1])
    _randomised(ma.inject(encoder, ma.MedSAConfig(space_depth=True, depth_pos_embed=5)))
    block = encoder.blocks[1]
    space, depth, mlp = block.attn.base_layer.adapter, block.attn.depth_adapter, block.mlp.adapter
    b, d, n = 2, 3, 4
    x = torch.randn(b * d, n, n, 48, dtype=torch.float64)
    t = base.norm1(x)
    a = base.attn(t)
    a = a + _adapter(space, a)
    seq = t.reshape(b, d, n, n, 48).permute(0, 2, 3, 1, 4).reshape(b * n * n, d, 48)
    seq = seq + block.attn.depth_pos_embed[:d]
    branch = _adapter(depth, _attention(base.attn, seq))
    a = a + branch.reshape(b, n, n, d, 48).permute(0, 3, 1, 2, 4).reshape(b * d, n, n, 48)
    h = x + a
    z = base.norm2(h)
    want = h + base.mlp(z) + 0.5 * _adapter(mlp, z)
    with volume_slices(block, d, b * d):
        got = block(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _sam_vit_b_on_meta():
    from segment_anything import sam_model_registry

    with torch.device("meta"):  # the real architecture, no memory and no weights
        return sam_model_registry["vit_b"]()


@pytest.mark.parametrize(("config", "adapters_per_block"), [
    (dict(), 2),  # space + MLP adapters: the README's 11.16 M
    (dict(space_depth=True), 3),  # + the depth adapter: 14.71 M
])
def test_sam_vit_b_trainable_figures(config, adapters_per_block):
    sam = _sam_vit_b_on_meta()
    decoder = sum(p.numel() for p in sam.mask_decoder.parameters())
    ma.inject(sam, ma.MedSAConfig(modules_to_save=["mask_decoder"], **config))
    trainable, _ = trainable_parameters(sam)
    assert trainable == 12 * adapters_per_block * ADAPTER_VIT_B + decoder
    assert f"{trainable / 1e6:.2f}" == ("11.16" if adapters_per_block == 2 else "14.71")


def test_hyp_adpt_trainable_figure_for_sam_decoder():
    """HyP-Adpt's docstring: 772,480 adapter parameters for SAM's two decoder blocks (width 256)."""
    sam = _sam_vit_b_on_meta()
    ma.inject(sam, ma.MedSAConfig(space_adapter=False, mlp_adapter=False, hyper_prompt=True))
    assert trainable_parameters(sam)[0] == 772_480
