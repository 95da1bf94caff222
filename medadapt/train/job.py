"""One prompted fine-tune from start to end: Dice before, training, Dice after, figures, adapter, summary.

``run_finetune`` is shared by the 2D example and the 3D (SD-Trans) job: they differ only in the model
config, the datasets and the collate function. It runs unchanged under ``torchrun``; rank 0 writes
``<out>/adapter/`` (``adapter_model.safetensors`` + ``adapter_config.json``), ``overlays.png``,
``curves.png`` and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .._atomic import atomic_write_text
from ..core.inject import injected_configs
from ..core.io import save_adapter
from ..core.params import trainable_parameters
from .distributed import DistContext, barrier, make_train_loader, shard, wrap_ddp
from .loop import History, fit
from .objectives import PromptedSegmentationLoss, evaluate, to_device
from .plots import save_curves, save_overlays
from .prompted import PromptedSAM

__all__ = ["FinetuneOptions", "FinetuneResult", "add_training_arguments", "lr_scheduler", "options_from_args",
           "run_finetune"]


@dataclass
class FinetuneOptions:
    """Knobs of :func:`run_finetune` (defaults: the 2D CPU demo, see ``medadapt.train.finetune2d``)."""

    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    # length T of the cosine schedule; None: ``steps``. A run that stops before T (``steps`` < T) sees the
    # first ``steps`` learning rates of the T-step schedule, not a whole schedule squeezed into fewer steps.
    schedule_steps: int | None = None
    weight_decay: float = 0.0
    eval_every: int = 20
    max_train_minutes: float | None = 7.0
    grad_clip: float | None = 1.0
    iou_weight: float = 1.0
    seed: int = 0
    num_overlays: int = 4
    progress: bool = True
    find_unused_parameters: bool = False  # DDP: True when some trainable adapter may not run in a step

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.schedule_steps is not None and (not isinstance(self.schedule_steps, int)
                                                or self.schedule_steps < self.steps):
            raise ValueError(f"schedule_steps must be None or an integer >= steps ({self.steps}): the cosine would "
                             f"reach 0 before the last step; got {self.schedule_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: only before and after), got {self.eval_every}")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be > 0 or None, got {self.max_train_minutes}")


@dataclass
class FinetuneResult:
    """Numbers and files of a run (files are written by rank 0 only)."""

    dice_before: float
    dice_after: float
    dice_per_class_before: list[float]
    dice_per_class_after: list[float]
    trainable_params: int
    total_params: int
    steps_done: int
    train_seconds: float
    total_seconds: float
    stopped_early: bool
    out_dir: Path
    summary: str
    history: History = field(repr=False, default_factory=History)


def add_training_arguments(parser: argparse.ArgumentParser, defaults: FinetuneOptions | None = None
                           ) -> argparse.ArgumentParser:
    """``--steps --batch-size --lr --eval-every --max-train-minutes --seed --overlays --no-progress``."""
    d = defaults or FinetuneOptions()
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    group.add_argument("--batch-size", type=int, default=d.batch_size, help="slices (or slabs) per step per process")
    group.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    group.add_argument("--lr-schedule", choices=("cosine", "constant"), default=d.lr_schedule,
                       help=f"learning-rate schedule over --steps (default {d.lr_schedule})")
    group.add_argument("--eval-every", type=int, default=d.eval_every,
                       help="held-out Dice every N steps, besides before and after (0: only those)")
    group.add_argument("--max-train-minutes", type=float, default=d.max_train_minutes,
                       help="stop training early (and say so) after this many minutes; <= 0 disables")
    group.add_argument("--seed", type=int, default=d.seed)
    group.add_argument("--overlays", type=int, default=d.num_overlays, help="held-out slices in overlays.png")
    group.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def options_from_args(args: argparse.Namespace, base: FinetuneOptions | None = None) -> FinetuneOptions:
    """:class:`FinetuneOptions` from the arguments of :func:`add_training_arguments`."""
    base = base or FinetuneOptions()
    minutes = args.max_train_minutes if args.max_train_minutes and args.max_train_minutes > 0 else None
    return FinetuneOptions(**{**asdict(base), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                              "lr_schedule": args.lr_schedule,
                              "eval_every": args.eval_every, "max_train_minutes": minutes, "seed": args.seed,
                              "num_overlays": args.overlays, "progress": not args.no_progress})


def lr_scheduler(optimizer: torch.optim.Optimizer, options: FinetuneOptions
                 ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule of ``options``: None for ``"constant"``; for ``"cosine"``,
    ``lr_t = lr · (1 + cos(π min(t, T) / T)) / 2`` with ``T = options.schedule_steps`` (default ``options.steps``)."""
    if options.lr_schedule != "cosine":
        return None
    total = options.schedule_steps or options.steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total)))


def _concat(batches: Sequence[dict]) -> dict:
    out = {}
    for key, value in batches[0].items():
        out[key] = torch.cat([b[key] for b in batches]) if torch.is_tensor(value) else value
    return out


def _overlay_batch(batches: Sequence[dict], count: int) -> dict:
    """``count`` items spread evenly over the held-out batches (slices in 2D, slabs in 3D)."""
    whole = _concat(list(batches))
    n = whole["image"].shape[0]
    index = torch.linspace(0, n - 1, steps=min(count, n)).round().long().unique()
    return {k: v[index] if torch.is_tensor(v) else v for k, v in whole.items()}


@torch.no_grad()
def _predict_slices(model: PromptedSAM, batch: dict, count: int, device) -> dict:
    """Predictions on an overlay batch, flattened to slices ``(S, K, H, W)``, ``count`` of them evenly picked."""
    was_training = model.training
    model.eval()
    logits = model(to_device(batch, device))["logits"].cpu()
    model.train(was_training)
    k, size = logits.shape[-3], logits.shape[-2:]
    images = batch["image"][:, 0]
    if images.ndim == 4:  # (B, D, H, W)
        images = images.flatten(0, 1)
    if tuple(images.shape[-2:]) != tuple(size):
        images = torch.nn.functional.interpolate(images[:, None].float(), size=size, mode="bilinear")[:, 0]
    flat = {"image": images, "logits": logits.reshape(-1, k, *size),
            "target": batch["target"].reshape(-1, k, *size), "present": batch["present"].reshape(-1, k)}
    for key in ("boxes", "points", "point_labels"):
        if key in batch:
            flat[key] = batch[key].reshape(-1, k, *batch[key].shape[batch["present"].ndim:])
    with_fg = torch.nonzero(flat["present"].any(-1)).flatten()
    pick = with_fg[torch.linspace(0, len(with_fg) - 1, steps=min(count, len(with_fg))).round().long().unique()]
    return {key: value[pick] for key, value in flat.items()}


def _slice_dice(logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> list[float]:
    pred, truth = logits > 0, target.bool()
    inter = (pred & truth).flatten(2).sum(-1).double()
    sizes = pred.flatten(2).sum(-1).double() + truth.flatten(2).sum(-1).double()
    dice = torch.where(sizes > 0, 2 * inter / sizes.clamp(min=1), torch.ones_like(sizes))
    return ((dice * present).sum(-1) / present.sum(-1).clamp(min=1)).tolist()


def run_finetune(sam: nn.Module, train_set: Dataset, train_collate: Callable[[list], dict],
                 eval_batches: Sequence[dict], out_dir: str | Path, class_names: Sequence[str],
                 options: FinetuneOptions | None = None, ctx: DistContext | None = None,
                 backbone: str = "random", name: str = "finetune", log: Callable[[str], None] = print,
                 ) -> FinetuneResult:
    """Fine-tune an injected SAM on prompted slices and report held-out Dice before and after.

    Args:
        sam: a ``segment_anything`` ``Sam`` with adapters injected (``ma.inject``), on ``ctx.device``.
        train_set: items for ``train_collate`` (e.g. one-slice slabs from :class:`~medadapt.data.VolumeSlabDataset`).
        train_collate: samples → batch with prompts (:class:`~medadapt.train.batches.PromptCollate`).
        eval_batches: held-out batches with fixed prompts (the same before and after training).
        out_dir: where rank 0 writes ``adapter/``, ``overlays.png``, ``curves.png``, ``metrics.json``.
        class_names: a name per prompted class (K).
        options: steps, learning rate, ... (:class:`FinetuneOptions`).
        ctx: from :func:`~medadapt.train.distributed.init_distributed` (default: one process on CPU).
        backbone: how the backbone was initialised, for the summary ("random" or the checkpoint).
        name: run name at the start of the summary line.
        log: where rank 0's lines go.
    """
    options, ctx = options or FinetuneOptions(), ctx or DistContext()
    if not injected_configs(sam):
        raise ValueError("sam carries no medadapt adapters: call ma.inject(sam, config) before run_finetune")
    if len(train_set) == 0 or len(eval_batches) == 0:
        raise ValueError(f"train_set ({len(train_set)} items) and eval_batches ({len(eval_batches)}) must not be "
                         "empty")
    out = Path(out_dir)
    started = time.monotonic()
    say = log if ctx.is_main else (lambda _line: None)
    torch.manual_seed(options.seed)
    model = PromptedSAM(sam).to(ctx.device)
    trainable, total = trainable_parameters(sam)
    # iou_weight 0 leaves a trained IoU head without gradients: DDP must then look for unused parameters
    parallel = wrap_ddp(model, ctx, find_unused_parameters=options.find_unused_parameters or not options.iou_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = lr_scheduler(optimizer, options)
    loader = make_train_loader(train_set, options.batch_size, ctx, train_collate, seed=options.seed)
    my_batches = shard(list(eval_batches), ctx)
    k = len(class_names)

    def held_out_dice() -> dict:
        return evaluate(model, my_batches, ctx.device, num_classes=k)

    overlay = _overlay_batch(eval_batches, options.num_overlays) if options.num_overlays > 0 else None
    before = _predict_slices(model, overlay, options.num_overlays, ctx.device) if overlay and ctx.is_main else None
    say(f"[{name}] trainable params {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); "
        f"{len(train_set)} training items, {sum(b['image'].shape[0] for b in eval_batches)} held-out items; "
        f"{ctx.world_size} process(es) on {ctx.device}")
    minutes = options.max_train_minutes
    history = fit(parallel, optimizer, loader, PromptedSegmentationLoss(options.iou_weight), options.steps, ctx,
                  evaluate_fn=held_out_dice, eval_every=options.eval_every,
                  max_seconds=None if minutes is None else 60.0 * minutes, grad_clip=options.grad_clip,
                  progress=options.progress, desc=name, scheduler=scheduler)
    dice_before, dice_after = history.eval_dice[0], history.eval_dice[-1]
    steps_done = history.steps[-1] if history.steps else 0
    shown = "/".join(class_names)

    def per_class(values: list[float]) -> str:
        return f" ({'/'.join(f'{v:.3f}' for v in values)})" if k > 1 else ""

    summary = (f"[{name}] held-out Dice ({shown}) before {dice_before:.4f}{per_class(history.eval_per_class[0])} "
               f"-> after {dice_after:.4f}{per_class(history.eval_per_class[-1])} | "
               f"{steps_done} steps in {history.train_seconds:.0f} s"
               f"{' (stopped early: time limit)' if history.stopped_early else ''} | "
               f"trainable {trainable:,}/{total:,} ({100 * trainable / total:.2f}%) | backbone {backbone} | "
               f"adapter {out / 'adapter'}")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_adapter(sam, out / "adapter")
        if overlay is not None:
            after = _predict_slices(model, overlay, options.num_overlays, ctx.device)
            dice = {"before": _slice_dice(before["logits"], before["target"], before["present"]),
                    "after": _slice_dice(after["logits"], after["target"], after["present"])}
            save_overlays(out / "overlays.png", after["image"], after["target"],
                          {"before": before["logits"] > 0, "after": after["logits"] > 0}, class_names,
                          boxes=after.get("boxes"), points=after.get("points"),
                          point_labels=after.get("point_labels"), dice=dice)
        save_curves(out / "curves.png", history, class_names)
    result = FinetuneResult(dice_before, dice_after, history.eval_per_class[0], history.eval_per_class[-1],
                            trainable, total, steps_done, history.train_seconds, time.monotonic() - started,
                            history.stopped_early, out, summary, history)
    if ctx.is_main:
        metrics = {key: v for key, v in asdict(result).items() if key not in ("history", "out_dir")}
        metrics.update(class_names=list(class_names), world_size=ctx.world_size, backbone=backbone,
                       eval_steps=history.eval_steps, eval_dice=history.eval_dice, losses=history.losses)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        say(summary)
    barrier()
    return result
