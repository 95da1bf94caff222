"""CILMPConfig validation, JSON round trip, and inject → save → load on CLIP."""

import json
import os

import pytest
import torch

import medadapt as ma
from medadapt.core import config_from_dict
from medadapt.prompts import CILMPConfig, load_representations, save_representations


def _kw(**kw):
    base = dict(class_names=["a", "b"], representation_lengths={"a": 8, "b": 9}, representation_dim=16)
    base.update(kw)
    return base


def test_json_round_trip(tmp_path, class_reps):
    cfg = CILMPConfig.from_representations(class_reps, tmp_path / "r.safetensors",
                                           descriptions={k: f"about {k}" for k in class_reps}, rank=4)
    data = json.loads(json.dumps(cfg.to_dict()))
    again = config_from_dict(data)
    assert again == cfg and again.representation_lengths == {k: v.shape[0] for k, v in class_reps.items()}
    assert again.representation_dim == 20 and isinstance(again.representation_path, str)
    loaded = load_representations(tmp_path / "r.safetensors")
    assert list(loaded) == list(class_reps)  # class order kept
    for k in class_reps:
        assert torch.equal(loaded[k], class_reps[k])


@pytest.mark.parametrize("kw, field", [
    (dict(class_names=[]), "class_names"),
    (dict(class_names=["a", "a"]), "class_names"),
    (dict(descriptions={"a": "grey matter"}), "descriptions.*'b'"),
    (dict(descriptions={"a": "x", "b": "  "}), "descriptions.*'b'"),
    (dict(representation_lengths={"a": 8}), "representation_lengths.*'b'"),
    (dict(representation_lengths={"a": 8, "b": 7}), r"representation_lengths\['b'\]"),
    (dict(representation_dim=0), "representation_dim"),
    (dict(variant="maple"), "variant"),
    (dict(host="sam", variant="coop"), "variant"),
    (dict(rank=0), "rank"),
    (dict(dropout=1.0), "dropout"),
    (dict(prompt_depth=0), "prompt_depth"),
    (dict(variant="coop", prompt_depth=3), "prompt_depth"),
    (dict(conditional="yes"), "conditional"),
    (dict(representation_path=3), "representation_path"),
    (dict(descriptions={"a": "x", "b": "y", "c": "z"}), "descriptions.*'c'"),  # a class not in class_names
    (dict(rank=17), "rank.*representation_dim"),  # R would need more orthonormal rows than the width
])
def test_bad_configs_raise_value_error_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        CILMPConfig(**_kw(**kw))


def test_representations_of_different_widths_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="width"):
        save_representations({"a": torch.randn(8, 4), "b": torch.randn(8, 5)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="representations"):
        CILMPConfig.from_representations({"a": torch.randn(8, 4)}, tmp_path / "y.safetensors", class_names=["a", "z"])


def test_clip_inject_save_load_round_trip(tmp_path, reps_file, rep_lengths, make_clip):
    cfg = CILMPConfig(class_names=list(rep_lengths), representation_path=str(reps_file),
                      representation_lengths=rep_lengths, representation_dim=20, prompt_depth=2)
    torch.manual_seed(0)
    clip = make_clip()
    ma.inject(clip, cfg)
    with torch.no_grad():
        for p in clip.prompt_learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    clip.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = clip.prompt_learner(x)
    ma.save_adapter(clip, tmp_path / "run")
    torch.manual_seed(0)
    other = ma.load_adapter(make_clip(), tmp_path / "run").eval()
    with torch.no_grad():
        torch.testing.assert_close(other.prompt_learner(x), expected, rtol=0, atol=0)
    ma.remove_adapters(other)
    assert not hasattr(other, "prompt_learner") and not isinstance(other.visual.transformer, ma.core.AdapterModule)


def test_from_representations_records_an_absolute_path(tmp_path, class_reps, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = CILMPConfig.from_representations(class_reps, "r.safetensors")
    assert os.path.isabs(cfg.representation_path)
    assert os.path.samefile(cfg.representation_path, tmp_path / "r.safetensors")
    monkeypatch.chdir("/")
    assert torch.equal(load_representations(cfg.representation_path)["covid_19"], class_reps["covid_19"])


def test_invalid_from_representations_writes_no_file(tmp_path):
    with pytest.raises(ValueError, match="rank"):
        CILMPConfig.from_representations({"a": torch.randn(8, 4)}, tmp_path / "r.safetensors", rank=8)
    assert list(tmp_path.iterdir()) == []
