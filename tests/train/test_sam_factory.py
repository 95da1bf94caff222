"""Building SAM at a chosen size; checkpoint weights resized to it."""

import pytest
import torch
import torch.nn.functional as F

from medadapt.train import SAM_GEOMETRIES, build_sam, resize_sam_state_dict


def test_geometry_and_seed():
    sam = build_sam("tiny", img_size=48, seed=3)
    geometry = SAM_GEOMETRIES["tiny"]
    assert sam.image_encoder.img_size == 48 and sam.image_encoder.pos_embed.shape == (1, 6, 6, geometry.embed_dim)
    assert len(sam.image_encoder.blocks) == geometry.depth
    assert [b.window_size for b in sam.image_encoder.blocks] == [geometry.window_size, 0]
    assert sam.prompt_encoder.image_embedding_size == (6, 6)
    again = build_sam("tiny", img_size=48, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(sam.state_dict().values(), again.state_dict().values()))
    vit_b = SAM_GEOMETRIES["vit_b"]
    assert (vit_b.embed_dim, vit_b.depth, vit_b.num_heads, vit_b.global_attn_indexes, vit_b.window_size) == (
        768, 12, 12, (2, 5, 8, 11), 14)


@pytest.mark.parametrize("kwargs, match", [
    ({"arch": "vit_x"}, "arch"),
    ({"arch": "tiny", "img_size": 36}, "img_size"),
    ({"arch": "tiny", "img_size": 0}, "img_size"),
    ({"arch": "tiny", "checkpoint": "x.pth"}, "checkpoint"),
    ({"arch": "vit_b", "checkpoint": "/no/such/sam.pth"}, "does not exist"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_sam(**kwargs)


def test_resize_state_dict_interpolates_size_dependent_weights():
    big = build_sam("tiny", img_size=64, seed=0)
    small = build_sam("tiny", img_size=32, seed=1)
    state = big.state_dict()
    resized = resize_sam_state_dict(state, small)
    pos = state["image_encoder.pos_embed"].permute(0, 3, 1, 2)
    expected = F.interpolate(pos, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(resized["image_encoder.pos_embed"], expected)
    # global block 1: rel-pos (2·8 − 1) → (2·4 − 1) rows, linear; windowed block 0 keeps its window table
    table = state["image_encoder.blocks.1.attn.rel_pos_h"]
    assert table.shape[0] == 15 and resized["image_encoder.blocks.1.attn.rel_pos_h"].shape[0] == 7
    torch.testing.assert_close(resized["image_encoder.blocks.1.attn.rel_pos_h"],
                               F.interpolate(table.t()[None], size=7, mode="linear")[0].t())
    assert resized["image_encoder.blocks.0.attn.rel_pos_w"] is state["image_encoder.blocks.0.attn.rel_pos_w"]
    small.load_state_dict(resized)  # every shape fits
    same = resize_sam_state_dict(state, big)
    assert all(same[k] is state[k] for k in state)


def test_checkpoint_goes_through_sam_registry_and_is_resized(tmp_path, monkeypatch):
    """``--checkpoint`` reads the file with sam_model_registry, then resizes to img_size."""
    import segment_anything

    tiny = SAM_GEOMETRIES["tiny"]
    monkeypatch.setitem(SAM_GEOMETRIES, "vit_b", tiny)
    source = build_sam("tiny", img_size=64, seed=5)
    path = tmp_path / "sam_tiny.pth"
    torch.save(source.state_dict(), path)
    calls = []

    def fake_registry_entry(checkpoint=None):
        calls.append(checkpoint)
        model = build_sam("tiny", img_size=64, seed=9)
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        return model

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", fake_registry_entry)
    loaded = build_sam("vit_b", img_size=32, checkpoint=path)
    assert calls == [str(path)]
    src = source.state_dict()
    for name, value in loaded.state_dict().items():
        if name == "image_encoder.pos_embed" or name.endswith("blocks.1.attn.rel_pos_h") or \
                name.endswith("blocks.1.attn.rel_pos_w"):
            assert value.shape != src[name].shape
        else:
            assert torch.equal(value, src[name]), name
