"""The tissue demo's training/evaluation loop runs end to end (tiny synthetic volume, two steps)."""

import pytest
import torch

pytest.importorskip("segment_anything")
pytest.importorskip("monai")


def test_demo_run_smoke(tmp_path):
    from medadapt.prompts.tissue_demo import run

    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (48, 30, 34), generator=gen)
    image = label.unsqueeze(1).float() / 3 + 0.05 * torch.randn(48, 1, 30, 34, generator=gen)
    reps = {name: torch.randn(n, 12, generator=gen) for name, n in (("grey_matter", 9), ("white_matter", 10),
                                                                     ("csf", 8))}
    sam_kwargs = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, prompt_dim=32)
    result = run(reps, image, label, steps=2, batch_size=2, workdir=tmp_path, log_every=0, sam_kwargs=sam_kwargs)
    assert set(result) == {"grey_matter", "white_matter", "csf", "mean"}
    assert all(0.0 <= v <= 1.0 for v in result.values())
