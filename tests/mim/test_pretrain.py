"""The pretraining example at tiny sizes: outputs, fine-tune comparison, and exact resume."""

import json

import pytest
import torch

from medadapt.mim.pretrain import _warmup_steps, build_encoder, build_parser, main

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
