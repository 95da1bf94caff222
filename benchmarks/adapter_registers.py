"""Registers, spills and shared memory of the fused-adapter kernels' tile shapes on sm_90, without a GPU.

Compiles each candidate ``(BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages)`` (for the weight-gradient
kernel ``(BLOCK_M, BLOCK_C, WAVES, num_warps, num_stages)``) for Hopper with Triton's own
``ptxas`` and prints what it reports; shapes that spill registers are left out of the autotuning lists in
``triton_launch.py``. Needs Triton with its CUDA backend (no GPU, no ``TRITON_INTERPRET``).

    python benchmarks/adapter_registers.py --kernel bwd --hidden 192 320 --jobs 2
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

__all__ = ["compile_kernel", "compile_report"]

_FLAGS = {
    "fwd": dict(HAS_BU=True, HAS_RES=True),
    "bwd": dict(STORE_H=True, ONES_COLUMN=False, STORE_DPRE=True, GATE_FP16=True, MERGED_LOOP=True),
    "bwd_two_loops": dict(STORE_H=True, ONES_COLUMN=True, STORE_DPRE=True, GATE_FP16=True, MERGED_LOOP=False),
    "wgrad": dict(),
    "wgrad_down": dict(PROBLEM=1),  # one problem per launch (triton_launch.WGRAD_LAUNCHES = 2)
    "wgrad_up": dict(PROBLEM=2),
}
_WGRAD_SHAPES = [(64, 64, 1, 8, 2), (64, 64, 1, 8, 3), (32, 64, 1, 8, 3), (32, 64, 2, 4, 3), (64, 32, 2, 4, 3),
                 (64, 32, 1, 8, 3), (32, 32, 2, 4, 2), (128, 64, 1, 8, 2), (128, 32, 1, 8, 2)]


_UNIT_STRIDES = ("stride_xc", "stride_wdc", "stride_wuh", "stride_rn", "stride_on", "stride_gn")


def compile_kernel(kernel: str, hidden: int, shape: tuple[int, int, int, int, int]):
    """Compile one tile shape for sm_90 in bf16, specialized as a launch on contiguous SAM-sized tensors
    would be (unit strides are constants; pointers and the other integers divisible by 16)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from medadapt.kernels.fused_adapter import triton_kernels as tk
    from medadapt.kernels.fused_adapter.triton_weight_grads import adapter_wgrad_kernel

    wgrad = kernel.startswith("wgrad")
    fn = adapter_wgrad_kernel if wgrad else tk.adapter_fwd_kernel if kernel == "fwd" else tk.adapter_bwd_kernel
    bm, bk, bn, warps, stages = shape
    ha, hb = tk.hidden_split(hidden)
    tiles = dict(BLOCK_M=bm, BLOCK_C=bk, WAVES=bn) if wgrad else dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn)
    consts = dict(HA=ha, HB=hb, PRECISION="tf32", UPCAST=False, **tiles, **_FLAGS[kernel])
    if not wgrad:
        consts.update(ACT=0, HAS_BD=True)
    consts.update({name: 1 for name in _UNIT_STRIDES if name in fn.arg_names})
    sig = {name: ("constexpr" if name in consts else "*fp32" if name.endswith("part_ptr")
                  else "*bf16" if name.endswith("_ptr") else "fp32" if name == "scale" else "i32")
           for name in fn.arg_names}
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in sig.items() if kind not in ("constexpr", "fp32") and name not in ("M", "M_BUCKET")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def compile_report(kernel: str, hidden: int, shape: tuple[int, int, int, int, int]) -> dict:
    """Compile one tile shape (``compile_kernel``) and return its registers, stack bytes and shared memory."""
    import triton

    try:
        compiled = compile_kernel(kernel, hidden, shape)
    except Exception as err:  # ptxas out of registers and the like: reported as a row, not a traceback
        last = [line for line in str(err).splitlines() if "fatal" in line or "Error" in line][:1]
        return {"kernel": kernel, "hidden": hidden, "shape": shape, "regs": -1, "stack_bytes": -1, "shared": -1,
                "error": (last or [type(err).__name__])[0][:100]}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    spill = re.search(r"STACK:(\d+)", out)
    return {"kernel": kernel, "hidden": hidden, "shape": shape, "regs": int(regs.group(1)) if regs else -1,
            "stack_bytes": int(spill.group(1)) if spill else -1, "shared": compiled.metadata.shared}


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=sorted(_FLAGS), default="bwd")
    parser.add_argument("--hidden", nargs="+", type=int, default=[192, 256, 320])
    parser.add_argument("--shapes", nargs="+", default=None, help="M,K,N,warps,stages ...")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    args = parser.parse_args()
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else
              _WGRAD_SHAPES if args.kernel.startswith("wgrad") else
              [(m, k, n, w, s) for m, k, n, w, s in itertools.product((32, 64, 128), (32, 64), (64, 128), (4, 8, 16),
                                                                      (2, 3, 4))
               if w * 32 * 2 <= m * max(n, k) and not (m == 128 and w == 4) and not (m == 32 and w == 16)])
    jobs = [(args.kernel, h, s) for h in args.hidden for s in shapes]
    with ProcessPoolExecutor(args.jobs) as pool:
        for r in pool.map(compile_report, *zip(*jobs)):
            flag = r.get("error") or ("SPILLS" if r["stack_bytes"] > 0 else "")
            print(f"{r['kernel']:6} H={r['hidden']:4} {str(r['shape']):22} regs {r['regs']:4} "
                  f"stack {r['stack_bytes']:6} smem {r['shared']:7} {flag}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    _main()
