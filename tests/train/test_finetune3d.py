"""The 3D job (SD-Trans + HyP-Adpt vs decoder-only): slab split, verdict, tiny end-to-end runs, DDP, bad inputs."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import medadapt as ma
from medadapt.cli import main as cli_main
from medadapt.core.io import adapter_state_dict
from medadapt.train import build_sam
from medadapt.train.comparison import class_box_overlap, comparison_verdict, whole_region_agreement, whole_region_dice
from medadapt.train.finetune3d import DEFAULTS, arm_config, baseline_options
from medadapt.train.finetune3d import main as job_main
from medadapt.train.job import lr_scheduler
from medadapt.train.slab_sets import OrientedSlabs, foreground_extent, label_classes, slab_sets

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
TINY = ["--arch", "tiny", "--img-size", "32", "--depth", "2", "--steps", "2", "--batch-size", "1", "--overlays", "2",
        "--no-progress"]


def _volume(slices: int = 16, seed: int = 0) -> dict:
    """A 20 x 22 x ``slices`` volume: class 1 a slab-long block, class 2 a brighter block inside it."""
    rng = np.random.default_rng(seed)
    label = np.zeros((20, 22, slices), dtype=np.int64)
    label[3:16, 4:19, 1:slices - 1] = 1
    label[6:12, 8:15, 2:slices - 2] = 2
    image = (0.2 * rng.random(label.shape) + 0.3 * (label == 1) + 0.7 * (label == 2)).astype(np.float32)
    return {"image": image, "label": label}


def _write_pair(folder: Path, slices: int = 16, name: str = "case") -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    volume = _volume(slices)
    paths = (folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz")
    nib.save(nib.Nifti1Image(volume["image"], np.eye(4)), str(paths[0]))
    nib.save(nib.Nifti1Image(volume["label"].astype(np.uint8), np.eye(4)), str(paths[1]))
    return str(paths[0]), str(paths[1])


def test_foreground_extent_and_classes():
    label = _volume()["label"]
    assert foreground_extent(label) == range(1, 15)
    label[:, :, 1] = 0
    label[0, 0, 1] = 1  # one voxel: below 5 % of the largest slice
    assert foreground_extent(label) == range(2, 15) and foreground_extent(label, min_fraction=0.0) == range(1, 15)
    assert label_classes([{"label": label}, {"label": label[None] * 0 + 3}]) == [1, 2, 3]
    with pytest.raises(ValueError, match="no voxel"):
        foreground_extent(np.zeros((2, 2, 2)))


def test_slab_sets_split_with_a_gap_and_rotate():
    volume = _volume(slices=24)
    sets = slab_sets([volume, _volume(slices=24, seed=1)], depth=3, slice_size=(12, 10), held_out_fraction=0.25)
    (train,), (held,) = set(sets.train_ranges), set(sets.held_out_ranges)
    assert train.start == 1 and held.stop == 23 and held.start - train.stop == 3  # extent 1..22, gap = depth
    assert len(held) == 6 and len(sets.held_out) == 2 * 2  # two volumes, two tiling slabs each
    assert len(sets.train) == 2 * (len(train) - 3 + 1)  # a training slab at every start
    starts = sorted({sets.held_out[i]["start"] for i in range(len(sets.held_out))})
    assert starts == [held.start, held.start + 3]
    slab = sets.train[0]
    assert slab["image"].shape == (3, 3, 10, 12) and slab["label"].shape == (3, 10, 12)  # turned by 90 degrees
    raw = sets.train.slabs.datasets[0][0]
    assert torch.equal(slab["label"], torch.rot90(raw["label"], 1, (-2, -1)))
    assert torch.equal(OrientedSlabs([raw], 0)[0]["image"], raw["image"])
    with pytest.raises(ValueError, match="too few"):
        slab_sets([volume], depth=8, slice_size=None)


def test_verdict_wins_ties_and_says_why_not():
    kind, sentence = comparison_verdict(0.7, 0.6, True, 10)
    assert kind == "win" and "+0.1000" in sentence and "whole labelled region" not in sentence
    kind, sentence = comparison_verdict(0.6, 0.601, True, 10)
    assert kind == "tie" and "NOT win" in sentence and "random" in sentence
    kind, sentence = comparison_verdict(0.5, 0.6, False, 10)
    assert kind == "loss" and "10 steps" in sentence and "random" not in sentence
    kind, sentence = comparison_verdict(0.6, 0.6, True, 10, agreement=0.9, box_overlap=0.8)
    assert kind == "tie" and "whole labelled region (Dice 0.90" in sentence and "mean IoU 0.80" in sentence
    assert "IoU" not in comparison_verdict(0.6, 0.6, True, 10, agreement=0.9, box_overlap=0.3)[1]
    assert "whole" not in comparison_verdict(0.6, 0.6, True, 10, agreement=0.6, box_overlap=0.8)[1]


class _Answers(torch.nn.Module):
    """A stand-in model that answers with fixed logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, batch):
        return {"logits": self.logits}


def test_whole_region_reference_agreement_and_box_overlap_by_hand():
    target = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    target[0, 0, 0, :] = True  # class 0: 4 pixels; class 1: 4 other pixels; the union has 8
    target[0, 1, 1, :] = True
    present = torch.tensor([[True, True]])
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]]])  # 4 pixels each, 1 shared
    batch = {"target": target, "present": present, "boxes": boxes}
    reference = whole_region_dice([batch])
    assert reference["dice_per_class"] == pytest.approx([2 * 4 / (8 + 4)] * 2)
    assert reference["dice"] == pytest.approx(2 / 3)
    union = target.any(1, keepdim=True).expand_as(target)
    assert whole_region_agreement(_Answers(torch.where(union, 3.0, -3.0)), [batch]) == pytest.approx(1.0)
    assert whole_region_agreement(_Answers(torch.where(target, 3.0, -3.0)), [batch]) == pytest.approx(2 / 3)
    assert class_box_overlap([batch]) == pytest.approx(1 / 7)
    assert class_box_overlap([{**batch, "present": torch.tensor([[True, False]])}]) is None
    assert class_box_overlap([{"target": target, "present": present}]) is None


def test_decoder_only_arm_has_no_encoder_adapter():
    for arm, encoder_trains in (("adapted", True), ("decoder_only", False)):
        sam = ma.inject(build_sam("tiny", img_size=32, seed=0), arm_config(arm, depth=3))
        names = [n for n, p in sam.named_parameters() if p.requires_grad]
        assert any(n.startswith("image_encoder") for n in names) == encoder_trains, arm
        assert any("mask_decoder" in n for n in names)
        depth_embeds = [p for n, p in sam.named_parameters() if n.endswith("depth_pos_embed")]
        assert len(depth_embeds) == (2 if encoder_trains else 0) and all(p.shape[0] == 3 for p in depth_embeds)
    with pytest.raises(ValueError, match="arm"):
        arm_config("encoder_only", 3)


def _learning_rates(options, steps: int) -> list[float]:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=options.lr)
    scheduler = lr_scheduler(optimizer, options)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("steps_done", [60, DEFAULTS.steps])
def test_decoder_only_run_follows_the_adapted_learning_rates(steps_done):
    # the adapted run's time limit stopped it after steps_done of DEFAULTS.steps: the baseline stops there
    # too, on the same (not a shorter, whole) cosine schedule
    baseline = baseline_options(DEFAULTS, steps_done)
    assert baseline.steps == steps_done and baseline.max_train_minutes is None
    adapted = _learning_rates(DEFAULTS, DEFAULTS.steps)
    assert _learning_rates(baseline, steps_done) == adapted[:steps_done]
    assert baseline_options(baseline, 10).schedule_steps == DEFAULTS.steps


def test_tiny_job_on_user_volumes_through_the_cli(tmp_path, capsys):
    image, label = _write_pair(tmp_path / "data")
    out = tmp_path / "run"
    code = cli_main(["finetune", "--3d", *TINY, "--eval-every", "1", "--image", image, "--label", label,
                     "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert "RANDOM" in printed[0]
    assert printed[-1].startswith("[finetune-3d tiny@32 D=2 box] held-out Dice (class_1/class_2) after 2 steps: "
                                  "encoder adapters ") and " vs decoder-only " in printed[-1]
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "comparison.json", "comparison.png", "curves.png",
                                                     "decoder_only", "job.json", "metrics.json", "overlays.png"]
    assert sorted(p.name for p in (out / "decoder_only").iterdir()) == ["adapter", "curves.png", "job.json",
                                                                        "metrics.json", "overlays.png"]
    for png in ("curves.png", "overlays.png", "comparison.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out / "comparison.json").read_text())
    assert record["verdict"] in ("win", "tie", "loss") and record["summary"] == printed[-1]
    assert 0.0 <= record["whole_region_agreement"] <= 1.0 and 0.0 < record["whole_region_reference"]["dice"] <= 1.0
    assert record["adapted"]["steps"] == record["decoder_only"]["steps"] == 2
    assert record["class_names"] == ["class_1", "class_2"] and len(record["adapted"]["dice_per_class"]) == 2
    assert json.loads((out / "metrics.json").read_text())["eval_steps"] == [0, 1, 2]
    for arm, folder in (("adapted", out), ("decoder_only", out / "decoder_only")):
        fresh = build_sam("tiny", img_size=32)
        ma.load_adapter(fresh, folder / "adapter")  # strict: the saved adapter fits a fresh model
        assert ma.trainable_parameters(fresh)[0] == record[arm]["trainable_params"]


def test_example_script_on_the_bundled_volume_with_points(tmp_path, monkeypatch, capsys):
    out = tmp_path / "example"
    monkeypatch.setattr(sys, "argv", ["finetune_sam3d.py", *TINY, "--eval-every", "0", "--prompt", "point",
                                      "--no-compare", "--out", str(out),
                                      "--cache-dir", str(tmp_path.parent / "mni_cache")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "examples" / "finetune_sam3d.py"), run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "bundled MNI152 T1" in printed and "grey_matter/white_matter" in printed and "decoder-only" not in printed
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "overlays.png").is_file()
    assert not (out / "decoder_only").exists()


def test_two_gloo_processes_end_with_identical_adapters(tmp_path):
    image, label = _write_pair(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker3d.py"), str(tmp_path), image, label]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("held-out Dice") == 3  # two runs and the comparison, from rank 0 only
    for arm in ("adapted", "decoder_only"):
        rank0 = load_file(tmp_path / f"{arm}_rank0.safetensors")
        rank1 = load_file(tmp_path / f"{arm}_rank1.safetensors")
        assert set(rank0) == set(rank1) and rank0
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), (arm, name)
        start = adapter_state_dict(ma.inject(build_sam("tiny", img_size=32, seed=0), arm_config(arm, depth=2)))
        assert any(not torch.equal(start[n], rank0[n]) for n in rank0), arm  # training moved them
    lines = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert lines[0][0] == "2" and lines[0] == lines[1]  # same all-reduced held-out Dice on both ranks
    assert (tmp_path / "run" / "comparison.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--depth", "0"], "--depth must be >= 1"),
    (["--held-out-fraction", "1.5"], "--held-out-fraction"),
    (["--classes", "7"], "--classes [7] not found"),
    (["--depth", "6"], "too few"),
])
def test_bad_arguments_exit_with_a_clear_message(tmp_path, capsys, extra, message):
    image, label = _write_pair(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        job_main([*TINY, "--image", image, "--label", label, *extra, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_volume_files_name_the_problem(tmp_path, capsys):
    image, label = _write_pair(tmp_path / "data")
    cases = [(["--image", image], "pass one --label per --image"),
             (["--image", image, "--label", str(tmp_path / "missing.nii.gz")], "missing.nii.gz' does not exist"),
             (["--image", image, "--label", label, "--data-dir", str(tmp_path)], "not both")]
    (tmp_path / "notes.txt").write_text("not a volume")
    cases.append((["--image", image, "--label", str(tmp_path / "notes.txt")], "is not NIfTI"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            job_main([*TINY, *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, extra


def test_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["finetune", "--3d", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "medadapt finetune --3d" in text and "--no-compare" in text and "--depth" in text
