"""Apply a fine-tune to a new volume: a label map on the volume's own voxel grid, written as NIfTI.

    sam, spec = load_run("runs/finetune3d")
    segment_file(sam, spec, "case.nii.gz", "case_pred.nii.gz", prompt_label="rough.nii.gz", reference="seg.nii.gz")

The run folder's ``job.json`` (:mod:`medadapt.train.run_spec`; written by the 3D job and by the 2D one, whose
"slabs" are single slices) says how to rebuild the model and how its training volumes were prepared; the new
volume gets the same preprocessing (orientation, spacing, intensity scaling, foreground crop:
:func:`~medadapt.data.build_volume_preprocessing`). SAM needs a prompt per slice
and class, as in training: from a prompt label (a class map on the image's grid or another one: a coarse
mask, another tool's output, or the reference itself for an evaluation) or from 3D boxes in the file's voxel
indices (``--box CLASS X0 Y0 Z0 X1 Y1 Z1``, inclusive), each rasterised on the image's grid and sent through
the same transforms. Each slice gets the box of its prompt mask (a run trained with boxes) or the mask's
deepest pixel as a click (:func:`~medadapt.data.interior_points`, a run trained with points); a class
without prompt in a slice is not predicted there.

Slabs of D slices tile the preprocessed volume along the run's axis (the last one moved back to end at the
last slice when D does not divide the slice count; each slice keeps its first prediction), turned like the
training slabs, and SAM returns mask logits at each slice's full in-plane size. A voxel takes the class of
its highest logit among the classes prompted there, or background when no logit is above 0. MONAI's
``Invertd`` maps the label map back through the crop, spacing and orientation onto the file's voxel grid
(nearest neighbour); the NIfTI is written with the image's affine. With ``--reference`` the Dice per class
against it is computed on that grid; ``overlays`` shows a few slices. The command line
(``medadapt segment``, one volume or a set of cases) is :mod:`medadapt.train.segment_job`.
"""

from __future__ import annotations

import gzip
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_write_bytes
from .._optional import require
from ..data.prompts import class_masks, interior_points, mask_bounding_boxes
from ..data.volumes import _nifti_header, _spatial_shape, build_volume_preprocessing
from .prompted import PromptedSAM
from .run_spec import RunSpec

__all__ = ["SegmentResult", "box_prompt_map", "class_dice", "predict_label_map", "segment_file", "slab_starts"]


@dataclass
class SegmentResult:
    """What :func:`segment_file` wrote and measured."""

    output: Path
    voxels_per_class: dict[str, int]
    dice_per_class: dict[str, float] | None
    seconds: float
    overlays: Path | None


def slab_starts(num_slices: int, depth: int) -> list[int]:
    """Starts of slabs of ``depth`` slices covering ``range(num_slices)``: ``0, D, 2D, ...``, the last one
    moved back to ``num_slices − D`` when ``D`` does not divide ``num_slices``."""
    if num_slices < depth:
        raise ValueError(f"the volume has {num_slices} slices along the slab axis, fewer than the run's slab "
                         f"depth {depth}")
    starts = list(range(0, num_slices - depth + 1, depth))
    if starts[-1] + depth < num_slices:
        starts.append(num_slices - depth)
    return starts


def _slice_prompts(masks: torch.Tensor, prompt: str) -> dict:
    """Prompts for SAM from boolean prompt masks ``(D, K, H, W)``: boxes or deepest-pixel clicks."""
    if prompt == "box":
        boxes, present = mask_bounding_boxes(masks)
        return {"boxes": boxes[None], "present": present}
    xy, present = interior_points(masks)
    labels = torch.where(present, 1, -1).long()
    return {"points": xy[None, :, :, None], "point_labels": labels[None, :, :, None], "present": present}


@torch.no_grad()
def predict_label_map(model: nn.Module, image: torch.Tensor, prompt_map: torch.Tensor, spec: RunSpec,
                      device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Class map ``(X, Y, Z)`` int64 of a preprocessed volume, slab by slab (see the module docstring).

    Args:
        model: a :class:`~medadapt.train.PromptedSAM` (or any module taking its batches).
        image: ``(X, Y, Z)`` float in [0, 1], preprocessed like the run's training volumes.
        prompt_map: ``(X, Y, Z)`` class map the prompts are taken from (values ``spec.classes``).
        spec: the run's :class:`~medadapt.train.run_spec.RunSpec` (depth, classes, prompt, axis, turns).
        device: where the model runs (the batches go there; the label map is built on the CPU).
        progress: a tqdm bar over the slabs.
    """
    if image.ndim != 3 or prompt_map.shape != image.shape:
        raise ValueError(f"image must be (X, Y, Z) and prompt_map the same shape, got {tuple(image.shape)} and "
                         f"{tuple(prompt_map.shape)}")
    turns = spec.quarter_turns
    slices = image.movedim(spec.axis, 0).float()
    prompts = class_masks(prompt_map.movedim(spec.axis, 0).long(), spec.classes)  # (Z, K, H, W)
    label = torch.zeros(slices.shape, dtype=torch.long)
    done = torch.zeros(slices.shape[0], dtype=torch.bool)
    values = torch.as_tensor(spec.classes, dtype=torch.long)
    starts = slab_starts(slices.shape[0], spec.depth)
    iterator = starts
    if progress:
        iterator = require("tqdm.auto", "progress bars").tqdm(starts, desc="segment", unit="slab")
    for start in iterator:
        span = slice(start, start + spec.depth)
        slab = torch.rot90(slices[span], turns, (-2, -1))  # (D, H', W')
        masks = torch.rot90(prompts[span], turns, (-2, -1))  # (D, K, H', W')
        batch = _slice_prompts(masks, spec.prompt)
        present = batch.pop("present")  # (D, K)
        if not present.any():  # nothing prompted in this slab: background, no model call
            done[span] = True
            continue
        batch["image"] = slab[None, None].expand(1, 3, -1, -1, -1)
        batch["label_size"] = tuple(slab.shape[-2:])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(batch)["logits"][0].float().cpu()  # (D, K, H', W')
        logits = logits.masked_fill(~present[:, :, None, None], float("-inf"))
        best, index = logits.max(1)
        slab_label = torch.where(best > 0, values[index], torch.zeros_like(index))
        slab_label = torch.rot90(slab_label, -turns, (-2, -1))
        fresh = ~done[span]
        label[span][fresh] = slab_label[fresh]
        done[span] = True
    return label.movedim(0, spec.axis)


def box_prompt_map(shape: Sequence[int], boxes: Sequence[Sequence[int]]) -> np.ndarray:
    """Class map of ``shape`` with each box ``(class, x0, y0, z0, x1, y1, z1)`` (voxel indices, inclusive)
    filled with its class, later boxes over earlier ones.

    Raises:
        ValueError naming the box: not 7 integers, a class <= 0, corners out of order or outside ``shape``.
    """
    prompt = np.zeros(tuple(shape), dtype=np.int16)
    for i, box in enumerate(boxes):
        if len(box) != 7:
            raise ValueError(f"box {i} must be CLASS X0 Y0 Z0 X1 Y1 Z1, got {list(box)}")
        value, low, high = int(box[0]), [int(v) for v in box[1:4]], [int(v) for v in box[4:7]]
        if value <= 0:
            raise ValueError(f"box {i}: class must be > 0, got {value}")
        if any(lo > hi or lo < 0 or hi >= n for lo, hi, n in zip(low, high, shape)):
            raise ValueError(f"box {i}: corners {low} .. {high} must be ordered and inside the image's voxel grid "
                             f"{tuple(shape)} (inclusive indices)")
        prompt[low[0]:high[0] + 1, low[1]:high[1] + 1, low[2]:high[2] + 1] = value
    return prompt


def class_dice(pred, truth, value: int) -> float | None:
    """``2|P ∩ T| / (|P| + |T|)`` for class ``value`` of two class maps (numpy or torch); None when the reference
    ``truth`` lacks the class (as MONAI's ``DiceMetric(ignore_empty=True)`` of the training jobs' held-out
    Dice), so means skip it."""
    a, b = pred == value, truth == value
    if not b.any():
        return None
    return 2.0 * int((a & b).sum()) / (int(a.sum()) + int(b.sum()))


def _load_channel_first(path: str, role: str):
    """``(1, X, Y, Z)`` MetaTensor of a NIfTI file (singleton axes past the third dropped) and its header."""
    transforms = require("monai.transforms", "volume transforms")
    header = _nifti_header(Path(path), role)
    shape = _spatial_shape(header, Path(path), role)
    loaded = transforms.EnsureChannelFirst()(transforms.LoadImage(image_only=True)(path))
    return (loaded if loaded.ndim == 4 else loaded.reshape(1, *shape)), header


def _load_on_image_grid(path: str, image, role: str) -> np.ndarray:
    """A class map file as an int array on ``image``'s voxel grid (resampled, nearest, when its grid differs)."""
    transforms = require("monai.transforms", "volume transforms")
    loaded, _ = _load_channel_first(path, role)
    if tuple(loaded.shape[1:]) != tuple(image.shape[1:]) or not np.allclose(loaded.affine, image.affine, atol=1e-3):
        loaded = transforms.ResampleToMatch(mode="nearest", padding_mode="zeros")(loaded, img_dst=image)
    data = np.asarray(loaded[0])
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
        raise ValueError(f"{role} file {path!r} holds non-integer values: expected class indices 0, 1, 2, ...")
    return np.rint(data).astype(np.int64)


def _save_overlays(path: Path, image: torch.Tensor, label: torch.Tensor, prompt_map: torch.Tensor,
                   truth: torch.Tensor | None, spec: RunSpec, count: int = 4) -> None:
    """``count`` slices spread over those with a prompt area of at least a quarter of the largest: the
    prediction filled, the reference (else the prompt region) outlined, the prompt drawn."""
    from .plots import save_overlays

    def turn(x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, spec.quarter_turns, (-2, -1))

    slices, labels, prompts = (t.movedim(spec.axis, 0) for t in (image, label, prompt_map))
    area = torch.isin(prompts, torch.as_tensor(spec.classes)).flatten(1).sum(-1)
    if int(area.max()) == 0:
        return
    candidates = torch.nonzero(area >= 0.25 * area.max()).flatten()
    pick = candidates[torch.linspace(0, len(candidates) - 1, min(count, len(candidates))).round().long().unique()]
    prompt_masks = turn(class_masks(prompts[pick], spec.classes))
    predicted = turn(class_masks(labels[pick], spec.classes))
    outlined = prompt_masks if truth is None else turn(class_masks(truth.movedim(spec.axis, 0)[pick], spec.classes))
    dice = None
    if truth is not None:  # per slice: the mean over the classes its reference holds (as for whole files)
        slice_truth = truth.movedim(spec.axis, 0)[pick]
        scores = [[d for v in spec.classes if (d := class_dice(labels[i], slice_truth[j], v)) is not None]
                  for j, i in enumerate(pick.tolist())]
        dice = {"prediction": [sum(d) / len(d) if d else float("nan") for d in scores]}
    shown = _slice_prompts(prompt_masks, spec.prompt)
    what = "reference" if truth is not None else "prompt region"
    save_overlays(path, turn(slices[pick]), outlined, {"prediction": predicted}, spec.class_names,
                  boxes=shown.get("boxes", [None])[0], points=shown.get("points", [None])[0],
                  point_labels=shown.get("point_labels", [None])[0], dice=dice,
                  title=f"prediction filled, {what} outlined, prompt dashed/marked")


def segment_file(model: nn.Module, spec: RunSpec, image_path: str | os.PathLike, output: str | os.PathLike,
                 prompt_label: str | os.PathLike | None = None, boxes: Sequence[Sequence[int]] = (),
                 reference: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                 overlays: str | os.PathLike | None = None, progress: bool = False) -> SegmentResult:
    """Segment one NIfTI volume and write the label map (atomically) on its voxel grid.

    Args:
        model: the run's SAM (from :func:`~medadapt.train.run_spec.load_run`), or any module taking
            :class:`~medadapt.train.PromptedSAM`'s batches (e.g. one already wrapped).
        spec: the run's :class:`~medadapt.train.run_spec.RunSpec`.
        prompt_label: class map the prompts come from (any grid: resampled onto the image's).
        boxes: ``(class, x0, y0, z0, x1, y1, z1)`` voxel boxes of the image, used when ``prompt_label`` is None.
        reference: class map to compute the Dice per class against (any grid, as ``prompt_label``).
        device: where the model runs.
        overlays: PNG path for a few slices (None: none).
        progress: a tqdm bar over the slabs.

    Returns:
        :class:`SegmentResult`: the written file, voxels and Dice per class (None without a reference; a class
        the reference lacks scores None), seconds, the overlay path.

    Raises:
        ValueError naming the argument: no prompt, or both kinds; an unreadable or non-3D file; a box
        outside the image; no prompted voxel of the run's classes left after preprocessing.
    """
    transforms = require("monai.transforms", "volume transforms")
    data_mod = require("monai.data", "volume transforms")
    started = time.monotonic()
    if (prompt_label is None) == (not boxes):
        raise ValueError("give exactly one of prompt_label (a class map) or boxes (CLASS X0 Y0 Z0 X1 Y1 Z1)")
    image_path = os.fspath(image_path)
    image, header = _load_channel_first(image_path, "image")
    shape = tuple(image.shape[1:])
    prompt = (_load_on_image_grid(os.fspath(prompt_label), image, "prompt label") if prompt_label is not None
              else box_prompt_map(shape, boxes))
    truth = (None if reference is None
             else prompt if prompt_label is not None and Path(reference).resolve() == Path(prompt_label).resolve()
             else _load_on_image_grid(os.fspath(reference), image, "reference"))  # one read when they are one file
    data = {"image": image}
    for key, value in (("prompt", prompt), ("reference", truth)):
        if value is not None:
            data[key] = data_mod.MetaTensor(torch.as_tensor(value[None]).float(), meta=dict(image.meta))
    preprocessing = build_volume_preprocessing(list(data), **spec.volume_options)
    data = preprocessing(data)
    pre_image = data["image"][0].as_tensor().float()
    pre_prompt = torch.round(data["prompt"][0].as_tensor()).long()
    if not torch.isin(pre_prompt, torch.as_tensor(spec.classes)).any():
        raise ValueError(f"the prompts hold no voxel of the run's classes {spec.classes} inside the (cropped) image "
                         f"{image_path!r}: check the prompt label's values or the boxes")
    ignored = sorted(set(np.unique(prompt).tolist()) - {0, *spec.classes})
    if ignored:
        source = f"prompt label {os.fspath(prompt_label)!r}" if prompt_label is not None else "the boxes"
        warnings.warn(f"values {ignored} of {source} are not among the run's classes {spec.classes}: they prompt "
                      "nothing", stacklevel=2)
    is_sam = hasattr(model, "image_encoder") and hasattr(model, "mask_decoder")
    prompted = PromptedSAM(model) if is_sam else model
    label = predict_label_map(prompted.eval(), pre_image, pre_prompt, spec, device, progress)
    data["pred"] = data_mod.MetaTensor(label[None].float(), meta=dict(data["image"].meta),
                                       applied_operations=list(data["image"].applied_operations))
    if preprocessing.transforms:  # else the prediction is on the file's grid already
        data = transforms.Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True)(data)
    result = np.rint(np.asarray(data["pred"][0])).astype(np.int16)
    if result.shape != tuple(shape):
        raise RuntimeError(f"inverting the preprocessing gave shape {result.shape}, expected {tuple(shape)}")
    nib = require("nibabel", "NIfTI volumes")
    out_header = header.header.copy()  # keeps qform/sform codes; the image's display and intent fields go
    out_header.set_data_dtype(np.int16)
    out_header.set_slope_inter(1, 0)
    out_header["cal_min"], out_header["cal_max"] = 0, max(spec.classes)
    out_header.set_intent("label")
    out_header["descrip"] = b"medadapt segment"
    out_header["aux_file"] = b""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = nib.Nifti1Image(result, header.affine, out_header).to_bytes()
    atomic_write_bytes(output, gzip.compress(payload) if output.name.lower().endswith(".gz") else payload)
    voxels = {name: int((result == value).sum()) for name, value in zip(spec.class_names, spec.classes)}
    dice = None
    if truth is not None:
        dice = {name: class_dice(result, truth, value) for name, value in zip(spec.class_names, spec.classes)}
    if overlays is not None:
        pre_truth = None if truth is None else torch.round(data["reference"][0].as_tensor()).long()
        _save_overlays(Path(overlays), pre_image, label, pre_prompt, pre_truth, spec)
    return SegmentResult(output, voxels, dice, time.monotonic() - started, Path(overlays) if overlays else None)
