"""Configs validate themselves; adapters save/load exactly; bad files leave the model untouched."""

import json

import pytest
import torch
from tiny_models import WithHead, tiny_sam_encoder

import medadapt as ma
from medadapt._optional import require
from medadapt.core import config_from_dict, injected_configs


def sam_model(seed=0):
    torch.manual_seed(seed)
    return WithHead(tiny_sam_encoder(), 32).eval()


def trained(model, x, steps=2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model


@pytest.mark.parametrize(("field", "value"), [
    ("mlp_ratio", 0), ("mlp_ratio", -0.5), ("mlp_ratio", "0.25"), ("activation", "swish"),
    ("space_adapter", 1), ("depth_pos_embed", -1), ("target_modules", 3), ("target_modules", []),
    ("exclude_modules", {"a": 1}), ("modules_to_save", [3]), ("mlp_scale", None),
    ("modules_to_save", 5), ("modules_to_save", None), ("target_modules", "blocks.("), ("exclude_modules", "["),
    ("mlp_ratio", float("inf")), ("mlp_ratio", float("nan")), ("mlp_scale", float("nan")),
    ("depth_pos_embed", 4),  # without space_depth it would do nothing
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ma.MedSAConfig(**{field: value})


def test_config_round_trip_and_unknown_fields():
    cfg = ma.MedSAConfig(mlp_ratio=0.5, target_modules=["blocks.0"], modules_to_save=["head"])
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown adapter method"):
        config_from_dict({"method": "nope"})


def test_inject_rejects_non_config():
    with pytest.raises(ValueError, match="config must be an AdapterConfig"):
        ma.inject(sam_model(), {"mlp_ratio": 0.25})


def test_save_then_load_into_fresh_model_reproduces_outputs(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    model = trained(ma.inject(sam_model(), ma.MedSAConfig(modules_to_save=["head"])), x)
    out = model(x)
    ma.save_adapter(model, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = sam_model()  # same base weights (same seed), no adapters
    ma.load_adapter(fresh, tmp_path / "run")
    assert torch.equal(fresh(x), out)
    assert injected_configs(fresh) == injected_configs(model)
    again = ma.inject(sam_model(), ma.MedSAConfig(modules_to_save=["head"]))  # already injected: weights only
    ma.load_adapter(again, tmp_path / "run")
    assert torch.equal(again(x), out)


def test_no_pickles_and_no_temp_files_left(tmp_path):
    model = ma.inject(sam_model(), ma.MedSAConfig())
    ma.save_adapter(model, tmp_path)
    ma.save_adapter(model, tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert tmp_path.joinpath("adapter_model.safetensors").read_bytes()[8:9] == b"{"  # safetensors header


def _snapshot(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return repr(model), state, [p.requires_grad for p in model.parameters()]


def _assert_unchanged(model, snap):
    tree, state, flags = snap
    assert repr(model) == tree
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("recorded_hash", [True, False])
def test_corrupt_file_raises_and_leaves_model(tmp_path, recorded_hash):
    """A damaged weights file: refused by its SHA-256, or (a config saved without one) by safetensors."""
    x = torch.randn(1, 3, 64, 64)
    ma.save_adapter(trained(ma.inject(sam_model(), ma.MedSAConfig()), x), tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    if not recorded_hash:
        meta = json.loads((tmp_path / "adapter_config.json").read_text())
        del meta["weights_sha256"]
        (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    for target in (sam_model(), ma.inject(sam_model(), ma.MedSAConfig())):
        snap = _snapshot(target)
        with pytest.raises(ValueError, match="SHA-256" if recorded_hash else "safetensors"):
            ma.load_adapter(target, tmp_path)
        _assert_unchanged(target, snap)


def test_save_interrupted_between_its_two_files_is_refused_on_load(tmp_path, monkeypatch):
    """New weights under the previous save's config (a crash between the renames) would load silently with
    the wrong scale; the config's SHA-256 of its weights file catches it."""
    from medadapt.core import io

    x = torch.randn(1, 3, 64, 64)
    ma.save_adapter(trained(ma.inject(sam_model(), ma.MedSAConfig(mlp_scale=0.5)), x), tmp_path)
    write = io.atomic_write_bytes

    def crash_on_config(path, data):
        if path.name == io.CONFIG_NAME:
            raise KeyboardInterrupt  # the process dies after the weights were renamed into place
        write(path, data)

    monkeypatch.setattr(io, "atomic_write_bytes", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        ma.save_adapter(trained(ma.inject(sam_model(1), ma.MedSAConfig(mlp_scale=1.0)), x), tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    target = sam_model()
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="different saves"):
        ma.load_adapter(target, tmp_path)
    _assert_unchanged(target, snap)


def test_newer_format_version_is_refused(tmp_path):
    ma.save_adapter(ma.inject(sam_model(), ma.MedSAConfig()), tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version"):
        ma.load_adapter(sam_model(), tmp_path)


def test_atomic_output_leaves_old_file_on_failure(tmp_path):
    from medadapt._atomic import atomic_output, atomic_write_text

    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_mismatched_adapter_raises_and_leaves_model(tmp_path):
    x = torch.randn(1, 3, 64, 64)
    ma.save_adapter(trained(ma.inject(sam_model(), ma.MedSAConfig()), x), tmp_path)
    torch.manual_seed(0)
    wider = WithHead(tiny_sam_encoder(embed_dim=60), 32).eval()  # same block names, other widths
    snap = _snapshot(wider)
    with pytest.raises(ValueError, match="shape mismatch"):
        ma.load_adapter(wider, tmp_path)
    _assert_unchanged(wider, snap)
    shallower = WithHead(tiny_sam_encoder(depth=2, global_attn_indexes=(1,)), 32).eval()
    snap = _snapshot(shallower)
    with pytest.raises(ValueError, match="unexpected"):
        ma.load_adapter(shallower, tmp_path)
    _assert_unchanged(shallower, snap)
    other_cfg = ma.inject(sam_model(), ma.MedSAConfig(mlp_ratio=0.5))
    snap = _snapshot(other_cfg)
    with pytest.raises(ValueError, match="configs"):
        ma.load_adapter(other_cfg, tmp_path)
    _assert_unchanged(other_cfg, snap)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ma.load_adapter(sam_model(), tmp_path)


@pytest.mark.parametrize("shape", [(7, 48), (2, 3, 5, 48), (1, 2, 3, 4, 48)])
def test_adapter_any_leading_shape_and_bf16(shape):
    adapter = ma.adapters.BottleneckAdapter(48, 0.25, zero_init=False)
    x = torch.randn(*shape)
    out = adapter(x)
    ref = adapter.up(torch.nn.functional.gelu(adapter.down(x)))
    torch.testing.assert_close(out, ref)
    out16 = adapter.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16 and out16.shape == x.shape
    torch.testing.assert_close(out16.float(), ref, atol=0.05, rtol=0.05)


def test_sam_in_bf16_keeps_identity_at_init():
    model = sam_model()
    x = torch.randn(1, 3, 64, 64)
    model = model.to(torch.bfloat16)
    ref = model(x.bfloat16())
    ma.inject(model, ma.MedSAConfig())
    model.to(torch.bfloat16)
    assert torch.equal(model(x.bfloat16()), ref)


def test_missing_extra_names_it():
    with pytest.raises(ImportError, match=r"medadapt\[monai\]"):
        require("monai.no_such_module", "NIfTI loading")


def test_atomic_picture_without_extension_is_png(tmp_path):
    """A picture path without a suffix: the temporary name must not make matplotlib guess the format 'tmp'."""
    pytest.importorskip("matplotlib")
    from medadapt.train.loop import History
    from medadapt.train.plots import save_curves

    history = History()
    history.steps, history.losses = [1, 2], [1.0, 0.5]
    history.record_eval(0, {"dice": 0.1, "dice_per_class": [0.1]})
    save_curves(tmp_path / "curves", history, ["wm"])
    assert (tmp_path / "curves").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves"]


def test_inject_records_a_copy_of_the_config(tmp_path):
    """Reusing the config object for another run must not change what the first model saves."""
    config = ma.MedSAConfig(mlp_ratio=0.25)
    model = ma.inject(sam_model(), config)
    config.mlp_ratio = 0.5
    injected_configs(model)[0].mlp_ratio = 0.75  # a copy as well
    assert injected_configs(model)[0].mlp_ratio == 0.25
    ma.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["configs"][0]["mlp_ratio"] == 0.25
    ma.load_adapter(sam_model(), tmp_path)
