"""Shared helpers for the kernel benchmarks: environment, timing, peak memory, CSV, plots.

Stable, small API (imported by several ``bench_*.py`` scripts):

- ``environment(device) -> dict``: ``device`` name, ``torch``/``triton``/``python`` versions (one CSV
  row's fixed columns);
- ``time_ms(fn, device) -> float``: median milliseconds per call — ``triton.testing.do_bench`` on CUDA
  (falls back to CUDA events without Triton), ``torch.utils.benchmark`` on CPU;
- ``peak_memory_mb(fn, device) -> float``: extra memory allocated at the high-water mark of one call
  above what was allocated before it — ``torch.cuda.max_memory_allocated`` on CUDA, live storages
  tracked by a dispatch mode on CPU;
- ``write_csv(path, rows)``: rows are dicts, the header is the union of their keys;
- ``pyplot()``: ``matplotlib.pyplot`` with the Agg backend, or ``None`` when matplotlib is missing.

Needs only torch (Triton and matplotlib optional), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import csv
import importlib
import itertools
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["environment", "device_name", "time_ms", "peak_memory_mb", "write_csv", "pyplot"]


def device_name(device: torch.device | str) -> str:
    """Human-readable device name: the GPU's name on CUDA, the CPU model otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({name}, {torch.get_num_threads()} threads)"


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # missing or broken: recorded, not fatal
        return "none"


def environment(device: torch.device | str) -> dict[str, str]:
    """The fixed columns of a CSV row: device name and library versions."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
    }


def time_ms(fn: Callable[[], Any], device: torch.device | str, min_run_time: float = 0.5) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench(fn, return_mode="median")`` (CUDA events when Triton is missing).
    CPU: ``torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time)`` median.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_event_median_ms(fn)
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _cuda_event_median_ms(fn: Callable[[], Any], warmup: int = 5, rep: int = 30) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Peak memory allocated during one ``fn()`` above the memory allocated before it, in MB (1e6 B).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: a dispatch mode that adds up the storages that ops
    allocate (returns that alias no input) while they are alive (weak references), checked after every
    op — tensors only, at op granularity (an op's internal scratch is not seen).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 1e6
    with _LiveStorage() as tracker:
        fn()
    return tracker.peak / 1e6


class _LiveStorage(TorchDispatchMode):
    """Running total of the bytes of storages created under the mode and still alive.

    Deaths are found by polling weak references: the newest storages after every op (temporaries die
    young), all of them every ``full_every`` ops — so a free may be seen a few ops late (the peak can
    only be overstated, slightly) and the cost stays linear even with many long-lived saved tensors.
    """

    def __init__(self, young: int = 64, full_every: int = 256):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # insertion-ordered: newest last
        self.current = self.peak = self.ops = 0
        self.young, self.full_every = young, full_every

    def _sweep(self, keys) -> None:
        for key in [k for k in keys if self.live[k][0].expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if self.ops % self.full_every == 0:
            self._sweep(list(self.live))
        else:
            self._sweep(list(itertools.islice(reversed(self.live), self.young)))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for tensor, ret in zip(results, func._schema.returns):
            if isinstance(tensor, torch.Tensor) and ret.alias_info is None:
                storage = tensor.untyped_storage()
                ptr = storage.data_ptr()
                if ptr in self.live and self.live[ptr][0].expired():  # address reused after a late free
                    self.current -= self.live.pop(ptr)[1]
                if ptr not in self.live and storage.nbytes() > 0:
                    self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts) to ``path``; header = union of keys in first-seen order."""
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
