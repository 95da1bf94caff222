"""Med-SA adapters on SAM (windowed + global blocks), timm and MONAI: identity at init, training, removal."""

import pytest
import torch
from tiny_models import WithHead, tiny_monai_vit, tiny_sam_encoder, tiny_timm_vit

import medadapt as ma
from medadapt.adapters import ParallelAdapterWrapper, SequentialAdapterWrapper
from medadapt.core import adapter_state_names

HOSTS = {
    "sam": (lambda: WithHead(tiny_sam_encoder(), 32), lambda: torch.randn(2, 3, 64, 64)),
    "timm": (lambda: WithHead(tiny_timm_vit(), 5), lambda: torch.randn(2, 3, 32, 32)),
    "monai": (lambda: WithHead(tiny_monai_vit(), 48), lambda: torch.randn(2, 1, 16, 16, 16)),
}


def build(host):
    torch.manual_seed(0)
    make_model, make_input = HOSTS[host]
    model = make_model().eval()
    torch.manual_seed(1)
    return model, make_input()


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_identity_at_init_then_training_moves_it(host):
    model, x = build(host)
    ref = model(x).detach()
    ma.inject(model, ma.MedSAConfig(modules_to_save=["head"]))
    assert torch.equal(model(x), ref)  # exact in float32: zero-initialised up-projections
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x).square().mean().backward()
    opt.step()
    assert not torch.allclose(model(x), ref)
    with ma.disable_adapters(model):
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_only_adapters_and_modules_to_save_get_gradients(host):
    model, x = build(host)
    ma.inject(model, ma.MedSAConfig(modules_to_save=["head"]))
    model(x).sum().backward()
    adapter_names = set(adapter_state_names(model))
    for name, p in model.named_parameters():
        trainable = ".adapter." in name or "head.trained." in name  # "head" also matches timm's encoder.head
        assert p.requires_grad == trainable, name
        assert (name in adapter_names) == trainable, name
        if not trainable:
            assert p.grad is None, name
    ups = [p.grad for n, p in model.named_parameters() if n.endswith("adapter.up.weight")]
    assert ups and all(g is not None and g.abs().sum() > 0 for g in ups)


def test_sam_every_block_windowed_and_global_is_wrapped():
    model, _ = build("sam")
    ma.inject(model, ma.MedSAConfig())
    blocks = model.encoder.blocks
    assert {b.window_size for b in blocks} == {0, 4}
    for block in blocks:
        assert isinstance(block.attn, SequentialAdapterWrapper)
        assert isinstance(block.mlp, ParallelAdapterWrapper)
        assert block.mlp.adapter.scale == 0.5 and block.attn.adapter.skip


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_remove_restores_tree_outputs_and_flags(host):
    model, x = build(host)
    before_tree = repr(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ref = model(x).detach()
    ma.inject(model, ma.MedSAConfig(modules_to_save=["head"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().mean().backward()
    opt.step()
    ma.remove_adapters(model)
    assert repr(model) == before_tree
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model(x), ref)
    with pytest.raises(ValueError, match="no medadapt adapters"):
        ma.remove_adapters(model)


def test_parameter_count_matches_formula():
    model, _ = build("sam")
    total_before = sum(p.numel() for p in model.parameters())
    ma.inject(model, ma.MedSAConfig(mlp_ratio=0.25))
    c, h = 48, 12
    per_adapter = 2 * c * h + h + c
    trainable, total = ma.trainable_parameters(model)
    assert trainable == 2 * 4 * per_adapter
    assert total == total_before + trainable
    assert ma.adapters.BottleneckAdapter(768, 0.25).hidden == 192
    assert sum(p.numel() for p in ma.adapters.BottleneckAdapter(768, 0.25).parameters()) == 295_872


def test_modules_to_save_not_counted_twice():
    model, _ = build("sam")
    total_before = sum(p.numel() for p in model.parameters())
    ma.inject(model, ma.MedSAConfig(space_adapter=False, mlp_adapter=True, modules_to_save=["head"]))
    trainable, total = ma.trainable_parameters(model)
    head = sum(p.numel() for p in model.head.base_layer.parameters())
    assert total == total_before + trainable - head
    line = ma.print_trainable_parameters(model)
    assert f"{trainable:,}" in line


def test_target_matching_regex_list_suffix_exclude():
    model, _ = build("sam")
    ma.inject(model, ma.MedSAConfig(target_modules=r"encoder\.blocks\.[02]"))
    wrapped = [i for i, b in enumerate(model.encoder.blocks) if isinstance(b.attn, SequentialAdapterWrapper)]
    assert wrapped == [0, 2]
    model, _ = build("sam")
    ma.inject(model, ma.MedSAConfig(target_modules=["blocks.1", "encoder.blocks.3"], exclude_modules=["blocks.3"]))
    wrapped = [i for i, b in enumerate(model.encoder.blocks) if isinstance(b.attn, SequentialAdapterWrapper)]
    assert wrapped == [1]


def test_nothing_matched_raises_and_leaves_model():
    model, x = build("sam")
    tree = repr(model)
    with pytest.raises(ValueError, match="target_modules"):
        ma.inject(model, ma.MedSAConfig(target_modules=["no_such_block"]))
    assert repr(model) == tree
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="matched no"):
        ma.inject(torch.nn.Linear(3, 3), ma.MedSAConfig())


def test_double_inject_of_same_method_rejected():
    model, _ = build("timm")
    ma.inject(model, ma.MedSAConfig())
    with pytest.raises(ValueError, match="already has 'medsa'"):
        ma.inject(model, ma.MedSAConfig())


def test_user_registered_host_block(monkeypatch):
    from medadapt.core import hosts

    monkeypatch.setattr(hosts, "_HOSTS", list(hosts.registered_hosts()))  # the registration ends with the test

    class MyBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_a, self.mix, self.ln_b, self.ffn = (torch.nn.LayerNorm(8), torch.nn.Linear(8, 8),
                                                        torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))

        def forward(self, x):
            x = x + self.mix(self.ln_a(x))
            return x + self.ffn(self.ln_b(x))

    ma.register_host(ma.HostIntegration(name="mine", block_types=(MyBlock,), attn="mix", mlp="ffn",
                                        dim=lambda b: b.ln_a.normalized_shape[0]))
    model = torch.nn.Sequential(MyBlock(), MyBlock())
    x = torch.randn(3, 5, 8)
    ref = model(x)
    ma.inject(model, ma.MedSAConfig())
    assert isinstance(model[1].mix, SequentialAdapterWrapper)
    assert torch.equal(model(x), ref)


def test_modules_to_save_trains_host_layers_under_nested_wrappers():
    """HyP-Adpt wraps decoder blocks; modules_to_save=["mask_decoder"] must still train the whole copy."""
    from tiny_models import tiny_sam

    torch.manual_seed(0)
    sam = tiny_sam()
    ma.inject(sam, ma.MedSAConfig(hyper_prompt=True, modules_to_save=["mask_decoder"]))
    decoder = sam.mask_decoder
    assert all(p.requires_grad for p in decoder.trained.parameters())
    assert not any(p.requires_grad for p in decoder.base_layer.parameters())
    assert not any(p.requires_grad for p in sam.prompt_encoder.parameters())


def test_inject_into_part_of_an_injected_model_rejected():
    """Two injections in one module tree stack wrappers that a saved adapter cannot be loaded back into."""
    from tiny_models import tiny_sam

    torch.manual_seed(0)
    sam = ma.inject(tiny_sam(depth=2), ma.MedSAConfig())
    tree = repr(sam)
    with pytest.raises(ValueError, match="module that contains it"):
        ma.inject(sam.image_encoder, ma.MedSAConfig(space_depth=True))
    assert repr(sam) == tree
    torch.manual_seed(0)
    sam = tiny_sam(depth=2)
    ma.inject(sam.image_encoder, ma.MedSAConfig())
    with pytest.raises(ValueError, match="submodule 'image_encoder' already has"):
        ma.inject(sam, ma.MedSAConfig(hyper_prompt=True))
    assert not hasattr(sam, "_medadapt_record")


def test_user_host_registered_before_the_builtins_load_is_kept(monkeypatch):
    """The built-ins load lazily; loading them must not replace a user integration of the same name."""
    import sys

    import medadapt.adapters
    from medadapt.core import hosts

    monkeypatch.setattr(hosts, "_HOSTS", [])
    for name in [m for m in sys.modules if m.startswith("medadapt.adapters.hosts")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(medadapt.adapters, "hosts", raising=False)
    mine = ma.HostIntegration(name="timm", block_types=("timm.models.vision_transformer:Block",))
    ma.register_host(mine)
    registered = hosts.registered_hosts()
    assert registered[0] is mine and [h.name for h in registered].count("timm") == 1
    assert {"sam", "monai"} <= {h.name for h in registered}


def test_wrapped_host_modules_answer_attribute_reads():
    model, _ = build("timm")
    ma.inject(model, ma.MedSAConfig())
    attn, mlp = model.encoder.blocks[0].attn, model.encoder.blocks[0].mlp
    assert isinstance(attn, SequentialAdapterWrapper) and attn.num_heads == 3
    assert mlp.fc1 is mlp.base_layer.fc1
    with pytest.raises(AttributeError):
        attn.no_such_attribute  # noqa: B018


def test_modules_to_save_wrapper_answers_reads_from_the_trained_copy():
    """What a user edits through ``sam.mask_decoder.<child>`` must be what trains and runs."""
    from tiny_models import tiny_sam

    sam = tiny_sam()
    ma.inject(sam, ma.MedSAConfig(modules_to_save=["mask_decoder"]))
    decoder = sam.mask_decoder
    assert decoder.transformer is decoder.trained.transformer is not decoder.base_layer.transformer
    assert decoder.num_mask_tokens == decoder.trained.num_mask_tokens
