"""CILMP class prompts on a tiny random-weight SAM: per-class masks with no clicks, inject/save/load."""

import pytest
import torch

import medadapt as ma
from medadapt.prompts import CILMPConfig, ClassPromptedMaskDecoder, class_mask_logits

pytest.importorskip("segment_anything")
from tiny_models import tiny_sam  # noqa: E402


def _config(path, **kw):
    kw.setdefault("dropout", 0.0)
    return CILMPConfig(class_names=["pneumonia", "normal lung", "covid_19"], representation_path=str(path),
                       representation_lengths={"pneumonia": 9, "normal lung": 12, "covid_19": 8},
                       representation_dim=20, **kw)


def _sam(seed=0):
    torch.manual_seed(seed)
    return tiny_sam(img_size=64, embed_dim=48, prompt_dim=32, depth=2).eval()


def _images(n=2):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(7)) * 255


def test_class_masks_match_the_decoder_run_per_class(reps_file):
    sam = _sam()
    ma.inject(sam, _config(reps_file))
    assert isinstance(sam.mask_decoder, ClassPromptedMaskDecoder)
    x = _images(3)
    with torch.no_grad():
        emb = sam.image_encoder(sam.preprocess(x))
        pe = sam.prompt_encoder.get_dense_pe()
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        masks, iou = sam.mask_decoder(emb, pe, sparse, dense, False)
        assert masks.shape == (3, 3, 32, 32) and iou.shape == (3, 3)
        torch.testing.assert_close(class_mask_logits(sam, x), masks)
        tokens = sam.mask_decoder.prompt_head(emb)  # (B, n_cls, C)
        assert tokens.shape == (3, 3, 32)
        for b in range(3):  # SAM's own decoder, one image, the class tokens as its sparse prompts
            ref, ref_iou = sam.mask_decoder.base_layer.predict_masks(emb[b : b + 1], pe, tokens[b][:, None], dense)
            torch.testing.assert_close(masks[b], ref[:, 0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(iou[b], ref_iou[:, 0], rtol=1e-4, atol=1e-5)


def test_sam_forward_without_clicks_and_disabled_is_base(reps_file):
    sam = _sam()
    x = _images(1)[0]
    click = {"point_coords": torch.tensor([[[20.0, 30.0]]]), "point_labels": torch.tensor([[1]])}
    with torch.no_grad():
        base = sam([{"image": x, "original_size": (64, 64), **click}], multimask_output=True)[0]
    ma.inject(sam, _config(reps_file))
    with torch.no_grad():
        out = sam([{"image": x, "original_size": (64, 64)}], multimask_output=False)[0]
        assert out["masks"].shape == (1, 3, 64, 64)
        with pytest.raises(ValueError, match="multimask_output"):
            sam([{"image": x, "original_size": (64, 64)}], multimask_output=True)
        with ma.disable_adapters(sam):
            again = sam([{"image": x, "original_size": (64, 64), **click}], multimask_output=True)[0]
    assert torch.equal(again["low_res_logits"], base["low_res_logits"])


def test_only_the_prompt_head_trains(reps_file):
    sam = _sam()
    ma.inject(sam, _config(reps_file, dropout=0.1))
    sam.train()
    class_mask_logits(sam, _images(2)).sigmoid().mean().backward()
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mask_decoder.prompt_head.") for n in trainable)
    assert all(sam.get_parameter(n).grad is not None for n in trainable)
    assert all(p.grad is None for n, p in sam.named_parameters() if n not in trainable)


def test_inject_save_load_round_trip_without_the_representation_file(tmp_path, reps_file):
    sam = _sam()
    ma.inject(sam, _config(reps_file))
    with torch.no_grad():
        for p in sam.mask_decoder.prompt_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
        expected = class_mask_logits(sam, _images(2))
    ma.save_adapter(sam, tmp_path / "run")
    reps_file.unlink()  # the adapter is self-contained: H_c is a persistent buffer
    other = ma.load_adapter(_sam(), tmp_path / "run")
    saved = ma.core.adapter_state_dict(other)
    assert "mask_decoder.prompt_head.class_representations" in saved
    with torch.no_grad():
        torch.testing.assert_close(class_mask_logits(other, _images(2)), expected, rtol=0, atol=0)


def test_missing_file_at_inject_fails_loudly_at_first_use(tmp_path):
    sam = _sam()
    ma.inject(sam, _config(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ValueError, match="class_representations"):
        class_mask_logits(sam, _images(1))


def test_bad_representation_files_raise_naming_the_field(tmp_path, class_reps):
    from medadapt.prompts import save_representations

    wide = {k: torch.randn(v.shape[0], 21) for k, v in class_reps.items()}
    path = save_representations(wide, tmp_path / "wide.safetensors")
    sam = _sam()
    with pytest.raises(ValueError, match="representation_dim"):
        ma.inject(sam, _config(path))
    assert not any(isinstance(m, ma.core.AdapterModule) for m in sam.modules())  # left unchanged
    short = dict(class_reps, pneumonia=class_reps["pneumonia"][:8])
    with pytest.raises(ValueError, match="representation_lengths"):
        ma.inject(sam, _config(save_representations(short, tmp_path / "short.safetensors")))
    partial = {k: v for k, v in class_reps.items() if k != "covid_19"}
    with pytest.raises(ValueError, match="covid_19"):
        ma.inject(sam, _config(save_representations(partial, tmp_path / "partial.safetensors")))
    with pytest.raises(ValueError, match="no SAM mask decoder and no open_clip CLIP"):
        ma.inject(torch.nn.Sequential(torch.nn.Linear(2, 2)), _config(path))


def test_prompt_head_gives_one_token_per_class_at_sam_width():
    from medadapt.prompts import CILMPPromptHead

    head = CILMPPromptHead([9, 12, 8], dim=20, prompt_dim=256).eval()
    with torch.no_grad():
        head.class_representations.normal_()
        tokens = head(torch.randn(2, 256, 4, 4))
    assert tokens.shape == (2, 3, 256) and torch.isfinite(tokens).all()


def test_load_adapter_does_not_read_a_changed_representation_file(tmp_path, reps_file, class_reps):
    from medadapt.prompts import save_representations

    sam = _sam()
    ma.inject(sam, _config(reps_file))
    with torch.no_grad():
        expected = class_mask_logits(sam, _images(2))
    ma.save_adapter(sam, tmp_path / "run")
    longer = {k: torch.randn(v.shape[0] + 3, 20) for k, v in class_reps.items()}  # other token counts
    save_representations(longer, reps_file)
    other = ma.load_adapter(_sam(), tmp_path / "run")
    reps_file.write_bytes(b"not a safetensors file")
    third = ma.load_adapter(_sam(), tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(class_mask_logits(other, _images(2)), expected, rtol=0, atol=0)
        torch.testing.assert_close(class_mask_logits(third, _images(2)), expected, rtol=0, atol=0)


def test_corrupt_representation_file_raises_value_error_naming_it(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(bytes(range(256)) * 4)
    sam = _sam()
    with pytest.raises(ValueError, match=r"representation_path .*garbage\.safetensors"):
        ma.inject(sam, _config(path))
    assert not any(isinstance(m, ma.core.AdapterModule) for m in sam.modules())


def test_prompt_head_condition_is_l2_normalised():
    """f = normalize(mean E): scaling the image embedding leaves the class prompt tokens unchanged."""
    from medadapt.prompts import CILMPPromptHead

    torch.manual_seed(0)
    head = CILMPPromptHead([9, 12, 8], dim=20, prompt_dim=32).eval()
    emb = torch.randn(2, 32, 4, 4) + 0.5
    with torch.no_grad():
        head.class_representations.normal_()
        tokens = head(emb)
        torch.testing.assert_close(head(7.0 * emb), tokens)
        torch.testing.assert_close(head(0.1 * emb), tokens)
