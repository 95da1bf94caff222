"""`medadapt segment`: slab tiling, prompts per slice, the inverse preprocessing back onto the file's grid,
the run spec (job.json) and its backbone check, and a tiny train-then-segment run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medadapt.cli import main as cli_main
from medadapt.train.run_spec import JOB_FILE, RunSpec, load_run, read_run_spec
from medadapt.train.segment3d import box_prompt_map, predict_label_map, segment_file, slab_starts
from medadapt.train.segment_job import main as main_segment
from medadapt.train.segment_job import mean_dice, resolve_cases

nib = pytest.importorskip("nibabel")  # a bare GPU machine may lack the extras: skip, not a collection error
pytest.importorskip("monai")

# voxel axes permuted and flipped against RAS, anisotropic: the preprocessing reorients and crops
AFFINE = np.array([[0.0, -2.0, 0.0, 30.0], [1.5, 0.0, 0.0, -12.0], [0.0, 0.0, -2.5, 8.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (19, 14, 11)


class BoxEcho(nn.Module):
    """Answers each box prompt with exactly the box: logits +5 inside, -5 outside, at the label size."""

    def forward(self, batch: dict) -> dict:
        boxes = batch["boxes"]  # (1, D, K, 4) xyxy on the label grid
        h, w = batch["label_size"]
        ys = torch.arange(h).view(h, 1)
        xs = torch.arange(w).view(1, w)
        x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))
        inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        return {"logits": torch.where(inside, 5.0, -5.0)}


def _spec(**changes) -> RunSpec:
    values = dict(arch="tiny", img_size=32, depth=3, prompt="box", classes=[1, 2], class_names=["a", "b"], seed=0)
    values.update(changes)
    return RunSpec(**values)


def _image(path: Path) -> None:
    rng = np.random.default_rng(0)
    image = np.zeros(SHAPE, dtype=np.float32)
    image[2:-2, 2:-2, 1:-1] = 0.5 + rng.random((SHAPE[0] - 4, SHAPE[1] - 4, SHAPE[2] - 2))
    nib.save(nib.Nifti1Image(image, AFFINE), str(path))


def test_slab_starts_cover_every_slice_once_from_the_front():
    assert slab_starts(9, 3) == [0, 3, 6]
    assert slab_starts(10, 3) == [0, 3, 6, 7]
    assert slab_starts(3, 3) == [0] and slab_starts(5, 1) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="fewer than the run's slab depth 4"):
        slab_starts(3, 4)


def test_box_prompt_map_fills_inclusive_boxes_and_names_bad_ones():
    prompt = box_prompt_map((5, 6, 7), [(1, 0, 1, 2, 2, 3, 4), (2, 2, 2, 2, 4, 5, 6)])
    assert (prompt == 1).sum() == 3 * 3 * 3 - 1 * 2 * 3 and prompt[2, 2, 2] == 2 and (prompt == 2).sum() == 3 * 4 * 5
    with pytest.raises(ValueError, match="box 0: corners"):
        box_prompt_map((5, 6, 7), [(1, 0, 0, 0, 5, 1, 1)])
    with pytest.raises(ValueError, match="box 1: class must be > 0"):
        box_prompt_map((5, 6, 7), [(1, 0, 0, 0, 1, 1, 1), (0, 0, 0, 0, 1, 1, 1)])


def test_a_perfect_box_answer_comes_back_exactly_on_the_files_grid(tmp_path):
    """Reorientation, crop, slab tiling (D = 3 does not divide the slices), the in-plane turn and the inverse
    transforms: a model answering each box with the box itself gives back the prompt map voxel for voxel."""
    _image(tmp_path / "img.nii.gz")
    boxes = [(1, 3, 3, 1, 9, 8, 8), (2, 10, 5, 3, 15, 10, 9)]
    result = segment_file(BoxEcho(), _spec(), tmp_path / "img.nii.gz", tmp_path / "out" / "seg.nii.gz", boxes=boxes,
                          overlays=tmp_path / "out" / "overlays.png")
    written = nib.load(str(result.output))
    np.testing.assert_allclose(written.affine, AFFINE)
    assert written.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(written.dataobj), box_prompt_map(SHAPE, boxes))
    assert result.voxels_per_class == {"a": 7 * 6 * 8, "b": 6 * 6 * 7} and result.overlays.stat().st_size > 0


def test_a_prompt_label_on_another_grid_and_the_reference_dice(tmp_path):
    _image(tmp_path / "img.nii.gz")
    truth = box_prompt_map(SHAPE, [(2, 4, 4, 2, 12, 9, 8)])
    shifted = AFFINE.copy()
    shifted[:3, 3] += AFFINE[:3, 0]  # the label's voxel i is the image's voxel i + 1 along x
    nib.save(nib.Nifti1Image(np.roll(truth, -1, axis=0).astype(np.uint8), shifted), str(tmp_path / "lab.nii.gz"))
    nib.save(nib.Nifti1Image(truth.astype(np.uint8), AFFINE), str(tmp_path / "ref.nii.gz"))
    result = segment_file(BoxEcho(), _spec(), tmp_path / "img.nii.gz", tmp_path / "seg.nii", tmp_path / "lab.nii.gz",
                          reference=tmp_path / "ref.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "seg.nii")).dataobj), truth)
    assert result.dice_per_class == {"a": None, "b": 1.0}  # class a: not in the reference, no score


def test_classes_without_a_prompt_in_a_slice_are_not_predicted_there():
    spec = _spec(depth=2, axis=2, quarter_turns=0)

    class Everywhere(nn.Module):
        def forward(self, batch):
            d, k = batch["boxes"].shape[1:3]
            return {"logits": torch.arange(1.0, k + 1).view(1, 1, k, 1, 1).expand(1, d, k, *batch["label_size"])}

    prompt = torch.zeros(4, 5, 3, dtype=torch.long)
    prompt[1, 1, 0] = 1
    prompt[2, 2, 1] = 2
    prompt[3, 3, 1] = 1
    label = predict_label_map(Everywhere(), torch.rand(4, 5, 3), prompt, spec)
    # slice 0: only class 1 prompted -> 1 everywhere; slice 1: both -> the higher logit (class 2); slice 2: none
    assert (label[..., 0] == 1).all() and (label[..., 1] == 2).all() and (label[..., 2] == 0).all()


def test_run_spec_round_trip_and_refusals(tmp_path):
    spec = _spec(volume_options={"intensity": "window", "window": (-175.0, 250.0), "pixdim": (1.0, 1.0, 2.0)})
    spec.save(tmp_path)
    assert read_run_spec(tmp_path) == spec
    # every preprocessing option is recorded, the defaults of the time included
    assert spec.volume_options["orientation"] == "RAS" and spec.volume_options["crop_foreground"] == "image"
    record = json.loads((tmp_path / JOB_FILE).read_text())
    with pytest.raises(ValueError, match="has no job.json"):
        read_run_spec(tmp_path / "elsewhere")
    (tmp_path / JOB_FILE).write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        read_run_spec(tmp_path)
    (tmp_path / JOB_FILE).write_text(json.dumps({**record, "colour": "red"}))
    with pytest.raises(ValueError, match="unknown fields"):
        read_run_spec(tmp_path)
    (tmp_path / JOB_FILE).write_text(json.dumps({**record, "prompt": "scribble"}))
    with pytest.raises(ValueError, match="prompt must be 'box' or 'point'"):
        read_run_spec(tmp_path)
    for bad, match in ((dict(volume_options=None), "volume_options must be a JSON object"),
                       (dict(volume_options={"colour": 1}), "unknown volume preprocessing options"),
                       (dict(volume_options={"intensity": "banana"}), "intensity must be one of"),
                       (dict(quarter_turns=1.5), "quarter_turns must be an integer"),
                       (dict(format_version="x"), "format_version must be an integer")):
        (tmp_path / JOB_FILE).write_text(json.dumps({**record, **bad}))
        with pytest.raises(ValueError, match=match):
            read_run_spec(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["box", "point"])
def test_train_then_segment_from_the_command_line(tmp_path, prompt):
    from test_finetune3d import TINY, _write_pair

    image, label = _write_pair(tmp_path / "data", slices=12)
    run = tmp_path / "run"
    assert cli_main(["demo", *TINY, "--prompt", prompt, "--image", image, "--label", label, "--out", str(run),
                     "--no-compare"]) == 0
    spec = read_run_spec(run)
    assert (spec.prompt, spec.classes, spec.depth, spec.arch) == (prompt, [1, 2], 2, "tiny")
    assert cli_main(["segment", "--run", str(run), "--image", image, "--prompt-label", label, "--reference", label,
                     "--out", str(tmp_path / "seg"), "--no-progress"]) == 0
    written = nib.load(str(tmp_path / "seg" / "case_pred.nii.gz"))
    assert written.shape == nib.load(image).shape and set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
    record = json.loads((tmp_path / "seg" / "segment.json").read_text())
    assert set(record["cases"][0]["dice_per_class"]) == {"class_1", "class_2"} and record["prompt"] == prompt
    assert (tmp_path / "seg" / "case_overlays.png").stat().st_size > 0


def test_a_folder_of_cases_gives_dice_per_case_and_their_mean(tmp_path):
    from test_finetune3d import _write_pair

    from medadapt.core.config import MedSAConfig
    from medadapt.core.inject import inject
    from medadapt.core.io import save_adapter
    from medadapt.train import build_sam
    from medadapt.train.run_spec import backbone_fingerprint

    sam = build_sam("tiny", 32, seed=0)
    spec = _spec(depth=2, backbone_fingerprint=backbone_fingerprint(sam))
    inject(sam, MedSAConfig(modules_to_save=["mask_decoder"]))
    save_adapter(sam, tmp_path / "run" / "adapter")
    spec.save(tmp_path / "run")
    for name in ("a", "b"):
        _write_pair(tmp_path / "cases", slices=6, name=name)
    lines = []
    assert main_segment(["--run", str(tmp_path / "run"), "--data-dir", str(tmp_path / "cases"), "--no-progress"],
                        log=lines.append) == 0
    record = json.loads((tmp_path / "run" / "segment" / "segment.json").read_text())
    assert [Path(c["output"]).name for c in record["cases"]] == ["a_pred.nii.gz", "b_pred.nii.gz"]
    for name in ("a", "b"):
        written = nib.load(str(tmp_path / "run" / "segment" / f"{name}_pred.nii.gz"))
        np.testing.assert_allclose(written.affine, np.eye(4))
    per_case = [c["dice_per_class"]["a"] for c in record["cases"]]
    assert record["mean_dice_per_class"]["a"] == pytest.approx(sum(per_case) / 2)
    assert lines[-1].startswith("[segment] mean Dice over the cases whose reference has the class: a ")


def test_segment_arguments_that_do_not_pair_up_are_refused(tmp_path):
    with pytest.raises(ValueError, match="2 --image but 1 --prompt-label"):
        resolve_cases(["a.nii", "b.nii"], ["la.nii"])
    with pytest.raises(ValueError, match="--box prompts a single --image"):
        resolve_cases(["a.nii", "b.nii"], boxes=[[1, 0, 0, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="--data-dir takes its images"):
        resolve_cases(["a.nii"], data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="1 --image but 2 --reference"):
        resolve_cases(["a.nii"], ["la.nii"], references=["r1.nii", "r2.nii"])
    with pytest.raises(ValueError, match="name the volumes"):
        resolve_cases()
    assert resolve_cases(["a.nii"], boxes=[[1, 0, 0, 0, 1, 1, 1]], references=["r.nii"])[0].reference == "r.nii"
    with pytest.raises(SystemExit):
        cli_main(["segment", "--run", str(tmp_path), "--image", "a.nii"])  # no prompt: a usage error


def test_load_run_refuses_another_backbone(tmp_path, monkeypatch):
    from medadapt.core.config import MedSAConfig
    from medadapt.core.inject import inject
    from medadapt.core.io import save_adapter
    from medadapt.train import build_sam
    from medadapt.train.run_spec import backbone_fingerprint

    sam = build_sam("tiny", 32, seed=3)
    spec = _spec(seed=3, backbone_fingerprint=backbone_fingerprint(sam))
    inject(sam, MedSAConfig(modules_to_save=["mask_decoder"]))
    save_adapter(sam, tmp_path / "adapter")
    spec.save(tmp_path)
    loaded, _ = load_run(tmp_path)
    torch.testing.assert_close(loaded.state_dict(), sam.state_dict(), rtol=0, atol=0)
    RunSpec(**{**spec.__dict__, "seed": 4}).save(tmp_path)
    with pytest.raises(ValueError, match="rebuilt from seed 4 .* does not have the weights"):
        load_run(tmp_path)


def test_slabs_without_any_prompt_skip_the_model():
    calls = []

    class Counting(BoxEcho):
        def forward(self, batch):
            calls.append(batch["boxes"].shape)
            return super().forward(batch)

    prompt = torch.zeros(6, 7, 9, dtype=torch.long)
    prompt[2:4, 2:5, 4] = 1  # only slice 4 is prompted: one slab of the three (D = 3)
    label = predict_label_map(Counting(), torch.rand(6, 7, 9), prompt, _spec(quarter_turns=0))
    assert len(calls) == 1 and torch.equal(label, prompt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_segment_on_cuda_agrees_with_cpu(tmp_path):
    from medadapt.core.config import MedSAConfig
    from medadapt.core.inject import inject
    from medadapt.core.io import save_adapter
    from medadapt.train import build_sam
    from medadapt.train.run_spec import backbone_fingerprint

    sam = build_sam("tiny", 32, seed=0)
    spec = _spec(backbone_fingerprint=backbone_fingerprint(sam))
    inject(sam, MedSAConfig(space_depth=True, depth_pos_embed=3, modules_to_save=["mask_decoder"]))
    with torch.no_grad():
        for p in sam.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # a "trained" adapter: not the identity
    save_adapter(sam, tmp_path / "run" / "adapter")
    spec.save(tmp_path / "run")
    _image(tmp_path / "img.nii.gz")
    boxes = [(1, 3, 3, 1, 9, 8, 8), (2, 10, 5, 3, 15, 10, 9)]
    outputs = {}
    for device in ("cpu", "cuda"):
        model, spec = load_run(tmp_path / "run", device=device)
        result = segment_file(model, spec, tmp_path / "img.nii.gz", tmp_path / f"{device}.nii.gz", boxes=boxes,
                              device=device)
        outputs[device] = np.asarray(nib.load(str(result.output)).dataobj)
    assert (outputs["cpu"] == outputs["cuda"]).mean() > 0.995  # TF32 / kernel order may flip a voxel at logit ~0


def _untrained_run(folder: Path) -> None:
    from medadapt.core.config import MedSAConfig
    from medadapt.core.inject import inject
    from medadapt.core.io import save_adapter
    from medadapt.train import build_sam
    from medadapt.train.run_spec import backbone_fingerprint

    sam = build_sam("tiny", 32, seed=0)
    spec = _spec(depth=2, backbone_fingerprint=backbone_fingerprint(sam))
    inject(sam, MedSAConfig(modules_to_save=["mask_decoder"]))
    save_adapter(sam, folder / "adapter")
    spec.save(folder)


def test_outputs_never_overwrite_inputs_and_a_bad_case_is_recorded(tmp_path):
    from test_finetune3d import _write_pair

    _untrained_run(tmp_path / "run")
    cases = tmp_path / "cases"
    for name in ("a", "b"):
        _write_pair(cases, slices=6, name=name)
    prompt = cases / "a_pred.nii.gz"  # a prompt label named like the output `--out cases` would write for a.nii.gz
    prompt.write_bytes((cases / "a_label.nii.gz").read_bytes())
    with pytest.raises(SystemExit):
        main_segment(["--run", str(tmp_path / "run"), "--image", str(cases / "a.nii.gz"), "--prompt-label",
                      str(prompt), "--out", str(cases), "--no-progress"])
    assert prompt.read_bytes() == (cases / "a_label.nii.gz").read_bytes()
    # one case whose prompts hold none of the run's classes: recorded, the other case still written, exit 1
    empty = np.zeros((20, 22, 6), np.uint8)
    empty[2, 2, 2] = 7
    nib.save(nib.Nifti1Image(empty, np.eye(4)), str(tmp_path / "seven.nii.gz"))
    lines = []
    code = main_segment(["--run", str(tmp_path / "run"), "--image", str(cases / "a.nii.gz"), "--prompt-label",
                         str(tmp_path / "seven.nii.gz"), "--image", str(cases / "b.nii.gz"), "--prompt-label",
                         str(cases / "b_label.nii.gz"), "--out", str(tmp_path / "out"), "--no-progress"],
                        log=lines.append)
    record = json.loads((tmp_path / "out" / "segment.json").read_text())
    assert code == 1 and record["failed"] == [str(cases / "a.nii.gz")] and "error" in record["cases"][0]
    assert (tmp_path / "out" / "b_pred.nii.gz").exists() and not (tmp_path / "out" / "a_pred.nii.gz").exists()
    assert "FAILED" in lines[0] and lines[-1].startswith("[segment] 1 of 2 case(s) failed")
    with pytest.raises(SystemExit):  # predictions inside the data folder would read as unlabelled cases later
        main_segment(["--run", str(tmp_path / "run"), "--data-dir", str(cases), "--out", str(cases / "pred")])


def test_a_case_failing_with_any_error_is_recorded(tmp_path, monkeypatch):
    from test_finetune3d import _write_pair

    import medadapt.train.segment_job as job

    _untrained_run(tmp_path / "run")
    image, label = _write_pair(tmp_path / "cases", slices=6)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(job, "segment_file", out_of_memory)
    assert job.main(["--run", str(tmp_path / "run"), "--image", image, "--prompt-label", label, "--out",
                     str(tmp_path / "out"), "--no-progress"], log=lambda _: None) == 1
    record = json.loads((tmp_path / "out" / "segment.json").read_text())
    assert record["cases"][0]["error"] == "CUDA out of memory" and record["mean_dice_per_class"] is None


def test_mean_dice_skips_classes_a_reference_lacks():
    records = [{"dice_per_class": {"a": 0.5, "b": None}}, {"dice_per_class": {"a": 0.7, "b": 0.2}},
               {"error": "unreadable"}]
    assert mean_dice(records, ["a", "b"]) == {"a": pytest.approx(0.6), "b": 0.2}
    assert mean_dice([{"error": "x"}], ["a"]) is None


def test_a_5d_prompt_label_and_a_written_label_header(tmp_path):
    _image(tmp_path / "img.nii.gz")
    truth = box_prompt_map(SHAPE, [(2, 4, 4, 2, 12, 9, 8)])
    nib.save(nib.Nifti1Image(truth[..., None, None].astype(np.uint8), AFFINE), str(tmp_path / "lab.nii.gz"))
    result = segment_file(BoxEcho(), _spec(), tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "lab.nii.gz")
    written = nib.load(str(result.output))
    np.testing.assert_array_equal(np.asarray(written.dataobj), truth)
    assert written.header.get_intent()[0] == "label" and float(written.header["cal_max"]) == 2.0
