"""run_finetune on 3D slabs (the path the SD-Trans job takes), and its argument checks."""

import json

import numpy as np
import pytest
import torch

import medadapt as ma
from medadapt.data import VolumeSlabDataset
from medadapt.train import FinetuneOptions, PromptCollate, build_sam, run_finetune


def _volume(size=24, slices=8, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros((size, size, slices), dtype=np.int64)
    label[4:16, 5:18, :] = 1
    label[14:22, 2:10, 2:6] = 2
    image = (0.1 * rng.random(label.shape) + 0.7 * (label == 1) + 0.4 * (label == 2)).astype(np.float32)
    return {"image": image, "label": label}


def test_slab_finetune_with_sd_trans_and_hyp(tmp_path):
    sam = build_sam("tiny", img_size=32, seed=0)
    ma.inject(sam, ma.MedSAConfig(space_depth=True, hyper_prompt=True, modules_to_save=["mask_decoder"]))
    volume = _volume()
    train = VolumeSlabDataset([volume], depth=4, slice_range=range(0, 4), slice_size=32, channels=3)
    held = VolumeSlabDataset([volume], depth=4, slice_range=range(4, 8), slice_size=32, channels=3)
    eval_batches = [PromptCollate([1, 2], "box", jitter=0.0)([held[0]])]
    assert eval_batches[0]["image"].shape == (1, 3, 4, 32, 32) and eval_batches[0]["boxes"].shape == (1, 4, 2, 4)
    lines = []
    options = FinetuneOptions(steps=2, batch_size=1, lr=1e-3, eval_every=0, num_overlays=3, progress=False)
    result = run_finetune(sam, train, PromptCollate([1, 2], "box"), eval_batches, tmp_path, ["tissue", "lesion"],
                          options, log=lines.append, name="slabs")
    assert result.steps_done == 2 and len(result.dice_per_class_after) == 2
    assert lines[-1] == result.summary and "tissue/lesion" in result.summary
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["eval_steps"] == [0, 2] and metrics["class_names"] == ["tissue", "lesion"]
    fresh = build_sam("tiny", img_size=32)
    ma.load_adapter(fresh, tmp_path / "adapter")
    saved = ma.core.adapter_state_dict(fresh)
    trained = ma.core.adapter_state_dict(sam)
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


def test_run_finetune_needs_adapters_and_data(tmp_path):
    with pytest.raises(ValueError, match="inject"):
        run_finetune(build_sam("tiny", img_size=32), [{}], PromptCollate([1]), [{}], tmp_path, ["x"])
    sam = ma.inject(build_sam("tiny", img_size=32), ma.MedSAConfig())
    with pytest.raises(ValueError, match="train_set"):
        run_finetune(sam, [], PromptCollate([1]), [{}], tmp_path, ["x"])


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 1.5), ("lr", 0.0), ("eval_every", -1),
                                          ("max_train_minutes", 0.0), ("schedule_steps", 0),
                                          ("schedule_steps", 99)])  # below the default 100 steps
def test_bad_options(field, value):
    with pytest.raises(ValueError, match=field):
        FinetuneOptions(**{field: value})
