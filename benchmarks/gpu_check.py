"""Correctness of the Triton kernels on a CUDA device against the float64 references.

Run on a GPU machine: ``python3 benchmarks/gpu_check.py --out DIR``. Prints one line per case with the
relative error ``‖out − ref‖ / ‖ref‖`` of the output and of every gradient, and writes them as CSV.
Fresh random inputs per case, output poisoned before each run (NaN would fail the check).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["MEDADAPT_KERNELS"] = "triton"

from medadapt.kernels import (  # noqa: E402
    fused_adapter,
    fused_adapter_reference,
    selective_scan,
    selective_scan_reference,
)

TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return float("nan") if (a is None) != (b is None) else 0.0
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def grads(fn, inputs: dict[str, torch.Tensor], cotangent: torch.Tensor | None = None):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    out = fn(**{k: leaves.get(k, v) for k, v in inputs.items()})
    out = out[0] if isinstance(out, tuple) else out
    g = torch.randn_like(out) if cotangent is None else cotangent
    out.backward(g)
    return out.detach(), {k: v.grad for k, v in leaves.items()}, g


def check(name, fast, ref, inputs, dtype, rows):
    torch.manual_seed(0)
    out, g_fast, cot = grads(fast, inputs)
    ref_inputs = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    out_ref, g_ref, _ = grads(ref, ref_inputs, cot.double())
    errs = {"out": rel(out, out_ref), **{f"d{k}": rel(g_fast[k], g_ref[k]) for k in g_fast}}
    tol = TOL[dtype]
    ok = all(e <= tol for e in errs.values()) and bool(torch.isfinite(out).all())
    rows.append({"case": name, "dtype": str(dtype).replace("torch.", ""), "ok": ok, "tol": tol,
                 **{k: f"{v:.2e}" for k, v in errs.items()}})
    print(("PASS " if ok else "FAIL ") + name, str(dtype), " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    return ok


def scan_cases(dtype, rows):
    ok = True
    dev = "cuda"
    for (b, d, length, n, groups, var) in [(2, 64, 257, 16, 1, True), (1, 768, 2048, 16, 1, True),
                                           (2, 96, 129, 8, 2, True), (2, 48, 300, 16, 0, False)]:
        u = torch.randn(b, d, length, device=dev, dtype=dtype)
        delta = (torch.rand(b, d, length, device=dev) * 0.1).to(dtype)
        A = -torch.rand(d, n, device=dev) * 2 - 0.1
        if not var:
            Bm, Cm = torch.randn(d, n, device=dev), torch.randn(d, n, device=dev)
        elif groups == 1:
            Bm = torch.randn(b, n, length, device=dev, dtype=dtype)
            Cm = torch.randn(b, n, length, device=dev, dtype=dtype)
        else:
            Bm = torch.randn(b, groups, n, length, device=dev, dtype=dtype)
            Cm = torch.randn(b, groups, n, length, device=dev, dtype=dtype)
        inputs = dict(u=u, delta=delta, A=A, B=Bm, C=Cm, D=torch.randn(d, device=dev),
                      z=torch.randn(b, d, length, device=dev, dtype=dtype), delta_bias=torch.randn(d, device=dev) * 0.1)
        fast = lambda **kw: selective_scan(**kw, delta_softplus=True)  # noqa: E731
        ref = lambda **kw: selective_scan_reference(**kw, delta_softplus=True)  # noqa: E731
        ok &= check(f"scan B{b} D{d} L{length} N{n} G{groups} var{var}", fast, ref, inputs, dtype, rows)
    return ok


def adapter_cases(dtype, rows):
    ok = True
    for shape, c, h, act in [((2, 64, 64), 768, 192, "gelu"), ((4096,), 1280, 320, "gelu_tanh"),
                             ((3, 7, 5), 40, 12, "relu"), ((1, 4096), 1024, 256, "gelu")]:
        x = torch.randn(*shape, c, device="cuda", dtype=dtype)
        inputs = dict(x=x, w_down=torch.randn(h, c, device="cuda", dtype=dtype) * c ** -0.5,
                      b_down=torch.randn(h, device="cuda", dtype=dtype) * 0.1,
                      w_up=torch.randn(c, h, device="cuda", dtype=dtype) * h ** -0.5,
                      b_up=torch.randn(c, device="cuda", dtype=dtype) * 0.1,
                      residual=torch.randn(*shape, c, device="cuda", dtype=dtype))
        fast = lambda act=act, **kw: fused_adapter(**kw, scale=0.5, activation=act)  # noqa: E731
        ref = lambda act=act, **kw: fused_adapter_reference(**kw, scale=0.5, activation=act)  # noqa: E731
        ok &= check(f"adapter {shape}x{c} h{h} {act}", fast, ref, inputs, dtype, rows)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    rows: list[dict] = []
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        ok &= scan_cases(dtype, rows)
        ok &= adapter_cases(dtype, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("case", "dtype", "ok", "tol"), k))
    with open(args.out / f"gpu_check_{torch.cuda.get_device_name().replace(' ', '_')}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", "torch", *keys])
        writer.writeheader()
        for r in rows:
            writer.writerow({"device": torch.cuda.get_device_name(), "torch": torch.__version__, **r})
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
