"""HyP-Adpt: the per-sample math, the decoder unchanged at init, prompt-dependent weights, batching."""

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("segment_anything")

from tiny_models import tiny_sam  # noqa: E402

from medadapt.adapters.hyper_prompt import HyPDecoderBlock, HyperPromptAdapter, apply_hyper_prompt  # noqa: E402
from medadapt.core.config import MedSAConfig  # noqa: E402

WIDTH, IMG, GRID = 32, 64, 8  # decoder/prompt width, image size, embedding grid (IMG / patch 8)


def small_sam(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_sam(img_size=IMG, embed_dim=24, prompt_dim=WIDTH, depth=2).eval()


def prompt_batch(batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    points = torch.randint(0, IMG, (batch, 2, 2), generator=g).float()
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0]])[:batch]
    corner = torch.randint(0, IMG // 2, (batch, 2), generator=g).float()
    boxes = torch.cat([corner, corner + IMG // 2 - 1], 1)
    return (points, labels), boxes


def decode(sam: torch.nn.Module, image_embedding: torch.Tensor, points=None, boxes=None, multimask: bool = True):
    """One image embedding (1, C, h, w), B prompts → masks (B, M, 4h, 4w), iou (B, M)."""
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    return sam.mask_decoder(image_embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask)


def randomise_adapters(model: torch.nn.Module, seed: int = 5) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, HyPDecoderBlock):
                for _, p in module.adapter_named_parameters():
                    p.normal_(0, 0.3)


@pytest.fixture(scope="module")
def base_sam() -> torch.nn.Module:
    return small_sam()


def test_apply_wraps_every_decoder_block(base_sam):
    sam = copy.deepcopy(base_sam)
    names = apply_hyper_prompt(sam, MedSAConfig(hyper_prompt=True))
    assert names == ["mask_decoder.transformer.layers.0", "mask_decoder.transformer.layers.1"]
    blocks = [sam.get_submodule(n) for n in names]
    assert all(isinstance(b, HyPDecoderBlock) and b.num_output_tokens == 5 for b in blocks)
    assert blocks[0].hyper_adapter.hidden == 8  # int(0.25 · 32)
    with pytest.raises(ValueError, match="already has HyP adapters"):
        apply_hyper_prompt(sam, MedSAConfig(hyper_prompt=True))
    decoder = copy.deepcopy(base_sam.mask_decoder)
    assert apply_hyper_prompt(decoder, MedSAConfig()) == ["transformer.layers.0", "transformer.layers.1"]
    with pytest.raises(ValueError, match="MaskDecoder"):
        apply_hyper_prompt(base_sam.image_encoder, MedSAConfig())


@pytest.mark.parametrize("prompt", ["points", "boxes", "both"])
def test_decoder_unchanged_at_init(base_sam, prompt):
    sam = copy.deepcopy(base_sam)
    apply_hyper_prompt(sam, MedSAConfig(hyper_prompt=True, mlp_ratio=0.5))
    points, boxes = prompt_batch()
    kwargs = {"points": points if prompt != "boxes" else None, "boxes": boxes if prompt != "points" else None}
    embedding = torch.randn(1, WIDTH, GRID, GRID)
    with torch.no_grad():
        for multimask in (True, False):
            base = decode(base_sam, embedding, multimask=multimask, **kwargs)
            adapted = decode(sam, embedding, multimask=multimask, **kwargs)
            assert torch.equal(base[0], adapted[0]) and torch.equal(base[1], adapted[1])


def test_whole_sam_forward_unchanged_at_init(base_sam):
    sam = copy.deepcopy(base_sam)
    apply_hyper_prompt(sam, MedSAConfig(hyper_prompt=True))
    (coords, labels), boxes = prompt_batch(2)
    batch = [{"image": torch.rand(3, IMG, IMG) * 255, "original_size": (IMG, IMG), "point_coords": coords,
              "point_labels": labels, "boxes": boxes}]
    with torch.no_grad():
        (base,), (adapted,) = base_sam(batch, multimask_output=False), sam(batch, multimask_output=False)
    assert torch.equal(base["low_res_logits"], adapted["low_res_logits"])


def test_adapter_math_matches_per_sample_reference():
    torch.manual_seed(0)
    adapter = HyperPromptAdapter(dim=11, prompt_dim=7, mlp_ratio=0.5, activation="relu").double()
    torch.nn.init.normal_(adapter.up.weight)
    x, prompts = torch.randn(3, 4, 11, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64)
    out = adapter(x, prompts)
    for b in range(3):
        e = adapter.prompt_proj(prompts[b].mean(0))
        w = adapter.weight_generator(e).view(5, 5)
        hidden = torch.relu(F.layer_norm(adapter.down(x[b]) @ w, (5,), adapter.norm.weight, adapter.norm.bias))
        torch.testing.assert_close(out[b], adapter.up(hidden), rtol=1e-12, atol=1e-12)
    assert adapter.generate_weights(prompts).shape == (3, 5, 5)
    empty = adapter(x, prompts[:, :0])  # no prompt tokens: e = c_e, finite
    assert torch.isfinite(empty).all()
    with pytest.raises(ValueError, match="batch"):
        adapter(x, prompts[:2])
    with pytest.raises(ValueError, match="prompt_tokens"):
        adapter.generate_weights(prompts[..., :6])
    with pytest.raises(ValueError, match="last dimension 11"):
        adapter(x[..., :10], prompts)


def test_adapter_starts_at_zero_and_weights_depend_on_prompt(base_sam):
    sam = copy.deepcopy(base_sam)
    apply_hyper_prompt(sam, MedSAConfig(hyper_prompt=True))
    block = sam.mask_decoder.transformer.layers[1]
    (coords, labels), boxes = prompt_batch(3)
    sparse, _ = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    with torch.no_grad():
        w = block.hyper_adapter.generate_weights(sparse)
        assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])
        torch.testing.assert_close(block.hyper_adapter.generate_weights(sparse[1:2])[0], w[1])
        assert torch.count_nonzero(block.hyper_adapter(torch.randn(3, 6, WIDTH), sparse)) == 0


def test_batch_equals_per_sample(base_sam):
    decoder = copy.deepcopy(base_sam.mask_decoder).double()
    apply_hyper_prompt(decoder, MedSAConfig(hyper_prompt=True))
    randomise_adapters(decoder)
    points, boxes = prompt_batch(3)
    with torch.no_grad():
        sparse, dense = (t.double() for t in base_sam.prompt_encoder(points=points, boxes=boxes, masks=None))
    image_pe = base_sam.prompt_encoder.get_dense_pe().double()
    embedding = torch.randn(1, WIDTH, GRID, GRID, dtype=torch.float64)
    with torch.no_grad():
        masks, iou = decoder(embedding, image_pe, sparse, dense, True)
        base_masks, _ = copy.deepcopy(base_sam.mask_decoder).double()(embedding, image_pe, sparse, dense, True)
        assert (masks - base_masks).abs().max() > 1e-3  # the randomised adapters act
        for b in range(3):
            single = decoder(embedding, image_pe, sparse[b:b + 1], dense[b:b + 1], True)
            torch.testing.assert_close(masks[b:b + 1], single[0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(iou[b:b + 1], single[1], rtol=1e-10, atol=1e-10)


def test_training_step_changes_output_and_disable_restores_base(base_sam):
    sam = copy.deepcopy(base_sam)
    apply_hyper_prompt(sam, MedSAConfig(hyper_prompt=True))
    blocks = [m for m in sam.modules() if isinstance(m, HyPDecoderBlock)]
    adapter_params = [p for b in blocks for _, p in b.adapter_named_parameters()]
    for p in sam.parameters():
        p.requires_grad_(False)
    for p in adapter_params:
        p.requires_grad_(True)
    generator_before = blocks[0].hyper_adapter.weight_generator[2].weight.detach().clone()
    points, boxes = prompt_batch(2)
    embedding = torch.randn(1, WIDTH, GRID, GRID)
    target = (torch.rand(2, 1, 4 * GRID, 4 * GRID) > 0.5).float()
    with torch.no_grad():
        base = decode(base_sam, embedding, points, boxes, multimask=False)[0]
    optimiser = torch.optim.Adam(adapter_params, lr=1e-2)
    for _ in range(2):  # step 1 moves the zero up-projections, step 2 reaches the weight generator
        loss = F.binary_cross_entropy_with_logits(decode(sam, embedding, points, boxes, multimask=False)[0], target)
        optimiser.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in sam.parameters() if not p.requires_grad)  # the frozen decoder
        optimiser.step()
    with torch.no_grad():
        trained = decode(sam, embedding, points, boxes, multimask=False)[0]
        assert (trained - base).abs().max() > 1e-4
        assert not torch.equal(blocks[0].hyper_adapter.weight_generator[2].weight, generator_before)
        for block in blocks:
            block.set_adapters_enabled(False)
        assert torch.equal(decode(sam, embedding, points, boxes, multimask=False)[0], base)
        for block in blocks:
            block.set_adapters_enabled(True)
        assert torch.equal(decode(sam, embedding, points, boxes, multimask=False)[0], trained)
    assert blocks[0].unwrap() is not None and type(blocks[0].unwrap()).__name__ == "TwoWayAttentionBlock"


def test_blocks_condition_on_the_sparse_prompt_tokens_only(base_sam):
    sam = copy.deepcopy(base_sam)
    apply_hyper_prompt(sam, MedSAConfig(hyper_prompt=True))
    seen = []
    for block in sam.mask_decoder.transformer.layers:
        block.hyper_adapter.register_forward_hook(lambda mod, args, out: seen.append(args[1]))
    points, boxes = prompt_batch(2)
    with torch.no_grad():
        sparse, _ = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        decode(sam, torch.randn(1, WIDTH, GRID, GRID), points, boxes)
    assert len(seen) == 2 and all(torch.equal(tokens, sparse) for tokens in seen)  # not the 5 output tokens


def test_medsa_inject_hook_save_load_remove(base_sam, tmp_path):
    import medadapt as ma

    sam = copy.deepcopy(base_sam)
    ma.inject(sam, MedSAConfig(hyper_prompt=True, space_adapter=False, mlp_adapter=False))
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    assert trainable and all(".layers." in n and ".base_layer." not in n for n in trainable)
    randomise_adapters(sam)
    points, boxes = prompt_batch(2)
    embedding = torch.randn(1, WIDTH, GRID, GRID)
    with torch.no_grad():
        base, adapted = decode(base_sam, embedding, points, boxes)[0], decode(sam, embedding, points, boxes)[0]
        with ma.disable_adapters(sam):
            assert torch.equal(decode(sam, embedding, points, boxes)[0], base)
        ma.save_adapter(sam, tmp_path)
        fresh = copy.deepcopy(base_sam)
        ma.load_adapter(fresh, tmp_path)
        assert torch.equal(decode(fresh, embedding, points, boxes)[0], adapted)
        ma.remove_adapters(sam)
        assert type(sam.mask_decoder.transformer.layers[0]).__name__ == "TwoWayAttentionBlock"
        assert torch.equal(decode(sam, embedding, points, boxes)[0], base)


def test_exclude_modules_applies_to_the_mask_decoder(base_sam):
    """Excluding the decoder with HyP-Adpt on is a contradiction, refused with the model left as it was; an
    exclusion of encoder blocks leaves the decoder's HyP adapters in place."""
    import medadapt as ma

    sam = copy.deepcopy(base_sam)
    before = repr(sam)
    with pytest.raises(ValueError, match="exclude_modules"):
        ma.inject(sam, MedSAConfig(hyper_prompt=True, exclude_modules=["mask_decoder"]))
    assert repr(sam) == before
    ma.inject(sam, MedSAConfig(hyper_prompt=True, exclude_modules=r"image_encoder\.blocks\.0"))
    assert isinstance(sam.mask_decoder.transformer.layers[0], HyPDecoderBlock)
    assert type(sam.image_encoder.blocks[0].attn).__name__ == "Attention"
    assert type(sam.image_encoder.blocks[1].attn).__name__ == "SequentialAdapterWrapper"
