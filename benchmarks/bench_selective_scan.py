"""Benchmark the selective scan: reference loop vs chunked torch path vs C kernel (CPU) vs Triton vs mamba_ssm.

Inputs follow a Mamba block: u, z ~ N(0, 1); delta ~ 0.5 N(0, 1) with ``delta_bias`` from Mamba's dt
init (dt log-uniform in [1e-3, 1e-1]) and softplus; A = −(1..N) per channel (S4D-real); variable
B, C ``(batch, N, L)``; D = 1. Modes: ``fwd`` and ``fwdbwd`` (forward + backward of every input).
Time: median ms (``triton.testing.do_bench`` on CUDA, ``torch.utils.benchmark`` on CPU); memory: peak
MB allocated during one call above what was allocated before it.

    python3 benchmarks/bench_selective_scan.py --out benchmarks/results          # CUDA: full sweep
    OMP_NUM_THREADS=1 python3 benchmarks/bench_selective_scan.py --quick        # CPU: small sweep
    OMP_NUM_THREADS=2 python3 benchmarks/bench_selective_scan.py --quick --suffix _2threads

Writes ``selective_scan_<device>.csv`` (one row per case, with device and versions) and a PNG plot
(skipped without matplotlib) into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import environment, peak_memory_mb, pyplot, time_ms, write_csv  # noqa: E402

from medadapt.kernels.selective_scan import (  # noqa: E402
    cpu_kernel_available,
    selective_scan_cpu,
    selective_scan_reference,
    selective_scan_torch,
    selective_scan_triton,
)

__all__ = ["main", "run", "make_inputs", "make_call"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mamba_ssm():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or built without CUDA
        return None
    return selective_scan_fn


def methods_for(device: torch.device, triton_configs=()) -> dict:
    found = {"reference": selective_scan_reference, "torch": selective_scan_torch}
    if device.type == "cpu" and cpu_kernel_available():
        found["cpu"] = selective_scan_cpu
    if device.type == "cuda":
        found["triton"] = selective_scan_triton
        for cfg in triton_configs:  # "DxT": block of D channels, chunk of T steps per program
            block_d, block_t = (int(v) for v in cfg.lower().split("x"))
            found[f"triton_{cfg}"] = functools.partial(selective_scan_triton, block_d=block_d, block_t=block_t)
        if (mamba := _mamba_ssm()) is not None:
            found["mamba_ssm"] = mamba
    return found


def make_inputs(batch: int, dim: int, length: int, d_state: int, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    dt = torch.exp(torch.rand(dim, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bias = (dt + torch.log(-torch.expm1(-dt))).to(device)  # inverse softplus, float32 like Mamba
    A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1).to(device)
    return {
        "u": rnd(batch, dim, length), "delta": rnd(batch, dim, length, scale=0.5), "A": A,
        "B": rnd(batch, d_state, length), "C": rnd(batch, d_state, length),
        "D": torch.ones(dim, device=device), "z": rnd(batch, dim, length), "delta_bias": bias,
    }


def make_call(fn, inputs: dict, mode: str):
    """A no-argument callable running one forward (``fwd``) or forward + backward (``fwdbwd``)."""
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    if mode == "fwd":
        args = [inputs[k] for k in names]

        def call():
            with torch.no_grad():
                return fn(*args, delta_softplus=True)

        return call
    leaves = [inputs[k].detach().clone().requires_grad_(True) for k in names]
    grad_out = torch.randn_like(inputs["u"])

    def call():
        out = fn(*leaves, delta_softplus=True)
        return torch.autograd.grad(out, leaves, grad_out)

    return call


def run(args) -> list[dict]:
    device = torch.device(args.device)
    env = environment(device)
    found = methods_for(device, args.triton_configs)
    chosen = [m for m in found if not args.methods or m in args.methods or m.startswith("triton_")]
    rows = []
    for dim in args.dims:
        for length in args.lengths:
            inputs = make_inputs(args.batch, dim, length, args.d_state, DTYPES[args.dtype], device)
            for mode in args.modes:
                for name in chosen:
                    if name == "reference" and length > args.ref_max_len:
                        continue
                    call = make_call(found[name], inputs, mode)
                    call()  # warm-up (compiles Triton kernels)
                    ms = time_ms(call, device, min_run_time=args.min_run_time)
                    mem = peak_memory_mb(call, device)
                    row = {**env, "method": name, "mode": mode, "batch": args.batch, "d_inner": dim,
                           "d_state": args.d_state, "seqlen": length, "dtype": args.dtype,
                           "ms": round(ms, 4), "peak_mb": round(mem, 3)}
                    rows.append(row)
                    print(f"{name:10s} {mode:6s} D={dim:5d} L={length:5d}  {ms:10.3f} ms  {mem:9.2f} MB",
                          flush=True)
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """``x_vs_<base>`` = this method's time / the base's time (> 1: slower), for base in reference,
    mamba_ssm, torch — so slowdowns show as plainly as speedups."""
    key = lambda r: (r["mode"], r["d_inner"], r["seqlen"])  # noqa: E731
    for base in ("reference", "torch", "mamba_ssm"):
        times = {key(r): r["ms"] for r in rows if r["method"] == base}
        for r in rows:
            if key(r) in times:
                r[f"x_vs_{base}"] = round(r["ms"] / times[key(r)], 4)


def plot(rows: list[dict], path: str) -> bool:
    plt = pyplot()
    if plt is None or not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    series = sorted({(r["method"], r["mode"], r["d_inner"]) for r in rows})
    for method, mode, dim in series:
        pts = sorted((r["seqlen"], r["ms"], r["peak_mb"]) for r in rows
                     if (r["method"], r["mode"], r["d_inner"]) == (method, mode, dim))
        style = "-" if mode == "fwd" else "--"
        label = f"{method} {mode} D={dim}"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        axes[1].plot([p[0] for p in pts], [max(p[2], 1e-3) for p in pts], style, marker="o", label=label)
    for ax, ylabel in zip(axes, ("median time (ms)", "peak extra memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"selective scan, N={rows[0]['d_state']}, batch={rows[0]['batch']}, {rows[0]['dtype']} — "
                 f"{rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--dims", type=int, nargs="+", default=[768, 1536], help="d_inner values")
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    p.add_argument("--methods", nargs="+", choices=["reference", "torch", "cpu", "triton", "mamba_ssm"])
    p.add_argument("--triton-configs", nargs="*", default=[], metavar="DxT",
                   help="extra Triton launch configs to time, e.g. 1x512 1x1024 2x256 (CUDA only)")
    p.add_argument("--ref-max-len", type=int, default=1024 if cuda else 4096,
                   help="skip the (slow) reference loop above this length")
    p.add_argument("--min-run-time", type=float, default=0.5, help="CPU timing budget per case (s)")
    p.add_argument("--suffix", default="", help="appended to the CSV/PNG name, e.g. _2threads")
    p.add_argument("--quick", action="store_true",
                   help="small CPU sweep: L in {256, 1024, 4096}, d_inner 768")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.dims = [256, 1024, 4096], [768]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", rows[0]["device"].split(" (")[0] if rows else args.device).strip("_")
    csv_path = os.path.join(args.out, f"selective_scan_{tag}{args.suffix}.csv")
    write_csv(csv_path, rows)
    print("wrote", csv_path)
    png = csv_path[:-4] + ".png"
    if plot(rows, png):
        print("wrote", png)


if __name__ == "__main__":
    main()
