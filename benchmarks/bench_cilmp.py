"""CILMP class tokens: medadapt's batched intervention + projection vs a per-token, per-image loop like the public code.

The public CILMP code (``forward_llm`` / ``ConditionalLoreftIntervention``) calls the intervention once per
edited token position, loops over the images of the batch inside it, and then projects every token of
every (image, class) pair ``D → r → width``. ``public_style_loop`` keeps that loop structure with the same
weights; medadapt's :class:`ClassTokenIntervention` edits all positions and images at once and projects
the unchanged tokens once. Both give the same tokens ``(B, n_cls, L, width)`` (dropout off).

    python3 benchmarks/bench_cilmp.py --out benchmarks/results     # D 4096, r 8, c 512, 8 classes × 40 tokens, B 32
    python3 benchmarks/bench_cilmp.py --quick --out /tmp/cilmp      # small, for CPU smoke runs

Writes ``cilmp.csv`` (one row per implementation and pass) and ``cilmp.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, peak_memory_mb, pyplot, time_ms, write_csv  # noqa: E402

from medadapt.prompts import ClassTokenIntervention  # noqa: E402


def public_style_loop(module: ClassTokenIntervention, reps: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Same result as ``module(reps, f)`` for equal class lengths, computed with the public code's loops."""
    p, s, length = module.prefix_length, module.suffix_length, reps.shape[1]

    def intervene(unit, rep):  # rep (n_cls, D) → (B, n_cls, D), one image at a time
        r = unit.rotation.weight
        phi = unit.condition(f)
        shifted = unit.source(torch.cat([rep.expand(f.shape[0], -1, -1), phi[:, None] * rep[None]], dim=-1))
        rotated = rep @ r.T
        return torch.stack([rep + (shifted_b - rotated) @ r for shifted_b in shifted])

    pre = torch.stack([intervene(module.prefix, reps[:, i]) for i in range(p)], dim=2)
    suf = torch.stack([intervene(module.suffix, reps[:, length - s + i]) for i in range(s)], dim=2)
    middle = reps[None, :, p : length - s].expand(f.shape[0], -1, -1, -1)
    tokens = torch.cat([pre, middle, suf], dim=2)  # (B, n_cls, L, D)
    return module.projection(tokens.reshape(-1, tokens.shape[-1])).view(*tokens.shape[:3], -1)


def _case(fn, device):
    def forward():
        with torch.no_grad():
            fn()

    def forward_backward():
        fn().square().mean().backward()

    return time_ms(forward, device, 0.3), time_ms(forward_backward, device, 0.3), peak_memory_mb(forward_backward,
                                                                                                   device)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for cilmp.csv and cilmp.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=4096, help="LLM width D")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--cond-dim", type=int, default=512, help="image feature width c")
    parser.add_argument("--width", type=int, default=512, help="prompt width (CLIP text width)")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=40, help="L_c, the same for every class")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="small sizes (D 256, c 64, 4 classes × 16, B 8)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.cond_dim, args.width, args.classes, args.tokens, args.batch = 256, 64, 64, 4, 16, 8
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = ClassTokenIntervention(args.dim, args.rank, args.width, [args.tokens] * args.classes,
                                    cond_dim=args.cond_dim, dropout=0.0).to(device)
    reps = torch.randn(args.classes, args.tokens, args.dim, device=device)
    f = torch.nn.functional.normalize(torch.randn(args.batch, args.cond_dim, device=device), dim=-1)
    with torch.no_grad():
        err = (public_style_loop(module, reps, f) - module(reps, f)).abs().max().item()
    env = environment(device)
    cases = [("public_style_loop", lambda: public_style_loop(module, reps, f)),
             ("medadapt_batched", lambda: module(reps, f))]
    rows, base = [], {}
    for impl, fn in cases:
        fwd, fwd_bwd, peak = _case(fn, device)
        module.zero_grad(set_to_none=True)
        base = base or {"forward": fwd, "forward_backward": fwd_bwd}
        for pass_name, ms in (("forward", fwd), ("forward_backward", fwd_bwd)):
            rows.append({**env, "impl": impl, "pass": pass_name, "dim": args.dim, "rank": args.rank,
                         "cond_dim": args.cond_dim, "width": args.width, "classes": args.classes,
                         "tokens": args.tokens, "batch": args.batch, "ms": round(ms, 3),
                         "speedup_vs_loop": round(base[pass_name] / ms, 2),
                         "peak_mb_forward_backward": round(peak, 1), "max_abs_diff_vs_loop": f"{err:.2e}"})
            print(f"{impl:18s} {pass_name:16s} {ms:10.3f} ms   ×{base[pass_name] / ms:.1f}   peak {peak:.1f} MB")
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "cilmp.csv"), rows)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, pass_name in enumerate(("forward", "forward_backward")):
            values = [r["ms"] for r in rows if r["pass"] == pass_name]
            ax.bar([i + 0.4 * k for i in range(len(values))], values, width=0.4, label=pass_name)
        ax.set_xticks([0.2, 1.2], [impl for impl, _ in cases])
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"CILMP class tokens D={args.dim} B={args.batch} — {env['device'][:36]}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "cilmp.png"), dpi=120)
    return rows


if __name__ == "__main__":
    main()
