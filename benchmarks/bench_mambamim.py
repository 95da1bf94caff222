"""One MambaMIM pretraining step (masked forward, loss, backward, AdamW) of the paper-size hybrid encoder.

``MambaMIM(HybridMambaEncoder(), MambaMIMConfig(mask_ratio=0.75))`` at 96³ crops (the paper's), the
pretraining job's AdamW groups; time per step (median of ``--repeats`` after ``--warmup`` steps) and the
process's peak resident memory. Each batch size runs in a fresh process, since peak RSS only grows.

    python3 benchmarks/bench_mambamim.py --out benchmarks/results            # batch 1 and 2, 96³, CPU
    python3 benchmarks/bench_mambamim.py --size 32 --batch 1 --repeats 1 --out /tmp/mim   # smoke run

Writes ``mambamim_step_<cpu|cuda>.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_csv  # noqa: E402


def _one_case(size: int, batch: int, warmup: int, repeats: int, device: str) -> dict:
    from medadapt import HybridMambaEncoder, MambaMIM, MambaMIMConfig
    from medadapt.mim.pretrain import _optimizer

    torch.manual_seed(0)
    mim = MambaMIM(HybridMambaEncoder(), MambaMIMConfig(mask_ratio=0.75)).to(device)
    optimizer = _optimizer(mim)
    images = torch.randn(batch, 1, size, size, size, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    times = []
    for step in range(warmup + repeats):
        started = time.perf_counter()
        loss = mim(images, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    params = sum(p.numel() for p in mim.encoder.parameters())
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    return {**environment(device), "size": size, "batch": batch, "encoder_params": params,
            "step_s": round(statistics.median(times), 3), "peak_mb": round(peak, 1),
            "peak_kind": "cuda max allocated" if device == "cuda" else "process peak RSS", "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="crop edge (default 96, the paper's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)  # one batch size, in a child
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(_one_case(args.size, args.batch[0], args.warmup, args.repeats, args.device)))
        return
    rows = []
    for batch in args.batch:
        command = [sys.executable, __file__, "--case", "--size", str(args.size), "--batch", str(batch), "--warmup",
                   str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads), "--device",
                   args.device]
        row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{args.size}³ batch {batch}: {row['step_s']} s per step, peak {row['peak_mb']} MB ({row['peak_kind']})",
              flush=True)
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    kind = "cuda" if args.device == "cuda" else "cpu"
    write_csv(os.path.join(args.out, f"mambamim_step_{kind}.csv"), rows)


if __name__ == "__main__":
    main()
