"""DDP helpers: single-process behaviour, and a real 2-process gloo run under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from medadapt.train import DistContext, init_distributed, make_train_loader, shard, unwrap, wrap_ddp
from medadapt.train.distributed import broadcast_flag

HERE = Path(__file__).parent


def test_single_process_context_from_empty_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert ctx.device == torch.device("cpu")
    module = nn.Linear(2, 2)
    assert wrap_ddp(module, ctx) is module and unwrap(module) is module
    assert broadcast_flag(True, ctx) is True


def test_bad_environment_raises(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK"):
        init_distributed("cpu")
    with pytest.raises(ValueError, match="device"):
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        init_distributed("tpu")


def test_shard_splits_without_overlap_or_padding():
    items = list(range(7))
    parts = [shard(items, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]


def test_train_loader_covers_dataset_per_epoch_and_reshuffles():
    data = list(range(10))
    loader = make_train_loader(data, 4, DistContext(), collate_fn=list, seed=3)
    first = [x for batch in loader for x in batch]
    second = [x for batch in loader for x in batch]
    assert sorted(first) == data and sorted(second) == data and first != second
    with pytest.raises(ValueError, match="batch_size"):
        make_train_loader(data, 0, DistContext())


def test_two_gloo_processes_average_gradients_and_end_identical(tmp_path):
    """torchrun, 2 CPU processes: DDP grads equal the one-process grads of the joined batch; a short
    run_finetune leaves both ranks with identical adapter weights (though they were built from different seeds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("held-out Dice") == 1  # the summary comes from rank 0 only

    # gradients: DDP's average over two half batches == gradient of the whole batch in one process
    sys.path.insert(0, str(HERE))
    from ddp_worker import gradient_batch, tiny_injected

    from medadapt.train import PromptedSAM, PromptedSegmentationLoss

    model = PromptedSAM(tiny_injected(0))
    batch = gradient_batch(range(4))
    assert batch["present"].all()  # equal pairs per rank, so the mean of rank means is the joint mean
    PromptedSegmentationLoss()(model(batch), batch).backward()
    ddp_grads = load_file(tmp_path / "ddp_grads.safetensors")
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(ddp_grads) == set(ours)
    for name, grad in ours.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    assert set(rank0) == set(rank1) and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    fresh = tiny_injected(0)  # rank 0's starting point: training moved the adapters
    from medadapt.core.io import adapter_state_dict

    start = adapter_state_dict(fresh)
    assert any(not torch.equal(start[n], rank0[n]) for n in rank0)
    outputs = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert outputs == ["adapter", "curves.png", "metrics.json", "overlays.png"]
    lines = [(tmp_path / f"rank{r}.txt").read_text().split(" ", 2) for r in (0, 1)]
    assert lines[0][0] == lines[1][0] == "2"
    assert lines[0][1:] == lines[1][1:]  # same held-out Dice and same (all-reduced) loss curve on both ranks
