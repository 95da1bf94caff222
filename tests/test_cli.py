"""The ``medadapt`` command: help texts, lazy imports, a tiny 2D fine-tune, and the bench runner."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import medadapt as ma
from medadapt.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny ops: a second OpenMP thread on a shared 2-core machine only spins (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "finetune", "segment", "pretrain", "bench"):
        assert command in text


def test_console_entry_imports_no_optional_dependency():
    code = ("import sys; from medadapt.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('segment_anything', 'monai', 'matplotlib', 'nilearn', 'peft') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out and "finetune" in out


@pytest.mark.parametrize("command, expected", [
    ("finetune", "--prompt"), ("demo", "--checkpoint"), ("segment", "--prompt-label"), ("bench", "--list")])
def test_subcommand_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert expected in out and f"medadapt {command}" in out


def test_pretrain_delegates_or_says_it_is_missing(capsys):
    if importlib.util.find_spec("medadapt.mim") and importlib.util.find_spec("medadapt.mim.pretrain"):
        with pytest.raises(SystemExit) as exit_info:
            main(["pretrain", "--help"])
        assert exit_info.value.code == 0
    else:
        assert main(["pretrain", "--help"]) == 2
        assert "medadapt.mim.pretrain is missing" in capsys.readouterr().err


def test_unknown_command_and_missing_3d_job(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2
    if importlib.util.find_spec("medadapt.train.finetune3d") is None:
        assert main(["finetune", "--3d"]) == 2
        assert "3D fine-tune is not available" in capsys.readouterr().err


def test_tiny_2d_finetune_writes_adapter_figures_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "--arch", "tiny", "--img-size", "32", "--steps", "2", "--batch-size", "2",
                 "--eval-every", "1", "--overlays", "2", "--no-progress", "--out", str(out),
                 "--cache-dir", str(tmp_path.parent / "mni_cache")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "RANDOM" in printed and "before" in printed and "-> after" in printed
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "curves.png", "job.json", "metrics.json",
                                                     "overlays.png"]
    for png in ("curves.png", "overlays.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_done"] == 2 and metrics["eval_steps"] == [0, 1, 2] and metrics["backbone"] == "random"
    assert 0.0 <= metrics["dice_before"] <= 1.0 and 0.0 <= metrics["dice_after"] <= 1.0
    from medadapt.train import build_sam

    fresh = build_sam("tiny", img_size=32)
    ma.load_adapter(fresh, out / "adapter")  # strict: the saved adapter fits a fresh model
    trainable, _ = ma.trainable_parameters(fresh)
    assert trainable == metrics["trainable_params"]
    # the 2D run applied to the whole volume, slice by slice, white matter prompted from the tissue label
    mni = tmp_path.parent / "mni_cache" / "mni152"
    image, tissue = mni / "t1_2mm.nii.gz", mni / "tissue_2mm_t0.5.nii.gz"
    with pytest.warns(UserWarning, match=r"values \[1\] of prompt label .* not among the run's classes \[2\]"):
        assert main(["segment", "--run", str(out), "--image", str(image), "--prompt-label", str(tissue),
                     "--reference", str(tissue), "--out", str(tmp_path / "wm"), "--no-progress"]) == 0
    import nibabel as nib

    written = nib.load(str(tmp_path / "wm" / "t1_2mm_pred.nii.gz"))
    assert written.shape == nib.load(str(image)).shape and set(np.unique(np.asarray(written.dataobj))) <= {0, 2}
    assert "white_matter" in json.loads((tmp_path / "wm" / "segment.json").read_text())["mean_dice_per_class"]


def test_bench_lists_and_runs_the_finetune_benchmark(tmp_path, capsys):
    assert main(["bench", "--list", "--dir", str(ROOT / "benchmarks")]) == 0
    assert "finetune" in capsys.readouterr().out.split()
    code = main(["bench", "finetune", "--dir", str(ROOT / "benchmarks"), "--", "--arch", "tiny", "--img-size", "32",
                 "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    rows = (tmp_path / "finetune_cpu.csv").read_text().splitlines()
    assert rows[0].startswith("case,") and [r.split(",")[0] for r in rows[1:]] == ["full_ft", "medadapt", "peft_lora"]


def test_example_script_runs_with_point_prompts(tmp_path, monkeypatch, capsys):
    import runpy

    out = tmp_path / "example"
    monkeypatch.setattr(sys, "argv", ["finetune_sam2d.py", "--arch", "tiny", "--img-size", "32", "--steps", "1",
                                      "--eval-every", "0", "--overlays", "1", "--prompt", "point", "--no-progress",
                                      "--out", str(out), "--cache-dir", str(tmp_path.parent / "mni_cache")])
    runpy.run_path(str(ROOT / "examples" / "finetune_sam2d.py"), run_name="__main__")
    assert "finetune_sam2d point] held-out Dice" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "overlays.png").is_file()


def test_3d_flag_is_an_option_only_before_the_separator(monkeypatch):
    calls = []
    monkeypatch.setattr("medadapt.cli._call", lambda target, what, argv, prog: calls.append((target, argv)) or 0)
    main(["finetune", "--epochs", "2", "--3d", "--out", "run"])
    main(["finetune", "--out", "run", "--", "--3d"])
    from medadapt.cli import FINETUNE_2D_JOB, FINETUNE_3D_JOB
    assert calls == [(FINETUNE_3D_JOB, ["--epochs", "2", "--out", "run"]),
                     (FINETUNE_2D_JOB, ["--out", "run", "--", "--3d"])]


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    from medadapt._optional import MissingExtra

    def missing(argv):
        raise MissingExtra("the demo volume needs the optional package 'nilearn', which is not installed: "
                           "pip install 'medadapt[demo]'")

    monkeypatch.setitem(__import__("medadapt.cli", fromlist=["_RUNNERS"])._RUNNERS, "demo", missing)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("medadapt demo: the demo volume needs the optional package 'nilearn', which is not "
                           "installed: pip install 'medadapt[demo]'")


def test_bench_mambamim_smoke(tmp_path):
    assert main(["bench", "mambamim", "--dir", str(ROOT / "benchmarks"), "--", "--size", "32", "--batch", "1",
                 "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]) == 0
    import csv

    (row,) = list(csv.DictReader(open(tmp_path / "mambamim_step_cpu.csv")))
    assert row["size"] == "32" and float(row["step_s"]) > 0 and int(row["encoder_params"]) > 9_000_000
