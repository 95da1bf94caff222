"""The main job: SAM with Med-SA + SD-Trans + HyP-Adpt fine-tuned on slabs of a labelled volume.

SAM (ViT-B geometry at a CPU-sized input, random or ``--checkpoint`` weights) gets
``MedSAConfig(space_depth=True, hyper_prompt=True, depth_pos_embed=D, modules_to_save=["mask_decoder"])``:
space and MLP adapters plus the SD-Trans depth branch in every encoder block (the encoder takes the
slab ``(B, C, D, H, W)`` whole), HyP-Adpt in the mask decoder, the decoder trained in full. Data: the
bundled MNI152 T1 with its tissue label (grey and white matter prompted; background is what no prompt
covers), or ``--image/--label`` pairs or a ``--data-dir``; slabs of D axial slices, one box (jittered
while training) or click per slice and class; training on the lower part of each labelled extent,
held-out Dice (MONAI ``DiceMetric``) per class on the upper part (:mod:`medadapt.train.slab_sets`).

With ``--compare`` (default) the same run is repeated with the ENCODER ADAPTERS DISABLED:
``MedSAConfig(space_adapter=False, mlp_adapter=False, space_depth=False, hyper_prompt=True,
modules_to_save=["mask_decoder"])``: no space, MLP or depth adapter in the encoder (which is then frozen
and sees the slab as D independent slices); the decoder side (HyP-Adpt + the whole mask decoder) is
identical. Same seed, backbone weights, data order, prompts, number of steps and learning rate at each
step (the adapted run's schedule, also when its time limit stopped it early); the verdict says
whether the encoder adapters win, and why not when they do not (:mod:`medadapt.train.comparison`).

Measured on 2 CPU cores (random ViT-B, defaults: 128 px, D = 4, 100 steps of 2 slabs): 6.5-8 minutes
for both runs (the adapted run stops at ``--max-train-minutes`` 5.5 of training when the machine is
busy; the comparison run then takes as many steps). Both end answering each class with about the whole
brain (a tie): grey and white matter are interleaved and their boxes nearly coincide (mean IoU 0.75),
so a box hardly says which class is asked, and a random encoder gives the adapters nothing to steer.

Writes ``<out>/adapter/``, ``job.json`` (what ``medadapt segment --run <out>`` rebuilds the model from:
:func:`medadapt.train.run_spec.load_run`), ``overlays.png``, ``curves.png``, ``metrics.json`` (adapted run),
``<out>/decoder_only/`` (the same for the comparison run), ``comparison.png`` and ``comparison.json``.
``medadapt finetune --3d``, ``examples/finetune_sam3d.py`` and ``torchrun --nproc_per_node N -m
medadapt.train.finetune3d`` run it (DDP: gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from .._atomic import atomic_write_text
from ..core.config import MedSAConfig
from ..core.inject import inject
from ..data import (
    TISSUE_CLASSES,
    add_volume_arguments,
    load_volume_pairs,
    volume_pairs_from_args,
    volume_transform_options,
)
from .batches import PromptCollate
from .comparison import (
    class_box_overlap,
    comparison_summary,
    save_comparison_curves,
    whole_region_agreement,
    whole_region_dice,
)
from .distributed import DistContext, barrier, cleanup_distributed, init_distributed
from .finetune2d import held_out_batches, random_backbone_note
from .job import FinetuneOptions, FinetuneResult, add_training_arguments, options_from_args, run_finetune
from .prompted import PromptedSAM
from .run_spec import RunSpec, backbone_fingerprint
from .sam_factory import SAM_GEOMETRIES, build_sam
from .slab_sets import SlabSets, label_classes, slab_sets

__all__ = ["DEFAULTS", "DEFAULT_DEPTH", "DEFAULT_IMG_SIZE", "Finetune3DResult", "VolumeData", "arm_config",
           "baseline_options", "build_parser", "default_img_size", "main", "prepare_data", "run"]

DEFAULT_IMG_SIZE = 128  # ViT-B: an 8 x 8 token grid per slice
DEFAULT_DEPTH = 4
# both runs together stay under 10 minutes on 2 CPU cores (measured: see the module docstring)
DEFAULTS = FinetuneOptions(steps=100, batch_size=2, lr=1e-3, eval_every=20, max_train_minutes=5.5, num_overlays=4)
ARMS = {"adapted": "encoder adapters", "decoder_only": "decoder-only"}


def default_img_size(arch: str) -> int:
    """128 px, or the geometry's own CPU default when smaller (the test sizes)."""
    return min(DEFAULT_IMG_SIZE, SAM_GEOMETRIES[arch].default_img_size)


def arm_config(arm: str, depth: int, mlp_ratio: float = 0.25) -> MedSAConfig:
    """``"adapted"``: Med-SA + SD-Trans (+ depth embedding for ``depth`` slices) + HyP-Adpt + decoder;
    ``"decoder_only"``: the same without any encoder adapter (HyP-Adpt + decoder)."""
    if arm == "adapted":
        return MedSAConfig(mlp_ratio=mlp_ratio, space_depth=True, hyper_prompt=True, depth_pos_embed=depth,
                           modules_to_save=["mask_decoder"])
    if arm == "decoder_only":
        return MedSAConfig(mlp_ratio=mlp_ratio, space_adapter=False, mlp_adapter=False, space_depth=False,
                           hyper_prompt=True, modules_to_save=["mask_decoder"])
    raise ValueError(f"arm must be one of {sorted(ARMS)}, got {arm!r}")


@dataclass
class VolumeData:
    """Slab sets and classes of a run, and where the volumes came from."""

    sets: SlabSets
    classes: list[int]
    class_names: list[str]
    bundled: bool
    sources: list[str]


@dataclass
class Finetune3DResult:
    """Both runs (``decoder_only`` is None with ``--no-compare``), the summary line and the trained models."""

    adapted: FinetuneResult
    decoder_only: FinetuneResult | None
    summary: str
    verdict: str | None
    models: dict[str, nn.Module] = field(repr=False, default_factory=dict)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune SAM with Med-SA + SD-Trans + HyP-Adpt adapters on slabs of D slices of a "
                               "labelled volume (default: the bundled MNI152 T1, grey/white matter); held-out "
                               "Dice per class beside the same run with the encoder adapters disabled.")
    parser.add_argument("--prompt", choices=("box", "point"), default="box",
                        help="prompt per slice and class: jittered box or one positive click (default box)")
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                        help=f"D, slices per slab (default {DEFAULT_DEPTH})")
    parser.add_argument("--held-out-fraction", type=float, default=0.25,
                        help="share of each volume's labelled slices held out (its upper end; default 0.25)")
    parser.add_argument("--classes", type=int, nargs="+", default=None, metavar="VALUE",
                        help="label values to prompt (default: every value > 0 in the labels)")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="also run with the encoder adapters disabled (decoder-only) and compare (default on)")
    parser.add_argument("--out", default="runs/finetune3d", help="output folder (default runs/finetune3d)")
    add_volume_arguments(parser)
    group = parser.add_argument_group("model")
    group.add_argument("--arch", default="vit_b", choices=sorted(SAM_GEOMETRIES),
                       help="SAM geometry (default vit_b; small/tiny for quick CPU checks)")
    group.add_argument("--img-size", type=int, default=None,
                       help=f"SAM input size, a multiple of the patch size (default {DEFAULT_IMG_SIZE})")
    group.add_argument("--checkpoint", default=None, metavar="PATH",
                       help="local SAM weights (e.g. sam_vit_b_01ec64.pth); without it the backbone is random")
    group.add_argument("--mlp-ratio", type=float, default=0.25, help="adapter width ratio (Med-SA: 0.25)")
    group.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    add_training_arguments(parser, DEFAULTS)
    return parser


def prepare_data(args: argparse.Namespace, img_size: int) -> VolumeData:
    """Resolve and load the volumes, pick the classes and build the slab sets (ValueError on bad input)."""
    if args.depth < 1:
        raise ValueError(f"--depth must be >= 1, got {args.depth}")
    if not 0.0 < args.held_out_fraction < 1.0:
        raise ValueError(f"--held-out-fraction must be in (0, 1), got {args.held_out_fraction}")
    pairs, bundled = volume_pairs_from_args(args)
    volumes = load_volume_pairs(pairs, check=False, **volume_transform_options(args))  # checked when resolved
    found = label_classes(volumes)
    classes = sorted(set(args.classes)) if args.classes else found
    missing = [c for c in classes if c not in found]
    if missing or not classes:
        raise ValueError(f"--classes {missing or classes} not found in the labels (values > 0 there: {found})")
    names = [TISSUE_CLASSES[c] if bundled and c < len(TISSUE_CLASSES) else f"class_{c}" for c in classes]
    sets = slab_sets(volumes, args.depth, img_size, args.held_out_fraction)
    return VolumeData(sets, classes, names, bundled, [p["image"] for p in pairs])


def baseline_options(options: FinetuneOptions, steps_done: int) -> FinetuneOptions:
    """Options of the decoder-only run: the same budget and learning rates as the adapted run.

    It stops after ``steps_done`` steps (what the adapted run took; fewer than ``options.steps`` when its
    time limit stopped it), without a time limit, and keeps the adapted run's schedule length, so that
    both runs see the same learning rate at every step they both ran.
    """
    return replace(options, steps=max(steps_done, 1), max_train_minutes=None,
                   schedule_steps=options.schedule_steps or options.steps)


def _train_arm(arm: str, args: argparse.Namespace, data: VolumeData, eval_batches: list[dict],
               options: FinetuneOptions, ctx: DistContext, out: Path, img_size: int, log: Callable[[str], None]
               ) -> tuple[nn.Module, FinetuneResult]:
    sam = build_sam(args.arch, img_size, args.checkpoint, seed=args.seed)
    spec = RunSpec(arch=args.arch, img_size=img_size, depth=args.depth, prompt=args.prompt, classes=data.classes,
                   class_names=data.class_names, seed=args.seed, checkpoint=args.checkpoint,
                   backbone_fingerprint=backbone_fingerprint(sam), volume_options=volume_transform_options(args))
    inject(sam, arm_config(arm, args.depth, args.mlp_ratio))
    sam.to(ctx.device)
    collate = PromptCollate(data.classes, args.prompt, jitter=0.1, seed=args.seed + 1000 * (ctx.rank + 1))
    name = f"finetune-3d {args.arch}@{img_size} D={args.depth} {args.prompt} {ARMS[arm]}"
    backbone = "random" if args.checkpoint is None else os.path.basename(args.checkpoint)
    result = run_finetune(sam, data.sets.train, collate, eval_batches, out, data.class_names, options, ctx,
                          backbone=backbone, name=name, log=log)
    if ctx.is_main:
        spec.save(out)  # what `medadapt segment --run` rebuilds the model from
    return sam, result


def run(args: argparse.Namespace, ctx: DistContext | None = None, log: Callable[[str], None] = print,
        data: VolumeData | None = None) -> Finetune3DResult:
    """Both runs (or only the adapted one with ``--no-compare``), the comparison line and its files."""
    ctx = ctx or DistContext()
    say = log if ctx.is_main else (lambda _line: None)
    img_size = args.img_size or default_img_size(args.arch)
    data = data or prepare_data(args, img_size)
    # D = 1: the depth branch does not run, so DDP must not wait for its gradients
    options = replace(options_from_args(args, DEFAULTS), find_unused_parameters=args.depth == 1)
    if args.checkpoint is None:
        say(random_backbone_note(args.arch, img_size))
    ranges = ", ".join(f"{t.start}-{t.stop - 1} / {h.start}-{h.stop - 1}"
                       for t, h in zip(data.sets.train_ranges, data.sets.held_out_ranges))
    say(f"[finetune-3d] {'bundled MNI152 T1' if data.bundled else ', '.join(data.sources)}: classes "
        f"{dict(zip(data.classes, data.class_names))}; axial slices train / held-out: {ranges}")
    eval_collate = PromptCollate(data.classes, args.prompt, jitter=0.0, seed=args.seed)
    eval_batches = held_out_batches(data.sets.held_out, eval_collate, batch_size=2)
    out = Path(args.out)
    sam, adapted = _train_arm("adapted", args, data, eval_batches, options, ctx, out, img_size, log)
    models: dict[str, nn.Module] = {"adapted": sam}
    if not args.compare:
        return Finetune3DResult(adapted, None, adapted.summary, None, models)
    same_budget = baseline_options(options, adapted.steps_done)
    models["decoder_only"], baseline = _train_arm("decoder_only", args, data, eval_batches, same_budget, ctx,
                                                  out / "decoder_only", img_size, log)
    name = f"finetune-3d {args.arch}@{img_size} D={args.depth} {args.prompt}"
    reference = whole_region_dice(eval_batches)
    agreement = min(whole_region_agreement(PromptedSAM(m), eval_batches, ctx.device) for m in models.values())
    summary, verdict = comparison_summary(name, data.class_names, adapted, baseline, args.checkpoint is None,
                                          (ARMS["adapted"], ARMS["decoder_only"]), reference, agreement,
                                          class_box_overlap(eval_batches))
    if ctx.is_main:
        save_comparison_curves(out / "comparison.png", {ARMS["adapted"]: adapted, ARMS["decoder_only"]: baseline},
                               data.class_names, reference["dice"])
        record = {arm: {"dice": r.dice_after, "dice_per_class": r.dice_per_class_after, "dice_before": r.dice_before,
                        "trainable_params": r.trainable_params, "steps": r.steps_done, "train_seconds": r.train_seconds,
                        "config": arm_config(arm, args.depth, args.mlp_ratio).to_dict()}
                  for arm, r in (("adapted", adapted), ("decoder_only", baseline))}
        record.update(class_names=data.class_names, verdict=verdict, summary=summary, whole_region_reference=reference,
                      whole_region_agreement=agreement,
                      backbone="random" if args.checkpoint is None else os.path.basename(args.checkpoint))
        atomic_write_text(out / "comparison.json", json.dumps(record, indent=2) + "\n")
        say(summary)
    barrier()
    return Finetune3DResult(adapted, baseline, summary, verdict, models)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry (``medadapt finetune --3d``): parse, load the volumes, start DDP if under torchrun, run."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    img_size = args.img_size or default_img_size(args.arch)
    try:
        data = prepare_data(args, img_size)
    except ValueError as err:
        parser.error(str(err))
    ctx = init_distributed(args.device)
    try:
        run(args, ctx, data=data)
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
