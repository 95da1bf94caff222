"""fit(): evaluation schedule, the wall-clock guard, and that training improves held-out Dice."""

import pytest
import torch
from _synthetic import Squares
from torch.utils.data import DataLoader

import medadapt as ma
from medadapt.train import (
    DistContext,
    PromptCollate,
    PromptedSAM,
    PromptedSegmentationLoss,
    build_sam,
    evaluate,
    fit,
    make_train_loader,
)


def _setup(seed=0, lr=3e-3):
    sam = ma.inject(build_sam("tiny", img_size=32, seed=seed), ma.MedSAConfig(modules_to_save=["mask_decoder"]))
    model = PromptedSAM(sam)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loader = make_train_loader(Squares(16, seed=1), 4, DistContext(), PromptCollate([1, 2], "box", seed=0), seed=0)
    held = Squares(8, seed=2)
    batches = [PromptCollate([1, 2], "box", jitter=0.0)([held[i] for i in range(8)])]
    return model, optimizer, loader, batches


def test_schedule_and_only_trainable_parameters_move():
    model, optimizer, loader, batches = _setup()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    calls = []

    def evaluate_fn():
        calls.append(len(calls))
        return evaluate(model, batches)

    history = fit(model, optimizer, loader, PromptedSegmentationLoss(), steps=5, evaluate_fn=evaluate_fn,
                  eval_every=2, progress=False)
    assert history.steps == [1, 2, 3, 4, 5] and len(history.losses) == 5
    assert history.eval_steps == [0, 2, 4, 5] and len(calls) == 4  # 4 steps per epoch: the loader cycled
    assert not history.stopped_early and history.train_seconds > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_time_limit_stops_after_the_current_step():
    model, optimizer, loader, _ = _setup()
    history = fit(model, optimizer, loader, PromptedSegmentationLoss(), steps=50, max_seconds=0.0, progress=False)
    assert history.stopped_early and history.steps == [1]


def test_training_raises_held_out_dice():
    torch.manual_seed(0)
    model, optimizer, loader, batches = _setup(lr=3e-3)
    history = fit(model, optimizer, loader, PromptedSegmentationLoss(), steps=80,
                  evaluate_fn=lambda: evaluate(model, batches), progress=False)
    assert history.eval_dice[0] < 0.1 and history.eval_dice[-1] > 0.3, history.eval_dice


def test_scheduler_steps_once_per_optimiser_step():
    model, optimizer, loader, _ = _setup(lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1 + t))
    fit(model, optimizer, loader, PromptedSegmentationLoss(), steps=3, progress=False, scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == 1e-3 / 4


class _EmptyLoader:
    """Yields no batch; fails the test (instead of hanging) when asked for many epochs."""

    sampler = None

    def __init__(self):
        self.epochs = 0

    def __iter__(self):
        self.epochs += 1
        assert self.epochs <= 3, "fit keeps starting epochs of an empty loader"
        return iter(())


def test_empty_loader_raises_instead_of_looping():
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    empty = _EmptyLoader()
    with pytest.raises(ValueError, match="loader yielded no batch in epoch 0"):
        fit(model, optimizer, empty, lambda out, batch: out.sum(), steps=2, progress=False)
    assert empty.epochs == 1
    short = DataLoader([torch.zeros(1)] * 3, batch_size=4, drop_last=True)  # fewer items than a batch
    with pytest.raises(ValueError, match="loader"):
        fit(model, optimizer, short, lambda out, batch: out.sum(), steps=2, progress=False)
