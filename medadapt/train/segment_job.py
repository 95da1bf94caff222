"""``medadapt segment``: a fine-tune applied to one volume or to a set of cases, with Dice per case and mean.

    medadapt segment --run runs/finetune3d --image case.nii.gz --prompt-label rough.nii.gz
    medadapt segment --run runs/finetune3d --image case.nii.gz --box 1 40 52 30 70 90 61 --reference seg.nii.gz
    medadapt segment --run runs/finetune3d --data-dir test_cases/     # image/label pairs: prompts + reference

The model is rebuilt once (:func:`~medadapt.train.run_spec.load_run`); each case goes through
:func:`~medadapt.train.segment3d.segment_file`. ``--image`` repeats, paired in order with ``--prompt-label``
(and ``--reference``, optional); ``--box`` prompts a single ``--image``; ``--data-dir`` takes the pairs of a
folder (:func:`~medadapt.data.find_volume_pairs`), each label being the prompt source and the reference
(an evaluation of the prompted model on held-out cases). Writes ``<out>/<case>_pred.nii.gz`` and
``<case>_overlays.png`` per case (never over an input file) and ``<out>/segment.json`` (per case: files,
voxels and Dice per class, or the error that stopped it; the mean Dice per class over the cases whose
reference holds the class). A case that fails (bad input, out of memory, ...) is recorded with its error and the
others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._atomic import atomic_write_text
from .._optional import require
from ..data.volumes import _stem, find_volume_pairs
from .run_spec import load_run
from .segment3d import segment_file

__all__ = ["OVERLAY_SUFFIX", "PRED_SUFFIX", "Case", "build_parser", "main", "mean_dice", "resolve_cases"]

PRED_SUFFIX = "_pred.nii.gz"  # not "_seg": a label tag of find_volume_pairs' flat layout
OVERLAY_SUFFIX = "_overlays.png"


@dataclass
class Case:
    """One volume to segment, its prompt source (a class map or boxes) and its optional reference."""

    image: str
    prompt_label: str | None = None
    boxes: list[list[int]] = field(default_factory=list)
    reference: str | None = None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Segment NIfTI volumes with a fine-tune's SAM + adapters (the output folder of "
                               "`medadapt demo` / `medadapt finetune [--3d]`), prompted per slice from a class map "
                               "or 3D boxes; label maps on each image's own voxel grid, Dice against references.")
    parser.add_argument("--run", required=True, metavar="FOLDER",
                        help="the fine-tune's output folder (job.json + adapter/)")
    cases = parser.add_argument_group("cases")
    cases.add_argument("--image", action="append", default=[], metavar="NIFTI",
                       help="a volume to segment (.nii/.nii.gz); repeat, paired in order with --prompt-label")
    cases.add_argument("--prompt-label", action="append", default=[], metavar="NIFTI",
                       help="class map the per-slice prompts of the --image at the same position come from "
                            "(a coarse mask, another tool's output; any voxel grid)")
    cases.add_argument("--box", type=int, nargs=7, action="append", default=[],
                       metavar=("CLASS", "X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                       help="a 3D box (voxel indices of a single --image, inclusive) prompting CLASS; repeat for more")
    cases.add_argument("--reference", action="append", default=[], metavar="NIFTI",
                       help="class map to report the Dice of the --image at the same position against")
    cases.add_argument("--data-dir", default=None, metavar="FOLDER",
                       help="image/label pairs (imagesTr/+labelsTr/, images/+labels/, or case + case_label): each "
                            "label gives the prompts and is the reference")
    parser.add_argument("--out", default=None, metavar="FOLDER", help="output folder (default <run>/segment)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="SAM weights, when the run's checkpoint has moved (the same weights)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def resolve_cases(images: Sequence[str] = (), prompt_labels: Sequence[str] = (), boxes: Sequence[Sequence[int]] = (),
                  references: Sequence[str] = (), data_dir: str | None = None) -> list[Case]:
    """The cases the arguments name (see the module docstring).

    Raises:
        ValueError naming the option: no case, ``--data-dir`` with ``--image``, counts that do not pair up,
        ``--box`` with several images or with ``--prompt-label``, an image without any prompt.
    """
    images, prompt_labels, references = list(images), list(prompt_labels), list(references)
    if data_dir is not None:
        if images or prompt_labels or boxes or references:
            raise ValueError("--data-dir takes its images, prompts and references from the folder: drop --image, "
                             "--prompt-label, --box and --reference")
        return [Case(p["image"], prompt_label=p["label"], reference=p["label"]) for p in find_volume_pairs(data_dir)]
    if not images:
        raise ValueError("name the volumes to segment: --image NIFTI (repeatable) or --data-dir FOLDER")
    if references and len(references) != len(images):
        raise ValueError(f"got {len(images)} --image but {len(references)} --reference: give one per image or none")
    if boxes:
        if len(images) != 1 or prompt_labels:
            raise ValueError("--box prompts a single --image and replaces --prompt-label")
        return [Case(images[0], boxes=[list(b) for b in boxes], reference=references[0] if references else None)]
    if len(prompt_labels) != len(images):
        raise ValueError(f"got {len(images)} --image but {len(prompt_labels)} --prompt-label: SAM needs prompts, "
                         "one class map per image (or --box for a single image)")
    return [Case(i, prompt_label=p, reference=references[k] if references else None)
            for k, (i, p) in enumerate(zip(images, prompt_labels))]


def _stems(cases: Sequence[Case]) -> list[str]:
    """Output name per case: the image's name without ``.nii(.gz)``, numbered when names repeat."""
    names = [_stem(Path(c.image)) for c in cases]
    if len(set(names)) < len(names):
        names = [f"{k:03d}_{n}" for k, n in enumerate(names)]
    return names


def main(argv: Sequence[str] | None = None, prog: str | None = None, log: Callable[[str], None] = print) -> int:
    """Command-line entry (``medadapt segment``)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out) if args.out else Path(args.run) / "segment"
    try:
        cases = resolve_cases(args.image, args.prompt_label, args.box, args.reference, args.data_dir)
        stems = _stems(cases)
        _check_outputs(cases, [out / f"{stem}{suffix}" for stem in stems for suffix in (PRED_SUFFIX, OVERLAY_SUFFIX)],
                       out, args.data_dir)
        out.mkdir(parents=True, exist_ok=True)
        model, spec = load_run(args.run, args.checkpoint, device)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    several = len(cases) > 1
    progress = not args.no_progress
    iterator = list(zip(cases, stems))
    if several and progress:
        iterator = require("tqdm.auto", "progress bars").tqdm(iterator, desc="segment", unit="case")
    records = []
    for case, stem in iterator:
        record = {"image": case.image, "prompt_label": case.prompt_label, "boxes": case.boxes or None,
                  "reference": case.reference}
        try:
            result = segment_file(model, spec, case.image, out / f"{stem}{PRED_SUFFIX}", case.prompt_label,
                                  case.boxes, case.reference, device, overlays=out / f"{stem}{OVERLAY_SUFFIX}",
                                  progress=progress and not several)
        except Exception as err:  # noqa: BLE001 (one bad case, even out of memory: recorded, the others still run)
            log(f"[segment] {case.image}: FAILED: {err}")
            records.append({**record, "error": str(err)})
            continue
        shown = {k: "absent" if v is None else f"{v:.3f}" for k, v in (result.dice_per_class or {}).items()}
        dice = "" if result.dice_per_class is None else " | Dice " + ", ".join(f"{k} {v}" for k, v in shown.items())
        log(f"[segment] {case.image} -> {result.output}: voxels {result.voxels_per_class}{dice} "
            f"| {result.seconds:.1f} s on {device}")
        records.append({**record, "output": str(result.output),
                        "overlays": None if result.overlays is None else str(result.overlays),
                        "voxels_per_class": result.voxels_per_class, "dice_per_class": result.dice_per_class,
                        "seconds": round(result.seconds, 2)})
    mean = mean_dice(records, spec.class_names)
    failed = [r["image"] for r in records if "error" in r]
    summary = {"run": args.run, "job": spec.job, "prompt": spec.prompt, "classes": dict(zip(spec.class_names,
               spec.classes)), "device": device, "mean_dice_per_class": mean, "failed": failed, "cases": records}
    atomic_write_text(out / "segment.json", json.dumps(summary, indent=2) + "\n")
    if mean is not None and several:
        log("[segment] mean Dice over the cases whose reference has the class: "
            + ", ".join(f"{k} {'absent' if v is None else f'{v:.3f}'}" for k, v in mean.items()))
    if failed:
        log(f"[segment] {len(failed)} of {len(cases)} case(s) failed (see segment.json): {failed}")
    return 1 if failed else 0


def mean_dice(records: Sequence[dict], class_names: Sequence[str]) -> dict[str, float | None] | None:
    """Mean Dice per class over the cases that have one for it (a reference holding the class); None when no
    case has a reference."""
    scored = [r["dice_per_class"] for r in records if r.get("dice_per_class") is not None]
    if not scored:
        return None
    mean: dict[str, float | None] = {}
    for name in class_names:
        values = [d[name] for d in scored if d.get(name) is not None]
        mean[name] = sum(values) / len(values) if values else None
    return mean


def _check_outputs(cases: Sequence[Case], outputs: Sequence[Path], out: Path, data_dir: str | None) -> None:
    """Refuse outputs that would overwrite an input, and ``--out`` inside ``--data-dir`` (the predictions would
    read as unlabelled images there next time)."""
    inputs = {Path(p).resolve() for c in cases for p in (c.image, c.prompt_label, c.reference) if p is not None}
    clash = sorted(str(o) for o in outputs if o.resolve() in inputs)
    if clash:
        raise ValueError(f"the outputs {clash} would overwrite input files: choose another --out")
    if data_dir is not None and out.resolve().is_relative_to(Path(data_dir).resolve()):
        raise ValueError(f"--out {str(out)!r} lies in --data-dir {data_dir!r}: choose a folder outside it")

if __name__ == "__main__":
    raise SystemExit(main())
