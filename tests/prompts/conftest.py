"""Fixtures of the CILMP tests: tiny random-weight hosts and random class representations."""

import pytest
import torch

WIDTH_D = 20  # language-model width in the tests
REP_LENGTHS = {"pneumonia": 9, "normal lung": 12, "covid_19": 8}


def _tiny_clip(layers: int = 3, context_length: int = 77, vision_layers: int | None = None):
    """An open_clip ``CLIP`` with the real BPE vocabulary and tiny towers, random weights."""
    from open_clip.model import CLIP

    vision_layers = layers if vision_layers is None else vision_layers
    return CLIP(embed_dim=24,
                vision_cfg=dict(layers=vision_layers, width=32, head_width=16, patch_size=8, image_size=32),
                text_cfg=dict(layers=layers, width=32, heads=2, context_length=context_length, vocab_size=49408)).eval()


@pytest.fixture
def make_clip():
    pytest.importorskip("open_clip")
    return _tiny_clip


@pytest.fixture
def rep_lengths():
    return dict(REP_LENGTHS)


@pytest.fixture
def class_reps():
    g = torch.Generator().manual_seed(123)
    return {name: torch.randn(n, WIDTH_D, generator=g) for name, n in REP_LENGTHS.items()}


@pytest.fixture
def reps_file(tmp_path, class_reps):
    from medadapt.prompts import save_representations

    return save_representations(class_reps, tmp_path / "reps.safetensors")
