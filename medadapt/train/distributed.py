"""DDP helpers: one code path for a single process and for ``torchrun`` (gloo on CPU, NCCL on GPU).

Under ``torchrun`` every process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the
environment. The model is wrapped in ``DistributedDataParallel`` only when ``world_size > 1``; DDP
broadcasts rank 0's parameters and buffers at wrap time and averages gradients at every backward, so
all ranks keep identical weights. Files, plots and prints come from rank 0 only.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

__all__ = ["DistContext", "barrier", "broadcast_flag", "cleanup_distributed", "init_distributed",
           "make_train_loader", "shard", "unwrap", "wrap_ddp"]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, its device, and whether it writes outputs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from err


def init_distributed(device: str | None = None, backend: str | None = None, timeout_s: float = 600.0) -> DistContext:
    """Read the ``torchrun`` environment and start the process group when ``WORLD_SIZE > 1``.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). On CUDA each process takes
            ``cuda:LOCAL_RANK``.
        backend: None picks NCCL for CUDA and gloo for CPU.
        timeout_s: collective timeout.
    """
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK ({rank}) must be in [0, WORLD_SIZE ({world_size}))")
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or None, got {device!r}")
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if kind == "cuda" else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, where)


def cleanup_distributed() -> None:
    """Destroy the process group if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. "time is up, stop training"), so all ranks stop together."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def wrap_ddp(module: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(module)`` when ``world_size > 1``, else ``module`` itself."""
    if not ctx.distributed:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def make_train_loader(dataset: Dataset, batch_size: int, ctx: DistContext, collate_fn=None, seed: int = 0,
                      num_workers: int = 0) -> DataLoader:
    """A shuffling loader; each rank draws its own part of every epoch (``DistributedSampler``).

    Call ``loader.sampler.set_epoch(epoch)`` at each epoch (done by :func:`medadapt.train.fit`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if ctx.distributed:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                                     drop_last=False)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, drop_last=False)


def shard(items: Sequence, ctx: DistContext) -> list:
    """This rank's share ``items[rank::world_size]`` (no padding, so nothing is scored twice)."""
    return list(items[ctx.rank::ctx.world_size])
