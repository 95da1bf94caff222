"""The training loop: a step function and ``fit`` (steps, periodic held-out Dice, wall-clock guard, tqdm)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .._optional import require
from .distributed import DistContext, broadcast_flag
from .objectives import to_device

__all__ = ["History", "fit", "train_step"]


@dataclass
class History:
    """What ``fit`` saw: the loss at every step and the held-out Dice at each evaluation."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_dice: list[float] = field(default_factory=list)
    eval_per_class: list[list[float]] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: bool = False

    def record_eval(self, step: int, result: dict) -> None:
        self.eval_steps.append(step)
        self.eval_dice.append(float(result["dice"]))
        self.eval_per_class.append([float(d) for d in result["dice_per_class"]])


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
               loss_fn: Callable[[dict, dict], torch.Tensor], device: torch.device | str = "cpu",
               grad_clip: float | None = None) -> float:
    """One optimiser step on ``batch``; returns the loss. ``model`` may be DDP-wrapped (gradients averaged)."""
    batch = to_device(batch, device)
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(batch), batch)
    loss.backward()
    if grad_clip:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(loss.detach())


def _mean_over_ranks(value: float, ctx: DistContext) -> float:
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / ctx.world_size


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
        loss_fn: Callable[[dict, dict], torch.Tensor], steps: int, ctx: DistContext | None = None,
        evaluate_fn: Callable[[], dict] | None = None, eval_every: int = 0, max_seconds: float | None = None,
        grad_clip: float | None = None, progress: bool = True, desc: str = "fine-tune",
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> History:
    """Train for ``steps`` optimiser steps, cycling through ``loader``.

    ``evaluate_fn()`` (held-out Dice, see :func:`~medadapt.train.objectives.evaluate`) runs before the
    first step, every ``eval_every`` steps, and after the last one, so ``History.eval_dice[0]`` is the
    Dice before training and ``[-1]`` the Dice after. Every rank must call ``fit`` (collectives inside);
    rank 0 decides when ``max_seconds`` of wall time since the start of training (periodic evaluations
    included; ``History.train_seconds`` counts the training steps alone) are used up and every rank stops at
    that step.
    ``scheduler.step()`` runs after every optimiser step.

    Raises:
        ValueError: ``steps`` < 1, or ``loader`` yields no batch in an epoch (it would never reach ``steps``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ctx = ctx or DistContext()
    history = History()
    if evaluate_fn is not None:
        history.record_eval(0, evaluate_fn())
    tqdm = require("tqdm", "the progress bar").tqdm
    bar = tqdm(total=steps, desc=desc, disable=not (progress and ctx.is_main), dynamic_ncols=True)
    start, step, epoch = time.monotonic(), 0, 0
    train_time = 0.0
    while step < steps and not history.stopped_early:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        batches = 0
        for batch in loader:
            batches += 1
            tick = time.monotonic()
            loss = _mean_over_ranks(train_step(model, batch, optimizer, loss_fn, ctx.device, grad_clip), ctx)
            if scheduler is not None:
                scheduler.step()
            train_time += time.monotonic() - tick
            step += 1
            history.steps.append(step)
            history.losses.append(loss)
            bar.update(1)
            postfix = {"loss": f"{loss:.4f}"}
            if evaluate_fn is not None and eval_every and step % eval_every == 0 and step < steps:
                history.record_eval(step, evaluate_fn())
            if history.eval_dice:
                postfix["dice"] = f"{history.eval_dice[-1]:.3f}"
            bar.set_postfix(postfix)
            if max_seconds is not None and step < steps:
                history.stopped_early = broadcast_flag(time.monotonic() - start > max_seconds, ctx)
            if step >= steps or history.stopped_early:
                break
        if batches == 0:
            bar.close()
            raise ValueError(f"loader yielded no batch in epoch {epoch} (after {step} of {steps} steps): an empty "
                             "dataset, or fewer items than batch_size with drop_last")
        epoch += 1
    bar.close()
    history.train_seconds = train_time
    if evaluate_fn is not None:
        history.record_eval(step, evaluate_fn())
    return history
