"""Fused bottleneck adapter: eager torch vs torch.compile vs medadapt's fused kernel, against a roofline.

Shapes are Med-SA's adapters in SAM's image encoder at 1024² input: 64×64 = 4096 tokens per image,
batch 1–8, widths 768/1024/1280 (ViT-B/L/H), hidden = 0.25 · width (192/256/320). The default is the
parallel MLP adapter ``y = residual + 0.5 · Adapter(x)`` (``--sequential``: ``y = x + Adapter(x)``).

For each case and implementation: forward (no grad) and forward+backward time (median), achieved
bandwidth (minimal bytes moved / time) and FLOP rate, the fraction of a measured roofline
(``max(bytes / peak copy bandwidth, FLOPs / peak matmul FLOP/s)`` over the time), peak memory of a
forward+backward, activation memory saved for the backward, and the largest difference from eager.
``fused`` is the Triton kernel on CUDA, the memory-saving torch path elsewhere (column ``backend``).

    python3 benchmarks/bench_adapter.py --out benchmarks/results     # GPU: bf16, all widths, batch 1,2,4,8
    python3 benchmarks/bench_adapter.py --quick                        # CPU smoke run, < 1 min

Writes ``adapter_<device>.csv`` (one row per case, implementation and pass) and ``adapter_<device>.png``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, peak_memory_mb, pyplot, time_ms, write_csv  # noqa: E402

from medadapt.kernels import fused_adapter, fused_adapter_reference  # noqa: E402
from medadapt.kernels.fused_adapter import fused_adapter_backend  # noqa: E402

MODELS = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GOALS = {"speedup_vs_eager": 2.0, "speedup_vs_compile": 1.3, "roofline_fraction": 0.7, "saved_ratio": 0.5}


def _copy_gbps(device: torch.device) -> float:
    src = torch.empty(1 << (28 if device.type == "cuda" else 23), dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (time_ms(lambda: dst.copy_(src), device, 0.3) / 1e3) / 1e9


def _matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    c = torch.empty_like(a)
    return 2 * n**3 / (time_ms(lambda: torch.mm(a, b, out=c), device, 0.3) / 1e3) / 1e12


def measure_roofline(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    """Peak copy bandwidth (1 GiB copy on GPU, read + write) and peak ``dtype`` matmul FLOP/s (8192³ on GPU)."""
    peak_gbps = _copy_gbps(device)
    peak_tflops = _matmul_tflops(device, dtype, 8192 if device.type == "cuda" else (512 if quick else 1024))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"peak_gbps": peak_gbps, "peak_tflops": peak_tflops}


def case_bytes_flops(tokens: int, width: int, hidden: int, dtype: torch.dtype, sequential: bool) -> dict:
    """Minimal bytes and useful FLOPs of one adapter call (no recomputation counted).

    Forward: read x (and the residual unless it is x) and the weights, write the output; FLOPs
    ``4·M·C·H``. Backward: read x, the output gradient and the weights, write dx and the weight
    gradients (d residual is the output gradient itself); FLOPs twice the forward's.
    """
    size = torch.empty((), dtype=dtype).element_size()
    weights = (2 * width * hidden + width + hidden) * size
    act = tokens * width * size
    fwd_bytes = (2 if sequential else 3) * act + weights
    fwd_flops = 4 * tokens * width * hidden
    return {"fwd_bytes": fwd_bytes, "fwdbwd_bytes": fwd_bytes + 3 * act + 2 * weights,
            "fwd_flops": fwd_flops, "fwdbwd_flops": 3 * fwd_flops}


def _compiled_reference():
    """``torch.compile(fused_adapter_reference, dynamic=False)``: one static graph per shape and grad mode, as
    eager and the fused kernel run at fixed shapes (without it the second batch size recompiles with a
    dynamic batch dimension)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    return torch.compile(fused_adapter_reference, dynamic=False)


def _inputs(width: int, hidden: int, batch: int, grid: int, dtype, device, sequential: bool):
    gen = torch.Generator(device="cpu").manual_seed(batch * 1000 + width)

    def make(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype).requires_grad_()

    x = make(batch, grid, grid, width)
    tensors = {"x": x, "w_down": make(hidden, width, std=width**-0.5), "b_down": make(hidden, std=0.1),
               "w_up": make(width, hidden, std=hidden**-0.5), "b_up": make(width, std=0.1)}
    residual = x if sequential else make(batch, grid, grid, width)
    scale = 1.0 if sequential else 0.5
    grad = torch.randn(batch, grid, grid, width, generator=gen).to(device, dtype)
    return tensors, residual, scale, grad


def _saved_bytes(call, inputs: list[torch.Tensor]) -> float:
    """Bytes the autograd graph keeps for the backward, beyond the inputs themselves (deduplicated)."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    del out
    return float(sum(seen.values()))


def _saved_bytes_cuda(call, device) -> float:
    """CUDA: memory allocated while the forward's graph is alive, minus its output."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    out = call()
    torch.cuda.synchronize(device)
    kept = torch.cuda.memory_allocated(device) - before - out.untyped_storage().nbytes()
    del out
    return float(kept)


def _max_rel_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-12)).item()
               for g, w in zip(got, want))


def _graph_ms(fn, device, min_run_time: float) -> float:
    """Median time of one replay of ``fn`` captured in a CUDA graph: the GPU work without launch overhead.

    At SAM's token counts an H100/H200 finishes the adapter's kernels faster than Python can launch
    them, so plain timing measures the host; graph replays measure the kernels.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, device, min_run_time)


def run_case(impl: str, fn, tensors, residual, scale, grad, device, min_run_time: float,
             graphs: bool = False) -> dict:
    leaves = list(tensors.values()) + ([] if residual is tensors["x"] else [residual])

    def call():
        return fn(tensors["x"], tensors["w_down"], tensors["b_down"], tensors["w_up"], tensors["b_up"],
                  scale=scale, residual=residual, activation="gelu")

    def forward():
        with torch.no_grad():
            call()

    def forward_backward():
        torch.autograd.grad(call(), leaves, grad)

    row = {"impl": impl}
    forward_backward()  # compile / autotune outside the timed region
    timer = _graph_ms if graphs else time_ms
    row["timing"] = "cuda_graph_replay" if graphs else "python_launch"
    row["fwd_ms"] = timer(forward, device, min_run_time)
    row["fwdbwd_ms"] = timer(forward_backward, device, min_run_time)
    row["peak_mb"] = peak_memory_mb(forward_backward, device)
    try:
        saved = _saved_bytes_cuda(call, device) if device.type == "cuda" else _saved_bytes(call, leaves)
    except Exception:  # saved-tensor hooks are not supported by every torch.compile version
        saved = float("nan")
    row["saved_mb"] = saved / 1e6
    out = call()
    row["outputs"] = [out.detach()] + list(torch.autograd.grad(out, leaves, grad))
    return row


def _slug(name: str) -> str:
    return "cpu" if name.startswith("cpu") else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the CSV and PNG")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--grid", type=int, default=64, help="tokens per image = grid² (SAM at 1024²: 64)")
    parser.add_argument("--mlp-ratio", type=float, default=0.25)
    parser.add_argument("--sequential", action="store_true", help="residual = x, scale 1 (space adapter)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: ViT-B width, one 16×16 image")
    parser.add_argument("--graphs", action="store_true",
                        help="CUDA only: time replays of CUDA graphs (kernel time without Python launch overhead)")
    parser.add_argument("--backward-mode", choices=["auto", "cublas", "wgrad_kernel"], default=None,
                        help="the fused backward's second half (default: the library's BACKWARD_MODE); "
                             "an explicit mode is added to the output file names")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.grid = ["vit_b"], [1], 16
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = _args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    env = environment(device)
    _set_backward_mode(args.backward_mode)
    min_run_time = 0.2 if args.quick else 0.5
    roofline = measure_roofline(device, dtype, quick=args.quick)
    print(f"{env['device']}: peak copy {roofline['peak_gbps']:.0f} GB/s, "
          f"peak {args.dtype} matmul {roofline['peak_tflops']:.2f} TFLOP/s")
    rows: list[dict] = []
    for model in args.models:
        impls = {"eager": fused_adapter_reference, "fused": fused_adapter}
        if not args.no_compile:  # fresh per width: one static graph per batch size
            torch._dynamo.reset()
            impls["compile"] = _compiled_reference()
        width = MODELS[model]
        hidden = max(1, int(args.mlp_ratio * width))
        for batch in args.batches:
            tensors, residual, scale, grad = _inputs(width, hidden, batch, args.grid, dtype, device,
                                                     args.sequential)
            tokens = batch * args.grid**2
            bytes_flops = case_bytes_flops(tokens, width, hidden, dtype, args.sequential)
            results = {}
            for impl, fn in impls.items():
                base = {**env, "model": model, "width": width, "hidden": hidden, "batch": batch, "tokens": tokens,
                        "dtype": args.dtype, "adapter": "sequential" if args.sequential else "parallel",
                        "impl": impl, "backward_mode": _backward_plan_name(width, hidden) if impl == "fused" else "",
                        "backend": fused_adapter_backend(tensors["x"], tensors["w_down"], tensors["w_up"])
                        if impl == "fused" else impl}
                try:
                    results[impl] = run_case(impl, fn, tensors, residual, scale, grad, device, min_run_time,
                                             graphs=args.graphs and device.type == "cuda")
                    results[impl]["status"] = "ok"
                except Exception as err:  # a failed baseline (e.g. torch.compile) is recorded, not fatal
                    results[impl] = {"status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                    print(f"{model} b={batch} {impl}: {results[impl]['status']}")
                results[impl] = {**base, **results[impl]}
            rows += _finish_rows(results, bytes_flops, roofline)
    _report(rows, args, env)
    return rows


def _finish_rows(results: dict, bytes_flops: dict, roofline: dict) -> list[dict]:
    """Rates, roofline fractions, speedups, saved-memory ratio and differences from eager."""
    outputs = {impl: row.pop("outputs", None) for impl, row in results.items()}
    eager = results.get("eager", {})
    rows = []
    for impl, row in results.items():
        if row["status"] == "ok":
            for phase in ("fwd", "fwdbwd"):
                seconds = row[f"{phase}_ms"] / 1e3
                nbytes, flops = bytes_flops[f"{phase}_bytes"], bytes_flops[f"{phase}_flops"]
                row[f"{phase}_gbps"] = nbytes / seconds / 1e9
                row[f"{phase}_tflops"] = flops / seconds / 1e12
                bound = max(nbytes / (roofline["peak_gbps"] * 1e9), flops / (roofline["peak_tflops"] * 1e12))
                row[f"{phase}_roofline_fraction"] = bound / seconds
                for ref in ("eager", "compile"):
                    if results.get(ref, {}).get("status") == "ok":
                        row[f"{phase}_speedup_vs_{ref}"] = results[ref][f"{phase}_ms"] / row[f"{phase}_ms"]
            if eager.get("status") == "ok" and impl != "eager":
                row["saved_ratio_vs_eager"] = row["saved_mb"] / max(eager["saved_mb"], 1e-9)
                row["max_rel_diff_vs_eager"] = _max_rel_diff(outputs[impl], outputs["eager"])
        rows.append({**row, **bytes_flops, **{f"roofline_{k}": v for k, v in roofline.items()}})
    return rows


def _set_backward_mode(mode: str | None) -> None:
    """Set the fused adapter's ``BACKWARD_MODE`` (None: keep the library's)."""
    if mode is not None:
        from medadapt.kernels.fused_adapter import triton_launch

        triton_launch.BACKWARD_MODE = mode


def _backward_plan_name(width: int, hidden: int) -> str:
    """The Triton backward's plan for this shape, e.g. ``wgrad_kernel+merged`` (``torch`` without Triton)."""
    try:
        from medadapt.kernels.fused_adapter import triton_launch
    except ImportError:  # no Triton: the fused adapter runs its torch path
        return "torch"
    mode, merged = triton_launch._backward_plan(width, width, hidden)
    return mode + ("+merged" if merged else "")


def _report(rows: list[dict], args, env: dict) -> None:
    slug = _slug(env["device"]) + ("_graphs" if args.graphs and args.device.startswith("cuda") else "")
    slug += f"_{args.backward_mode}" if args.backward_mode else ""
    csv_path = os.path.join(args.out, f"adapter_{slug}.csv")
    write_csv(csv_path, rows)
    print(f"{'model':6} {'b':>2} {'impl':8} {'backend':8} {'fwd ms':>8} {'f+b ms':>8} {'f+b GB/s':>9} "
          f"{'f+b TF/s':>9} {'roof':>5} {'x eager':>7} {'x comp':>7} {'saved MB':>9} {'peak MB':>8} {'diff':>8}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['model']:6} {r['batch']:>2} {r['impl']:8} {r['status']}")
            continue
        print(f"{r['model']:6} {r['batch']:>2} {r['impl']:8} {r['backend']:8} {r['fwd_ms']:8.3f} "
              f"{r['fwdbwd_ms']:8.3f} {r['fwdbwd_gbps']:9.1f} {r['fwdbwd_tflops']:9.3f} "
              f"{r['fwdbwd_roofline_fraction']:5.2f} {r.get('fwdbwd_speedup_vs_eager', float('nan')):7.2f} "
              f"{r.get('fwdbwd_speedup_vs_compile', float('nan')):7.2f} {r['saved_mb']:9.2f} "
              f"{r['peak_mb']:8.1f} {r.get('max_rel_diff_vs_eager', 0.0):8.1e}")
    fused = [r for r in rows if r["impl"] == "fused" and r["status"] == "ok"]
    if fused and args.device.startswith("cuda"):
        checks = {"fwd+bwd ≥ 2× eager": all(r.get("fwdbwd_speedup_vs_eager", 0) >= GOALS["speedup_vs_eager"]
                                              for r in fused),
                  "fwd+bwd ≥ 1.3× compile": all(r.get("fwdbwd_speedup_vs_compile", 0) >= GOALS["speedup_vs_compile"]
                                                for r in fused),
                  "≥ 70% of roofline": all(r["fwdbwd_roofline_fraction"] >= GOALS["roofline_fraction"] for r in fused),
                  "saved ≤ 0.5× eager": all(r.get("saved_ratio_vs_eager", 1) <= GOALS["saved_ratio"] for r in fused)}
        print("goals (every case): " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()))
    print(f"wrote {csv_path}")
    _plot(rows, os.path.join(args.out, f"adapter_{slug}.png"), env["device"] + (" (CUDA graphs)" if "_graphs" in slug
                                                                                else ""))


def _plot(rows: list[dict], path: str, device: str) -> None:
    plt = pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    if plt is None or not ok:
        return
    cases = sorted({(r["width"], r["batch"]) for r in ok})
    impls = [i for i in ("eager", "compile", "fused") if any(r["impl"] == i for r in ok)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in ((axes[0], "fwd_ms", "forward (ms)"), (axes[1], "fwdbwd_ms", "forward+backward (ms)"),
                           (axes[2], "fwdbwd_roofline_fraction", "forward+backward: fraction of roofline")):
        step = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            values = [next((r[key] for r in ok if r["impl"] == impl and (r["width"], r["batch"]) == c), 0.0)
                      for c in cases]
            backend = next(r["backend"] for r in ok if r["impl"] == impl)
            label = impl if backend == impl else f"{impl} ({backend})"
            ax.bar([k + i * step for k in range(len(cases))], values, width=step, label=label)
        ax.set_xticks([k + 0.4 - step / 2 for k in range(len(cases))])
        ax.set_xticklabels([f"C={w}\nB={b}" for w, b in cases], fontsize=7)
        ax.set_title(title, fontsize=10)
    axes[0].legend()
    fig.suptitle(f"bottleneck adapter, {ok[0]['dtype']}, {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
