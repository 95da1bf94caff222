"""Fused adapter on a GPU: every candidate tile shape of each kernel timed alone, the backward's parts,
and the host (Python) time per call — what the autotuner chooses from and where the time goes.

    python3 benchmarks/tune_adapter.py --out DIR            # ViT-B/L/H widths, batch 1 and 8
    TRITON_INTERPRET=1 python3 benchmarks/tune_adapter.py --smoke   # CPU: the script itself, tiny sizes

Kernels are compiled first in parallel worker processes (Triton's disk cache then serves the timing
process), then each (case, kernel, tile shape) is timed as CUDA-graph replays. The backward is timed as
a whole: ``bwd_cublas`` per tile of the fused kernel (one loop over the columns; ``bwd_cublas_two_loops``
with two), the rest cuBLAS; ``bwd_wgrad`` per tile of the weight-gradient kernel (the fused kernel
autotuned; ``bwd_wgrad_two_launches`` with one launch per weight, ``WGRAD_LAUNCHES = 2``;
``bwd_wgrad_hidden_tiles`` also with its hidden rows in tiles, ``WGRAD_HIDDEN_TILE``); the cuBLAS GEMMs and
the weight-gradient pass (one grid, two launches, hidden tiles) are also timed alone. Writes
``adapter_tuning_<device>.csv`` and ``adapter_host_<device>.txt`` (host time per call, cProfile of the
fused forward+backward).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import environment, time_ms, write_csv  # noqa: E402
from bench_adapter import MODELS, _graph_ms, _slug  # noqa: E402

__all__ = ["main"]

NEEDS = (True, True, True, True, True)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _timed_ms(fn) -> float:
    """CUDA-graph replays on a GPU (kernel time without launch overhead); wall time on the CPU (smoke run)."""
    return _graph_ms(fn, DEVICE, 0.1) if DEVICE.type == "cuda" else time_ms(fn, DEVICE, 0.01)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _case(width: int, batch: int, grid: int = 64, seed: int = 0):
    """Bf16 inputs of one SAM-sized call (``grid²`` tokens per image) as 2-D tensors."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = width // 4

    def make(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(DEVICE, torch.bfloat16)

    x2 = make(batch * grid * grid, width)
    return {"x2": x2, "w_down": make(hidden, width, std=width**-0.5), "b_down": make(hidden, std=0.1),
            "w_up": make(width, hidden, std=hidden**-0.5), "b_up": make(width, std=0.1),
            "res2": make(batch * grid * grid, width), "g2": make(batch * grid * grid, width)}


def _tuners():
    """Per kind: the tuner whose tiles are timed one by one, then the other tuners the kind launches. On a GPU
    the backward kernel's tiles not yet verified there are included (timed and checked like the others)."""
    from medadapt.kernels.fused_adapter import triton_launch as tl_

    if DEVICE.type == "cuda":
        tl_.include_unverified_tiles()

    return {"fwd": [tl_._fwd], "bwd_cublas": [tl_._bwd], "bwd_cublas_two_loops": [tl_._bwd],
            "bwd_wgrad": [tl_._wgrad, tl_._bwd], "bwd_wgrad_two_launches": [tl_._wgrad, tl_._bwd],
            "bwd_wgrad_hidden_tiles": [tl_._wgrad, tl_._bwd]}


# backward kinds: (backward_mode, the backward kernel's loops merged (None: the plan's choice), weight-gradient
# launches, hidden tile of the weight-gradient kernel ("auto": _hidden_tile))
_MODES = {"bwd_cublas": ("cublas", True, 1, None), "bwd_cublas_two_loops": ("cublas", False, 1, None),
          "bwd_wgrad": ("wgrad_kernel", True, 1, None), "bwd_wgrad_two_launches": ("wgrad_kernel", True, 2, None),
          "bwd_wgrad_hidden_tiles": ("wgrad_kernel", None, 2, "auto")}


def _hidden_tile(hidden: int) -> int:
    """The hidden tile tried for a width: 128 where it divides it (256), else 64 (192 = 3·64, 320 = 5·64)."""
    return 128 if hidden % 128 == 0 else 64


def _fitting(tuner, hidden: int) -> list:
    from medadapt.kernels.fused_adapter import triton_launch as tl_
    from medadapt.kernels.fused_adapter.triton_kernels import hidden_split

    return tl_._fitting_configs(tuner.configs, sum(hidden_split(hidden)))


def _call(kind: str, case: dict):
    from medadapt.kernels.fused_adapter.triton_launch import adapter_backward, adapter_forward

    c = case
    if kind == "fwd":
        return lambda: adapter_forward(c["x2"], c["w_down"], c["b_down"], c["w_up"], c["b_up"], c["res2"], 0.5, "gelu",
                                       torch.bfloat16)
    from medadapt.kernels.fused_adapter import triton_launch

    mode, merged, launches, tile = _MODES[kind]
    tile = _hidden_tile(c["w_down"].shape[0]) if tile == "auto" else tile

    def backward():
        saved = triton_launch.MERGE_LOOPS, triton_launch.WGRAD_LAUNCHES, triton_launch.WGRAD_HIDDEN_TILE
        triton_launch.MERGE_LOOPS, triton_launch.WGRAD_LAUNCHES, triton_launch.WGRAD_HIDDEN_TILE = (merged, launches,
                                                                                                  tile)
        try:
            return adapter_backward(c["x2"], c["w_down"], c["b_down"], c["w_up"], c["g2"], 0.5, "gelu", NEEDS,
                                    backward_mode=mode)
        finally:
            triton_launch.MERGE_LOOPS, triton_launch.WGRAD_LAUNCHES, triton_launch.WGRAD_HIDDEN_TILE = saved

    return backward


def _reference(case: dict) -> dict:
    """fp32 torch results on the same bf16 inputs: the output and ``(dx, dW_down, db_down, dW_up, db_up)``."""
    from medadapt.kernels import fused_adapter_reference

    leaves = [case[k].float().requires_grad_() for k in ("x2", "w_down", "b_down", "w_up", "b_up")]
    out = fused_adapter_reference(*leaves, scale=0.5, residual=case["res2"].float())
    return {"fwd": (out.detach(),), "bwd": torch.autograd.grad(out, leaves, case["g2"].float())}


def _max_rel_err(got, want) -> float:
    got = got if isinstance(got, tuple) else (got,)
    return max(((g.float() - w).abs().max() / w.abs().max().clamp_min(1e-12)).item() for g, w in zip(got, want))


def _run_one(kind: str, width: int, batch: int, index: int, time_it: bool, case=None, grid=64,
             reference=None) -> tuple[float, float, str]:
    """Launch (and optionally time and check) one kernel kind with only its ``index``-th fitting tile shape.

    The kind's other kernels are autotuned as usual when timing; when only compiling (``time_it`` False)
    they are pinned to their ``index``-th tile too, so parallel compile jobs cover their tiles as well.
    Returns ``(ms, max relative error vs the fp32 reference, status)``."""
    from medadapt.kernels.fused_adapter import triton_launch as tl_

    tuners = _tuners()[kind]
    pinned = tuners if not time_it else tuners[:1]
    saved = [t.configs for t in pinned]
    for t in pinned:
        configs = _fitting(t, width // 4)
        t.configs = [configs[index % len(configs)]]
    tuners[0].cache.clear()
    tl_._chosen.clear()
    try:
        fn = _call(kind, case or _case(width, batch, grid))
        got = fn()
        _sync()
        err = _max_rel_err(got, reference[kind[:3]]) if reference else float("nan")
        return (_timed_ms(fn) if time_it else 0.0), err, "ok"
    except Exception as err:  # OutOfResources (shared memory) and friends: recorded, not fatal
        return float("nan"), float("nan"), f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    finally:
        for t, configs in zip(pinned, saved):
            t.configs = configs
            t.cache.clear()
        tl_._chosen.clear()


def _compile_job(job) -> str:
    kind, width, index = job
    return _run_one(kind, width, 1, index, time_it=False)[2]


def precompile(widths, jobs: int) -> float:
    """Compile every (kind, width, tile shape) in ``jobs`` processes; returns the seconds it took."""
    start = time.time()
    work = [(kind, w, i) for w in widths for kind, tuners in _tuners().items()
            for i in range(max(len(_fitting(t, w // 4)) for t in tuners))]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        list(pool.map(_compile_job, work))
    return time.time() - start


def _gemm_parts(case: dict) -> dict[str, float]:
    """The backward's parts after the fused kernel, alone: cuBLAS dW_down = dpreᵀ x (also as (xᵀ dpre)ᵀ),
    dW_up = s gᵀ [h | e₁], dx = dpre W_down, torch's db_down = Σ dpre; and the whole weight-gradient pass
    (``wgrad_pass``: its kernel, autotuned, plus the sum of its partial rows; no dx)."""
    from medadapt.kernels.fused_adapter.reference import scaled_matmul
    from medadapt.kernels.fused_adapter.triton_launch import _weight_gradient_pass

    rows, hidden = case["x2"].shape[0], case["w_down"].shape[0]
    dpre = torch.randn(rows, hidden, device=DEVICE).bfloat16()
    h1 = torch.randn(rows, hidden + 8, device=DEVICE).bfloat16()
    h = h1[:, :hidden].contiguous()
    _weight_gradient_pass(case["x2"], case["g2"], h, dpre, case["w_down"], 0.5)  # autotune first
    return {"gemm_dw_down": _timed_ms(lambda: dpre.t() @ case["x2"]),
            "gemm_dw_down_transposed": _timed_ms(lambda: (case["x2"].t() @ dpre).t()),
            "gemm_dw_up_ones": _timed_ms(lambda: scaled_matmul(case["g2"].t(), h1, 0.5)),
            "gemm_dx": _timed_ms(lambda: dpre @ case["w_down"]),
            "sum_db_down": _timed_ms(lambda: dpre.sum(0, dtype=torch.float32)),
            "wgrad_pass": _timed_ms(lambda: _weight_gradient_pass(case["x2"], case["g2"], h, dpre, case["w_down"],
                                                                  0.5)),
            "wgrad_pass_two_launches": _two_launches_ms(lambda: _weight_gradient_pass(
                case["x2"], case["g2"], h, dpre, case["w_down"], 0.5)),
            "wgrad_pass_hidden_tiles": _two_launches_ms(lambda: _weight_gradient_pass(
                case["x2"], case["g2"], h, dpre, case["w_down"], 0.5), _hidden_tile(hidden))}


def _two_launches_ms(fn, hidden_tile: int | None = None) -> float:
    """``fn`` timed with the weight-gradient kernel as one launch per problem, its hidden rows whole or in
    tiles of ``hidden_tile`` (each autotuned first)."""
    from medadapt.kernels.fused_adapter import triton_launch

    saved = triton_launch.WGRAD_LAUNCHES, triton_launch.WGRAD_HIDDEN_TILE
    triton_launch.WGRAD_LAUNCHES, triton_launch.WGRAD_HIDDEN_TILE = 2, hidden_tile
    try:
        fn()
        return _timed_ms(fn)
    finally:
        triton_launch.WGRAD_LAUNCHES, triton_launch.WGRAD_HIDDEN_TILE = saved


def host_report(path: str, grid: int = 64, calls: int = 300) -> str:
    """Wall time per call of the whole public call (B = 1, ViT-B: the GPU work is short), and a profile."""
    from medadapt.kernels import fused_adapter, fused_adapter_reference

    case = _case(768, 1, grid)
    leaves = [t.requires_grad_() for t in (case["x2"], case["w_down"], case["b_down"], case["w_up"], case["b_up"])]
    res = case["res2"].requires_grad_()

    def fwd(fn):
        with torch.no_grad():
            fn(*leaves, scale=0.5, residual=res)

    def fwdbwd(fn):
        torch.autograd.grad(fn(*leaves, scale=0.5, residual=res), leaves + [res], case["g2"])

    lines = []
    for name, fn in (("eager", fused_adapter_reference), ("fused", fused_adapter)):
        for label, step in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
            for _ in range(20):
                step(fn)
            _sync()
            start = time.perf_counter()
            for _ in range(calls):
                step(fn)
            _sync()
            lines.append(f"{name:6} {label:8} {(time.perf_counter() - start) / calls * 1e6:8.1f} us per call (wall)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fwdbwd(fused_adapter)
    prof.disable()
    _sync()
    stream = io.StringIO()
    pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(25)
    with open(path, "w") as f:
        f.write("\n".join(lines) + f"\n\ncProfile, {calls} fused forward+backward calls, by own time:\n"
                + stream.getvalue())
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1: ViT-B, 4×4 tokens")
    args = parser.parse_args(argv)
    grid, calls = (4, 3) if args.smoke else (64, 300)
    if args.smoke:
        args.models, args.batches = ["vit_b"], [1]
    elif DEVICE.type != "cuda":
        sys.exit("tune_adapter.py needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    os.environ["MEDADAPT_KERNELS"] = "triton" if args.smoke else "auto"
    env = environment(DEVICE)
    widths = [MODELS[m] for m in args.models]
    if DEVICE.type == "cuda":
        print(f"precompiled in {precompile(widths, args.jobs):.0f} s", flush=True)
    rows = []
    for model in args.models:
        width = MODELS[model]
        for batch in args.batches:
            case = _case(width, batch, grid)
            reference = _reference(case)
            base = {**env, "model": model, "width": width, "hidden": width // 4, "batch": batch, "dtype": "bf16"}
            for kind, tuners in _tuners().items():
                for i, config in enumerate(_fitting(tuners[0], width // 4)):
                    ms, err, status = _run_one(kind, width, batch, i, time_it=True, case=case, reference=reference)
                    rows.append({**base, "kind": kind, "config": _config_name(config), "ms": ms,
                                 "max_rel_err": err, "status": status})
            rows += [{**base, "kind": part, "config": "triton" if part.startswith("wgrad") else "cublas", "ms": ms,
                      "status": "ok"}
                     for part, ms in _gemm_parts(case).items()]
            _print_best(rows, model, batch)
    write_csv(os.path.join(args.out, f"adapter_tuning_{_slug(env['device'])}.csv"), rows)
    print(host_report(os.path.join(args.out, f"adapter_host_{_slug(env['device'])}.txt"), grid, calls))
    return rows


def _config_name(config) -> str:
    k = config.kwargs
    tiles = f"C{k['BLOCK_C']}-v{k['WAVES']}" if "BLOCK_C" in k else f"K{k['BLOCK_K']}-N{k['BLOCK_N']}"
    return f"M{k['BLOCK_M']}-{tiles}-w{config.num_warps}-s{config.num_stages}"


def _print_best(rows: list[dict], model: str, batch: int) -> None:
    mine = [r for r in rows if r["model"] == model and r["batch"] == batch]
    for kind in dict.fromkeys(r["kind"] for r in mine):
        timed = sorted((r for r in mine if r["kind"] == kind and r["status"] == "ok"), key=lambda r: r["ms"])
        shown = ", ".join(f"{r['config']} {r['ms'] * 1e3:.1f}" for r in timed[:3])
        errs = [r["max_rel_err"] for r in timed if "max_rel_err" in r]
        checked = f"; worst rel. err {max(errs):.1e}" if errs else ""
        print(f"{model} b={batch} {kind:12} best (us): {shown}{checked}", flush=True)


if __name__ == "__main__":
    main()
