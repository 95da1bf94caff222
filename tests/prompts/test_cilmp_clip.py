"""CoOp / CoCoOp / CILMP prompt learners on a tiny random-weight open_clip CLIP."""

import pytest
import torch

import medadapt as ma
from medadapt.prompts import CILMPConfig, prompt_token_ids

LENGTHS = {"pneumonia": 9, "normal lung": 12, "covid_19": 8}  # as the reps_file fixture
CLASSES = list(LENGTHS)


def _cilmp_config(reps_file, **kw):
    kw.setdefault("dropout", 0.0)
    return CILMPConfig(class_names=CLASSES, representation_path=str(reps_file),
                       representation_lengths=dict(LENGTHS), representation_dim=20, **kw)


def _tok():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def test_prompt_layout_and_eot_index(reps_file, make_clip):
    torch.manual_seed(0)
    clip = make_clip()
    ma.inject(clip, _cilmp_config(reps_file, n_ctx=3))
    learner = clip.prompt_learner
    tok = _tok()
    ids, eot = learner.token_ids, learner.eot_index
    assert ids.shape == (3, 77)
    f = torch.nn.functional.normalize(torch.randn(2, 24), dim=-1)
    prompts = learner.build_prompts(f).view(2, 3, 77, 32)
    class_tokens = learner.class_tokens[0](learner.class_representations, f)
    emb = clip.token_embedding
    for c, (name, n_tokens) in enumerate(LENGTHS.items()):
        name_ids = tok.encode(name.replace("_", " "))
        expected = ([tok.sot_token_id] + tok.encode("X") * 3 + tok.encode("H") * n_tokens + name_ids
                    + tok.encode(".") + [tok.eot_token_id])
        assert ids[c, : len(expected)].tolist() == expected and not ids[c, len(expected) :].any()
        assert int(eot[c]) == 1 + 3 + n_tokens + len(name_ids) + 1 == int(ids[c].argmax()) < 77
        for b in range(2):
            p = prompts[b, c]
            torch.testing.assert_close(p[0], emb.weight[tok.sot_token_id])  # [SOS]
            torch.testing.assert_close(p[1:4], learner.ctx[0])  # [ctx]
            torch.testing.assert_close(p[4 : 4 + n_tokens], class_tokens[b, c, :n_tokens])  # class tokens
            torch.testing.assert_close(p[4 + n_tokens :], emb(ids[c, 4 + n_tokens :]))  # [name][.][EOT][pad]


def test_prompt_longer_than_context_raises_naming_it(reps_file, make_clip):
    with pytest.raises(ValueError, match="context_length"):
        prompt_token_ids(["a very long class name"], n_ctx=4, lengths=[70])
    clip = make_clip(context_length=20)
    before = [n for n, _ in clip.named_modules()]
    with pytest.raises(ValueError, match=r"normal lung.*context_length 20"):
        ma.inject(clip, _cilmp_config(reps_file))
    assert [n for n, _ in clip.named_modules()] == before


@pytest.mark.parametrize("variant", ["coop", "cocoop", "cilmp"])
def test_logits_gradients_and_disabled_path(variant, reps_file, make_clip):
    torch.manual_seed(1)
    clip = make_clip()
    clip.requires_grad_(False)  # same attention kernels before/after inject
    x = torch.randn(3, 3, 32, 32)
    base_features = clip.encode_image(x)
    cfg = (_cilmp_config(reps_file) if variant == "cilmp"
           else CILMPConfig(class_names=CLASSES, variant=variant))
    ma.inject(clip, cfg)
    logits = clip.prompt_learner(x)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    trainable = {n for n, p in clip.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_learner.") or n == "visual.transformer.prompts" for n in trainable)
    assert all(p.grad is not None for n, p in clip.named_parameters() if p.requires_grad)
    with ma.disable_adapters(clip):
        assert torch.equal(clip.encode_image(x), base_features)
        zero_shot = clip.prompt_learner(x)
    import open_clip

    text = clip.encode_text(open_clip.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]))
    f = torch.nn.functional.normalize(base_features, dim=-1)
    t = torch.nn.functional.normalize(text, dim=-1)
    torch.testing.assert_close(zero_shot, clip.logit_scale.exp() * f @ t.T)


def test_text_path_reproduces_host_encode_text(make_clip):
    """With ctx set to the embedding of 'X', the learner's text encoder equals the host's encode_text."""
    torch.manual_seed(2)
    clip = make_clip()
    ma.inject(clip, CILMPConfig(class_names=CLASSES, variant="coop"))
    learner = clip.prompt_learner
    with torch.no_grad():
        learner.ctx[0] = clip.token_embedding.weight[_tok().encode("X")[0]]
        ours = learner.text_features()[0]
        theirs = clip.encode_text(learner.token_ids)
    torch.testing.assert_close(ours, theirs)


def test_conditional_logits_are_per_image_and_deep_prompts_matter(reps_file, make_clip):
    torch.manual_seed(3)
    clip = make_clip()
    ma.inject(clip, _cilmp_config(reps_file, prompt_depth=3))
    learner = clip.prompt_learner.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        batched = learner(x)
        single = torch.cat([learner(x[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
        learner.ctx[2] += torch.randn_like(learner.ctx[2])  # the last deep text layer's own context
        changed_text = learner(x)
        visual_prompts = clip.visual.transformer.prompts
        visual_prompts[2] += torch.randn_like(visual_prompts[2])  # the last deep image layer's own tokens
        changed_image = learner(x)
    assert (changed_text - batched).abs().max() > 1e-4
    assert (changed_image - changed_text).abs().max() > 1e-4


def test_prompt_depth_beyond_layers_raises(reps_file, make_clip):
    with pytest.raises(ValueError, match="prompt_depth.*text encoder"):
        ma.inject(make_clip(layers=2), _cilmp_config(reps_file, prompt_depth=3))
    clip = make_clip(layers=3, vision_layers=2)
    with pytest.raises(ValueError, match="prompt_depth.*image encoder"):
        ma.inject(clip, _cilmp_config(reps_file, prompt_depth=3))
    assert not hasattr(clip, "prompt_learner")  # inject undid the partial injection
    ma.inject(clip, _cilmp_config(reps_file, prompt_depth=3, n_ctx_vision=0))  # text-only deep prompts


def _clip_with_text(**text_cfg):
    from open_clip.model import CLIP

    text = dict(layers=2, width=32, heads=2, context_length=77, vocab_size=49408)
    text.update(text_cfg)
    return CLIP(embed_dim=24, vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                text_cfg=text).eval()


def test_text_towers_the_learner_cannot_pool_or_tokenise_are_rejected(make_clip):
    with pytest.raises(ValueError, match="token_embedding.num_embeddings is 50000"):
        ma.inject(_clip_with_text(vocab_size=50000), CILMPConfig(class_names=CLASSES, variant="coop"))
    for pool in ("last", "first", "none"):
        clip = _clip_with_text(pool_type=pool)
        with pytest.raises(ValueError, match=f"text_pool_type.*'{pool}'"):
            ma.inject(clip, CILMPConfig(class_names=CLASSES, variant="coop"))
        assert not hasattr(clip, "prompt_learner")
    with pytest.raises(ValueError, match="text_pool_type.*'eos'"):  # eos pooling at another token than EOT
        ma.inject(_clip_with_text(pool_type="eos", eos_id=2), CILMPConfig(class_names=CLASSES, variant="coop"))
    # eos pooling at CLIP's EOT is the same position: accepted, and the learner matches encode_text
    torch.manual_seed(4)
    clip = _clip_with_text(pool_type="eos", eos_id=49407)
    ma.inject(clip, CILMPConfig(class_names=CLASSES, variant="coop"))
    learner = clip.prompt_learner
    with torch.no_grad():
        learner.ctx[0] = clip.token_embedding.weight[_tok().encode("X")[0]]
        torch.testing.assert_close(learner.text_features()[0], clip.encode_text(learner.token_ids))


def test_deep_visual_prompts_read_the_wrapped_transformer_attributes(reps_file, make_clip):
    clip = make_clip()
    ma.inject(clip, _cilmp_config(reps_file))
    wrapper = clip.visual.transformer
    assert isinstance(wrapper, ma.core.AdapterWrapper)
    assert wrapper.grad_checkpointing is False and wrapper.width == 32 and wrapper.layers == 3
    assert wrapper.get_cast_dtype() == wrapper.base_layer.get_cast_dtype()
    assert wrapper.prompts.shape == (3, 4, 32)  # its own attributes still come first
    with pytest.raises(AttributeError):
        getattr(wrapper, "no_such_attribute")  # noqa: B009


def test_image_condition_is_l2_normalised(reps_file, make_clip):
    """f = normalize(encode_image): scaling the image features leaves class tokens and logits unchanged."""
    torch.manual_seed(5)
    clip = make_clip()
    ma.inject(clip, _cilmp_config(reps_file, prompt_depth=2))
    learner = clip.prompt_learner.eval()
    tokens = []
    learner.class_tokens[0].register_forward_hook(lambda m, a, out: tokens.append(out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = learner(x)
        clip.visual.proj.mul_(5.0)  # encode_image scales by 5
        scaled = learner(x)
    torch.testing.assert_close(tokens[1], tokens[0])
    torch.testing.assert_close(scaled, logits)
