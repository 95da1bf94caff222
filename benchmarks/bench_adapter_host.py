"""Host (Python) time of one fused-adapter forward+backward, the GPU launches stubbed out: runs on any CPU.

Outside CUDA graphs a batch-1 adapter call is bound by the host, not the GPU (H100 host, Triton 3.6:
0.91 ms per fused forward+backward vs 0.70 eager, ``adapter_host_<device>.txt`` from ``tune_adapter.py``).
This measures the part of that time medadapt's own code spends — validation, dtype casts, autograd,
buffers, grid and tuning-key arithmetic, the cuBLAS calls at tiny sizes — with every Triton launch
replaced by a call that only evaluates its grid, next to eager torch's ``residual + s·(gelu(x Wdᵀ+bd) Wuᵀ+bu)``
with autograd at the same tiny size. Triton's own argument binding per launch (three per call) comes on top
on a GPU and is not measured here.

    python3 benchmarks/bench_adapter_host.py --out benchmarks/results

Writes ``adapter_host_stubbed_cpu.csv``: microseconds per call, per backward mode.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's kernels are never run; this lets them import
os.environ["MEDADAPT_KERNELS"] = "triton"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_csv  # noqa: E402

from medadapt.kernels import fused_adapter  # noqa: E402
from medadapt.kernels.fused_adapter import triton_launch  # noqa: E402


class _StubLaunches:
    """Replaces the launcher's Triton launches by grid evaluations and counts them."""

    def __init__(self):
        self.count = 0
        tiles = {**triton_launch._INTERPRETER_CONFIG[0].kwargs, **triton_launch._INTERPRETER_WGRAD_CONFIG[0].kwargs}
        self.config = triton.Config(tiles)

    def launch(self, tuner, grid, shape_key, args, constexprs):
        self.count += 1
        grid(self.config.all_kwargs())
        return self.config

    def __getitem__(self, grid):  # column_sum_kernel[grid](...)
        def run(*args, **kwargs):
            self.count += 1
        return run


def _per_call_us(step, calls: int) -> float:
    for _ in range(max(10, calls // 20)):
        step()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for adapter_host_stubbed_cpu.csv")
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    M, C, H = 16, 32, 8  # tiny: the arithmetic costs far less than the host bookkeeping
    leaves = [torch.randn(*shape, requires_grad=True) for shape in ((M, C), (H, C), (H,), (C, H), (C,), (M, C))]
    x, w_down, b_down, w_up, b_up, residual = leaves

    def fused():
        fused_adapter(x, w_down, b_down, w_up, b_up, 0.5, residual).sum().backward()

    def eager():
        (residual + 0.5 * F.linear(F.gelu(F.linear(x, w_down, b_down)), w_up, b_up)).sum().backward()

    stub = _StubLaunches()
    saved = triton_launch._launch, triton_launch.column_sum_kernel, triton_launch.BACKWARD_MODE
    rows = []
    try:
        triton_launch._launch, triton_launch.column_sum_kernel = stub.launch, stub
        for mode in ("cublas", "wgrad_kernel"):
            triton_launch.BACKWARD_MODE = mode
            stub.count = 0
            fused()
            launches = stub.count
            per_call = _per_call_us(fused, args.calls)
            rows.append({**environment("cpu"), "path": f"fused ({mode})", "us_per_call": per_call,
                         "triton_launches": launches})
    finally:
        triton_launch._launch, triton_launch.column_sum_kernel, triton_launch.BACKWARD_MODE = saved
    rows.append({**environment("cpu"), "path": "eager torch", "us_per_call": _per_call_us(eager, args.calls),
                 "triton_launches": 0})
    for row in rows:
        print(f"{row['path']:22} {row['us_per_call']:7.1f} us per forward+backward ({row['triton_launches']} launches)")
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "adapter_host_stubbed_cpu.csv"), rows)
    return rows


if __name__ == "__main__":
    main()
