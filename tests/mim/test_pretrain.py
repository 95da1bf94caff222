"""The pretraining example at tiny sizes: outputs, fine-tune comparison, and exact resume."""

import json
import math

import pytest
import torch

from medadapt.mim import pretrain
from medadapt.mim.pretrain import PRESETS, _schedules, _warmup_steps, build_encoder, build_parser, main

pytest.importorskip("tqdm")

TINY = ["--channels", "2,4,4,8", "--mamba-depth", "1", "--d-state", "2", "--crop", "32", "--batch-size", "2",
        "--save-every", "1", "--device", "cpu"]
SETTINGS = dict(channels=(2, 4, 4, 8), depths=(1, 1, 1, 1), expansions=(2, 2, 2, 2), mamba_depth=1, d_state=2)


@pytest.fixture(autouse=True)
def phantom(monkeypatch):
    """A small two-tissue sphere instead of MNI152 (keeps nilearn's import and resampling out of the test)."""
    axis = torch.linspace(-1, 1, 40)
    radius = (axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2).sqrt()
    label = torch.where(radius < 0.45, 2, torch.where(radius < 0.8, 1, 0))
    image = label.float() * 0.4 + 0.05 * torch.rand(label.shape, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr("medadapt.mim.pretrain.load_tissue_volume",
                        lambda: (image, label, ("background", "grey_matter", "white_matter")))


@pytest.mark.slow
def test_two_step_run_writes_outputs_and_compares_finetuning(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    summary = main(TINY + ["--steps", "2", "--out", str(tmp_path), "--finetune", "--finetune-steps", "1"])
    for name in ("checkpoint.pt", "encoder.safetensors", "reconstruction.png", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert summary["steps_done"] == 2 and json.loads((tmp_path / "summary.json").read_text())["crop"] == 32
    assert set(summary["finetune_dice"]) == {"random", "pretrained"}
    assert all(len(v) == 2 for v in summary["finetune_dice"].values())  # grey, white matter
    printed = capsys.readouterr().out
    assert "held-out Dice" in printed and "pretrained" in printed and "white_matter" in printed
    from safetensors.torch import load_file

    plain = build_encoder(SETTINGS, seed=123)
    plain.load_state_dict(load_file(str(tmp_path / "encoder.safetensors")), strict=True)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, state["model"][f"encoder.{key}"]), key


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = TINY + ["--steps", "4", "--no-png"]
    main(common + ["--out", str(straight)])
    main(common + ["--out", str(split), "--stop-after", "2"])
    interrupted = torch.load(split / "checkpoint.pt", weights_only=True)
    assert interrupted["step"] == 2
    main(common + ["--out", str(split), "--resume", str(split)])
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["losses"] == b["losses"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert not torch.equal(a["model"]["toki.A"], interrupted["model"]["toki.A"])  # training moved on
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_crop_raises(tmp_path):
    with pytest.raises(ValueError, match="--crop"):
        main(TINY[:-8] + ["--crop", "20", "--steps", "1", "--out", str(tmp_path)])


def test_folder_volumes_window_and_padded_crops(tmp_path):
    nib = pytest.importorskip("nibabel")
    import numpy as np

    from medadapt.mim._data import CropSampler, load_folder_volumes

    data = np.linspace(-500, 500, 10 * 12 * 6, dtype=np.float32).reshape(10, 12, 6)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    (tmp_path / "notes.txt").write_text("ignored")
    (volume,) = load_folder_volumes(tmp_path, window=(-175.0, 250.0))
    assert volume.shape == (10, 12, 6) and volume.min() == 0 and volume.max() == 1
    torch.testing.assert_close(volume[5, 6, 3], torch.tensor((float(data[5, 6, 3]) + 175) / 425).clamp(0, 1))
    images, labels = CropSampler([volume], 8).sample(3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 8, 8, 8) and labels is None
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ValueError, match="data"):
            load_folder_volumes(folder)


@pytest.mark.parametrize("argv, steps", [(["--preset", "paper"], 40), (["--preset", "small"], 10), ([], 10),
                                         (["--preset", "paper", "--warmup", "0.1"], 10),
                                         (["--preset", "paper", "--warmup", "0"], 0),
                                         (["--preset", "small", "--warmup", "0.4"], 40)])
def test_warmup_follows_the_preset_unless_given(argv, steps):
    """The paper's recipe: 40 warm-up epochs of 100; an explicit --warmup wins (0 included)."""
    args = build_parser().parse_args(argv + ["--steps", "100"])
    assert _warmup_steps(args) == steps


def test_paper_recipe_is_the_default_of_the_paper_preset():
    """METHODS.md §3: AdamW lr 1e-4, 40 of 100 epochs warm-up, wd 0.04 → 0.2, grad clip 5."""
    args = build_parser().parse_args(["--preset", "paper", "--steps", "100"])
    assert PRESETS["paper"]["lr"] == 1e-4 and args.lr is None  # main: lr = --lr or the preset's
    assert _warmup_steps(args) == 40
    assert tuple(args.weight_decay) == (0.04, 0.2)
    assert args.clip == 5.0


@pytest.mark.parametrize("total, warmup", [(100, 40), (37, 3)])
def test_schedules_follow_the_documented_formulas(total, warmup):
    """Linear warm-up to lr over ``warmup`` steps, then a cosine from lr towards 1% of lr; weight decay
    rising 0.04 → 0.2 on a half cosine over the whole run (first step 0.04, last step 0.2)."""
    lr, wd = 1e-4, (0.04, 0.2)
    rates, decays = zip(*(_schedules(step, total, warmup, lr, wd) for step in range(total)))
    assert rates[0] == pytest.approx(lr / warmup, rel=1e-12)  # start: one warm-up step done
    assert rates[warmup - 1] == pytest.approx(lr, rel=1e-12)  # end of warm-up: the peak
    assert rates[warmup] == pytest.approx(lr, rel=1e-12)  # the cosine starts at the peak
    for step in range(warmup):  # linear
        assert rates[step] == pytest.approx(lr * (step + 1) / warmup, rel=1e-12)
    for step in range(warmup, total):  # cosine to 0.01·lr at step == total
        t = (step - warmup) / (total - warmup)
        assert rates[step] == pytest.approx(lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))), rel=1e-12)
    assert rates[-1] == pytest.approx(lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (1 - 1 / (total - warmup))))))
    assert _schedules(total, total, warmup, lr, wd)[0] == pytest.approx(0.01 * lr, rel=1e-12)  # the floor
    assert all(a <= b for a, b in zip(rates[:warmup], rates[1:warmup]))
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:]))
    assert decays[0] == pytest.approx(0.04, rel=1e-12) and decays[-1] == pytest.approx(0.2, rel=1e-12)
    for step, value in enumerate(decays):
        t = step / (total - 1)
        assert value == pytest.approx(0.04 + 0.16 * 0.5 * (1 - math.cos(math.pi * t)), rel=1e-12)
    assert all(a < b for a, b in zip(decays, decays[1:]))


def test_schedules_midpoints_and_no_warmup():
    assert _schedules(70, 100, 40, 1.0, (0.04, 0.2))[0] == pytest.approx(0.505)  # half-way down the cosine
    assert _schedules(50, 101, 40, 1.0, (0.04, 0.2))[1] == pytest.approx(0.12)  # half-way up the wd ramp
    assert _schedules(0, 10, 0, 2e-4, (0.04, 0.2)) == pytest.approx((2e-4, 0.04))  # no warm-up: the peak at once


def test_training_step_uses_the_schedules_adamw_and_the_documented_clip(tmp_path, monkeypatch):
    """One real step of main() with the paper preset: AdamW, lr/wd set from the schedules on the right
    parameter groups (biases and norms without decay), clip_grad_norm_ called with 5."""
    clips, optimizers = [], []
    real_clip, real_optimizer = torch.nn.utils.clip_grad_norm_, pretrain._optimizer

    def clip(params, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)

    def optimizer(model):
        optimizers.append(real_optimizer(model))
        return optimizers[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(pretrain, "_optimizer", optimizer)
    main(TINY[:-8] + ["--crop", "32", "--batch-size", "1", "--device", "cpu", "--preset", "paper",
                      "--steps", "10", "--stop-after", "1", "--save-every", "100", "--no-png",
                      "--out", str(tmp_path)])
    assert clips == [5.0]
    (opt,) = optimizers
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["decay"] and not no_decay["decay"]
    assert decay["lr"] == no_decay["lr"] == pytest.approx(1e-4 / 4)  # step 0 of a 4-step warm-up
    assert decay["weight_decay"] == pytest.approx(0.04) and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 and not getattr(p, "_no_weight_decay", False) for p in decay["params"])
    assert all(p.ndim <= 1 or p._no_weight_decay for p in no_decay["params"])
