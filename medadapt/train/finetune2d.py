"""The 2D prompted fine-tune: Med-SA adapters + SAM's mask decoder on axial slices of the MNI152 T1.

Label: the template's white-matter map (``medadapt.data.load_mni152_tissue``, class 2); one box (or
point) prompt per slice, sampled from the mask. Training and held-out slices are two contiguous blocks
of the brain (the top quarter is held out) with a gap of dropped training slices between them (one
slice by default, like the 3D path's ``slab_sets`` gap of D slices), so neighbouring, near-identical
slices never straddle the split. Loss: the pipeline's ``PromptedSegmentationLoss`` (DiceCE, whose CE is
BCE for one mask channel, plus the IoU head's MSE), one loss for the 2D and 3D jobs; Med-SA's own 2D recipe
uses plain BCE. ``medadapt finetune`` and ``examples/finetune_sam2d.py`` run this;
``torchrun --nproc_per_node 2 -m medadapt.train.finetune2d`` runs it with DDP.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .._optional import require
from ..core.config import MedSAConfig
from ..core.inject import inject
from ..data import TISSUE_CLASSES, VolumeSlabDataset, split_slice_range, write_mni152_tissue
from .batches import PromptCollate
from .distributed import DistContext, cleanup_distributed, init_distributed
from .job import FinetuneOptions, FinetuneResult, add_training_arguments, options_from_args, run_finetune
from .run_spec import RunSpec, backbone_fingerprint
from .sam_factory import SAM_GEOMETRIES, build_sam

__all__ = ["AxialSlices", "DEFAULTS", "add_model_arguments", "build_parser", "held_out_batches", "main",
           "mni152_slice_sets", "random_backbone_note", "run"]

DEFAULTS = FinetuneOptions()


class AxialSlices(Dataset):
    """One-slice slabs as 2D samples ``{"image": (C, H, W), "label": (H, W)}``, rotated anterior-up."""

    def __init__(self, slabs: VolumeSlabDataset) -> None:
        if slabs.depth != 1:
            raise ValueError(f"slabs must have depth 1, got {slabs.depth}")
        self.slabs = slabs

    def __len__(self) -> int:
        return len(self.slabs)

    def __getitem__(self, item: int) -> dict:
        slab = self.slabs[item]
        return {"image": torch.rot90(slab["image"][:, 0], 1, (-2, -1)).contiguous(),
                "label": torch.rot90(slab["label"][0], 1, (-2, -1)).contiguous(), "start": slab["start"]}


def mni152_slice_sets(size: int, label_class: int = 2, min_pixels: int = 50, held_out_fraction: float = 0.25,
                      resolution: int = 2, cache_dir: str | os.PathLike | None = None, gap: int = 1
                      ) -> tuple[AxialSlices, AxialSlices]:
    """Training and held-out axial slices of the MNI152 T1 where ``label_class`` covers >= ``min_pixels``.

    The slices between the first and the last such slice are split into a lower (training) and an upper
    (held-out, ``held_out_fraction``) contiguous block, and the last ``gap`` training slices are dropped
    (as in :func:`~medadapt.train.slab_sets.slab_sets`), so no training slice is a direct neighbour of a
    held-out one; each slice is resized to ``size × size``. The volume is built once and cached as NIfTI
    (``medadapt.data.write_mni152_tissue``).

    Raises:
        ValueError: ``gap`` < 0, or too few such slices for a training block beside the gap.
    """
    if not isinstance(gap, int) or gap < 0:
        raise ValueError(f"gap must be an integer >= 0, got {gap!r}")
    nib = require("nibabel", "the MNI152 demo volume")
    image_path, label_path = write_mni152_tissue(cache_dir, resolution=resolution)
    image = nib.load(os.fspath(image_path)).get_fdata(dtype="float32")
    # min-max to [0, 1] (the template holds 0 .. 0.988): what `medadapt segment` repeats on other volumes
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
    volume = {"image": image,
              "label": nib.load(os.fspath(label_path)).get_fdata(dtype="float32").round().astype("int64")}
    counts = (torch.as_tensor(volume["label"]) == label_class).sum((0, 1))
    rich = torch.nonzero(counts >= min_pixels).flatten()
    if len(rich) < 2:
        raise ValueError(f"label_class {label_class} covers >= {min_pixels} pixels in fewer than 2 axial slices")
    first, last = int(rich[0]), int(rich[-1])
    train_part, held_part = split_slice_range(last - first + 1, held_out_fraction)
    if len(train_part) <= gap:
        raise ValueError(f"label_class {label_class} covers >= {min_pixels} pixels in {last - first + 1} axial "
                         f"slices: {len(train_part)} training slices leave none beside a gap of {gap}")
    train_part = range(train_part.start, train_part.stop - gap)

    def slices(part: range) -> AxialSlices:
        window = range(first + part.start, first + part.stop)
        return AxialSlices(VolumeSlabDataset([volume], depth=1, axis=2, slice_range=window, slice_size=size,
                                             channels=3, min_foreground=1))

    return slices(train_part), slices(held_part)


def held_out_batches(dataset: Dataset, collate: PromptCollate, batch_size: int = 8) -> list[dict]:
    """The held-out set as a fixed list of batches (prompts drawn once, identical before and after training)."""
    items = [dataset[i] for i in range(len(dataset))]
    return [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def random_backbone_note(arch: str, img_size: int) -> str:
    return (f"NOTE: no --checkpoint given, so SAM's weights are RANDOM ({arch} geometry at {img_size} px). "
            "The Dice below shows what the adapters and the mask decoder learn in this run alone, not SAM's "
            "pretrained quality; pass --checkpoint sam_vit_b_01ec64.pth for the real backbone.")


def add_model_arguments(parser: argparse.ArgumentParser, default_img_size: int | None = None
                        ) -> argparse.ArgumentParser:
    """``--arch --img-size --checkpoint --mlp-ratio --device``."""
    group = parser.add_argument_group("model")
    group.add_argument("--arch", default="vit_b", choices=sorted(SAM_GEOMETRIES),
                       help="SAM geometry: vit_b/vit_l/vit_h, or small/tiny for quick CPU checks (default vit_b)")
    group.add_argument("--img-size", type=int, default=default_img_size,
                       help="SAM input size, a multiple of 16 (default: 224 for ViT-B, one 14x14 window)")
    group.add_argument("--checkpoint", default=None, metavar="PATH",
                       help="local SAM weights (e.g. sam_vit_b_01ec64.pth); without it the backbone is random")
    group.add_argument("--mlp-ratio", type=float, default=0.25, help="adapter width ratio (Med-SA: 0.25)")
    group.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    return parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune Med-SA adapters + SAM's mask decoder on axial MNI152 T1 slices "
                               "(white matter), with held-out Dice before and after.",
        epilog="`medadapt finetune --3d ...` runs the 3D job instead (SD-Trans + HyP-Adpt on slabs, your own "
               "volumes); its options: `medadapt finetune --3d --help`.")
    parser.add_argument("--prompt", choices=("box", "point"), default="box", help="prompt per slice (default box)")
    parser.add_argument("--out", default="runs/finetune2d",
                        help="output folder: adapter/, PNGs, metrics.json, job.json (default runs/finetune2d)")
    parser.add_argument("--cache-dir", default=None, metavar="FOLDER",
                        help="where the MNI152 volume is cached (default $MEDADAPT_CACHE or ~/.cache/medadapt)")
    add_model_arguments(parser)
    add_training_arguments(parser, DEFAULTS)
    return parser


def run(args: argparse.Namespace, ctx: DistContext | None = None, log=print) -> FinetuneResult:
    """Build SAM, inject Med-SA adapters (+ trainable mask decoder), load the slices, fine-tune."""
    ctx = ctx or DistContext()
    options = options_from_args(args, DEFAULTS)
    img_size = args.img_size or SAM_GEOMETRIES[args.arch].default_img_size
    if ctx.is_main and args.checkpoint is None:
        log(random_backbone_note(args.arch, img_size))
    sam = build_sam(args.arch, img_size, args.checkpoint, seed=args.seed)
    label_class = 2
    classes, names = [label_class], [TISSUE_CLASSES[label_class]]
    # the slices come from the cached RAS NIfTI, min-max scaled, uncropped: the same steps for other volumes
    spec = RunSpec(arch=args.arch, img_size=img_size, depth=1, prompt=args.prompt, classes=classes, class_names=names,
                   seed=args.seed, checkpoint=args.checkpoint,
                   backbone_fingerprint=backbone_fingerprint(sam), job="finetune2d",
                   volume_options={"orientation": "RAS", "intensity": "minmax", "crop_foreground": None})
    inject(sam, MedSAConfig(mlp_ratio=args.mlp_ratio, modules_to_save=["mask_decoder"]))
    sam.to(ctx.device)
    train_set, held_set = mni152_slice_sets(img_size, label_class, cache_dir=args.cache_dir)
    train_collate = PromptCollate(classes, args.prompt, jitter=0.1, seed=args.seed + 1000 * (ctx.rank + 1))
    eval_batches = held_out_batches(held_set, PromptCollate(classes, args.prompt, jitter=0.0, seed=args.seed))
    backbone = "random" if args.checkpoint is None else os.path.basename(args.checkpoint)
    result = run_finetune(sam, train_set, train_collate, eval_batches, args.out, names, options, ctx,
                          backbone=backbone, name=f"finetune-2d {args.arch}@{img_size} {args.prompt}", log=log)
    if ctx.is_main:
        spec.save(args.out)  # `medadapt segment --run` applies the run to a volume slice by slice
    return result


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry (``medadapt finetune``): parse ``argv``, start DDP if under torchrun, run."""
    args = build_parser(prog).parse_args(argv)
    ctx = init_distributed(args.device)
    try:
        run(args, ctx)
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
