"""HybridMambaEncoder: multi-scale shapes, named stages, the token-sequence stage, gradients, bad input."""

import math

import pytest
import torch

from medadapt.models import HybridMambaEncoder, LayerNorm3d, MedNeXtDownBlock, sincos_position_embedding_3d


def _tiny(**kwargs) -> HybridMambaEncoder:
    torch.manual_seed(0)
    defaults = dict(channels=(2, 4, 4, 6, 12), depths=(1, 1, 0, 1, 1), expansions=(2, 2, 2, 2, 2),
                    mamba_depth=1, d_state=4)
    return HybridMambaEncoder(**{**defaults, **kwargs})


def test_multiscale_shapes_patch16():
    enc = _tiny()
    assert enc.patch_size == 16
    feats = enc(torch.randn(2, 1, 32, 16, 48))
    assert [f.shape for f in feats] == [
        (2, 2, 32, 16, 48), (2, 4, 16, 8, 24), (2, 4, 8, 4, 12), (2, 6, 4, 2, 6), (2, 12, 2, 1, 3)]
    assert enc.feature_channels == [2, 4, 4, 6, 12] and enc.feature_strides == [1, 2, 4, 8, 16]


def test_default_sizes_are_the_paper_backbone():
    enc = HybridMambaEncoder()
    assert enc.channels == (32, 64, 128, 192, 384) and enc.patch_size == 16  # 96³ → 6³
    layer = enc.mamba_stage.sequence.layers[0].mixer
    assert (layer.d_model, layer.d_state, layer.d_conv, layer.expand) == (384, 16, 4, 2)
    assert len(enc.mamba_stage.sequence.layers) == 4


def test_named_stages_and_sequence_module():
    enc = _tiny()
    names = dict(enc.named_modules())
    assert all(n in names for n in enc.feature_module_names)
    assert enc.feature_module_names[-1] == "mamba_stage" and enc.sequence_module_name == "mamba_stage.sequence"
    sequence = enc.get_submodule(enc.sequence_module_name)
    assert sequence(torch.randn(3, 5, 12)).shape == (3, 5, 12)  # any token subset


def test_deepest_feature_is_the_sequence_stage_on_raster_tokens():
    enc = _tiny()
    x = torch.randn(1, 1, 32, 32, 32)
    seen = {}
    enc.stages[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("cnn", o))
    deepest = enc(x)[-1]
    cnn = seen["cnn"]
    pos = sincos_position_embedding_3d(cnn.shape[2:], cnn.shape[1])
    tokens = enc.mamba_stage.sequence(cnn.flatten(2).transpose(1, 2) + pos)
    torch.testing.assert_close(deepest, tokens.transpose(1, 2).reshape(cnn.shape))


def test_sincos_embedding_values_and_order():
    grid, dim = (2, 3, 4), 14  # 2 frequencies, 2 zero channels
    emb = sincos_position_embedding_3d(grid, dim, temperature=100.0)
    assert emb.shape == (24, 14)
    d, h, w = 1, 2, 3
    row = emb[(d * 3 + h) * 4 + w]
    omega = torch.tensor([1.0, 100.0**-0.5])
    expected = torch.cat([torch.sin(d * omega), torch.cos(d * omega), torch.sin(h * omega), torch.cos(h * omega),
                          torch.sin(w * omega), torch.cos(w * omega), torch.zeros(2)])
    torch.testing.assert_close(row, expected)


def test_gradients_flow_to_every_parameter():
    enc = _tiny()
    x = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    sum(f.square().mean() for f in enc(x)).backward()
    assert x.grad.abs().sum() > 0
    for name, param in enc.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_norm_layer_is_a_parameter():
    enc = _tiny(norm_layer=lambda c: torch.nn.GroupNorm(1, c))
    assert not any(isinstance(m, LayerNorm3d) for m in enc.modules())
    assert enc(torch.randn(1, 1, 16, 16, 16))[-1].shape == (1, 12, 1, 1, 1)


def test_layernorm3d_normalises_channels_per_voxel():
    norm = LayerNorm3d(5).double()
    x = torch.randn(2, 5, 3, 4, 2, dtype=torch.float64)
    expected = torch.nn.functional.layer_norm(x.movedim(1, -1), (5,), eps=1e-6).movedim(-1, 1)
    torch.testing.assert_close(norm(x), expected)


def test_down_block_residual_is_a_stride_two_projection():
    torch.manual_seed(0)
    block = MedNeXtDownBlock(3, 5).double()
    x = torch.randn(1, 3, 7, 6, 5, dtype=torch.float64)
    strided = torch.nn.functional.conv3d(x, block.conv_residual.weight, block.conv_residual.bias, stride=2)
    main = block.conv_compress(block.act(block.conv_expand(block.norm(block.conv_dw(x)))))
    torch.testing.assert_close(block(x), main + strided)
    assert block(x).shape[2:] == tuple(math.ceil(s / 2) for s in x.shape[2:])


@pytest.mark.parametrize("shape, word", [((1, 2, 32, 32, 32), "x must be"), ((1, 1, 32, 24, 32), "multiples")])
def test_bad_input_raises(shape, word):
    with pytest.raises(ValueError, match=word):
        _tiny()(torch.randn(*shape))


@pytest.mark.parametrize("kwargs, word", [(dict(channels=(4,)), "channels"), (dict(depths=(1, 1)), "depths")])
def test_bad_arguments_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        _tiny(**kwargs)
