"""One training step of SAM: full fine-tuning vs medadapt Med-SA adapters vs PEFT LoRA (SAMed-style).

Same geometry, batch and box prompts for every case; the step is forward (image encoder → prompt
encoder → mask decoder, batched), a Dice + BCE loss, backward and an Adam step, through
``medadapt.train.PromptedSAM``. Cases:

* ``full_ft``: every SAM parameter trained;
* ``medadapt``: ``MedSAConfig(modules_to_save=["mask_decoder"])``: Med-SA space + MLP adapters in every
  encoder block, the mask decoder trained in full (the Med-SA recipe);
* ``peft_lora``: PEFT LoRA r = 4 on the encoder's ``qkv`` projections, mask decoder trained in full (SAMed);
* 3D (``--with-3d``): one volume of D = 8 slices (batch 1), Med-SA adapters on the slices as a batch
  (``3d_medadapt``) vs with SD-Trans (``3d_sdtrans``: ``MedSAConfig(space_depth=True)``, the encoder
  takes the volume); the 3D ratios are relative to ``3d_medadapt``.

Reported per case: trainable parameters; median step time (cases timed round-robin, so load drift on
a shared machine hits all alike); peak training memory = what is held between steps (every
parameter + the Adam state, counted exactly) + the peak of one step above it (gradients, activations,
temporaries): ``torch.cuda.max_memory_allocated`` on CUDA, the RSS high-water mark of a fresh
subprocess on CPU (see :func:`rss_probe`); and the ratios to full fine-tuning against the goals (≤ 15 % of the
parameters, ≤ 0.6× memory, ≤ 0.8× step time). Writes ``<out>/finetune_<device>.csv`` and ``.png`` and prints a
markdown table.

    python benchmarks/bench_finetune.py                 # ViT-B, 224 px on CPU / 1024 px on CUDA
    python benchmarks/bench_finetune.py --quick         # small geometry, seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, peak_memory_mb, pyplot, write_csv  # noqa: E402

import medadapt as ma  # noqa: E402
from medadapt.core.params import trainable_parameters  # noqa: E402
from medadapt.train import PromptedSAM, build_sam  # noqa: E402

GOALS = {"param_share": 0.15, "memory_ratio": 0.6, "time_ratio": 0.8}


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``BCE + (1 − soft Dice)`` per mask, averaged (plain torch, so MONAI is not needed here)."""
    prob = logits.sigmoid().flatten(-2)
    truth = target.float().flatten(-2)
    dice = (2 * (prob * truth).sum(-1) + 1e-5) / (prob.sum(-1) + truth.sum(-1) + 1e-5)
    return F.binary_cross_entropy_with_logits(logits, target.float()) + (1 - dice).mean()


def make_batch(batch: int, img_size: int, depth: int | None, device: torch.device) -> dict:
    """Random images with a centred box prompt and a disc as the target mask."""
    gen = torch.Generator().manual_seed(0)
    lead = (batch,) if depth is None else (batch, depth)
    shape = (batch, 3, img_size, img_size) if depth is None else (batch, 3, depth, img_size, img_size)
    yy, xx = torch.meshgrid(torch.arange(img_size), torch.arange(img_size), indexing="ij")
    disc = ((yy - img_size / 2) ** 2 + (xx - img_size / 2) ** 2) < (img_size / 4) ** 2
    box = torch.tensor([img_size / 4, img_size / 4, 3 * img_size / 4, 3 * img_size / 4])
    return {"image": torch.rand(shape, generator=gen).to(device),
            "boxes": box.expand(*lead, 1, 4).contiguous().to(device),
            "target": disc.expand(*lead, 1, -1, -1).contiguous().to(device)}


def prepare(case: str, arch: str, img_size: int, device: torch.device):
    """The model of one case (None with a reason when the case cannot run here)."""
    sam = build_sam(arch, img_size, seed=0)
    if case == "full_ft":
        for p in sam.parameters():
            p.requires_grad_(True)
    elif case in ("medadapt", "3d_medadapt"):
        ma.inject(sam, ma.MedSAConfig(modules_to_save=["mask_decoder"]))
    elif case == "3d_sdtrans":
        if importlib.util.find_spec("medadapt.adapters.space_depth") is None:
            return None, "medadapt.adapters.space_depth not available yet"
        ma.inject(sam, ma.MedSAConfig(space_depth=True, modules_to_save=["mask_decoder"]))
    elif case == "peft_lora":
        if importlib.util.find_spec("peft") is None:
            return None, "peft not installed"
        from peft import LoraConfig, inject_adapter_in_model

        for p in sam.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0,
                                           target_modules=r"image_encoder\.blocks\.\d+\.attn\.qkv"), sam)
        for name, p in sam.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith("mask_decoder."))
    else:
        raise ValueError(f"unknown case {case!r}")
    return PromptedSAM(sam).to(device), ""


def step_fn(model: PromptedSAM, batch: dict) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(batch)
        dice_bce(out["logits"], batch["target"]).backward()
        optimizer.step()

    return step, optimizer


def timed_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def state_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Bytes held between steps: every parameter (frozen ones too) plus the optimiser state, in MB."""
    params = {id(p): p for p in model.parameters()}
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    for state in optimizer.state.values():
        nbytes += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return nbytes / 1e6


def run_cases(cases: list[str], args, device: torch.device) -> list[dict]:
    """Build every case, warm each up, time the steps round-robin (so load drift on a shared machine hits
    every case alike), then measure each case's peak memory."""
    rows, active = [], []
    for case in cases:
        depth = args.depth if case.startswith("3d_") else None
        batch = 1 if depth else args.batch  # 3D: one volume of D slices
        row = {"case": case, "arch": args.arch, "img_size": args.img_size, "batch": batch, "slices": depth or 1,
               **environment(device)}
        rows.append(row)
        print(f"... building {case}", flush=True)
        model, reason = prepare(case, args.arch, args.img_size, device)
        if model is None:
            row["note"] = f"skipped: {reason}"
            continue
        trainable, total = trainable_parameters(model.sam)
        step, optimizer = step_fn(model, make_batch(batch, args.img_size, depth, device))
        for _ in range(args.warmup):
            step()  # also creates the Adam state
        row.update(trainable_params=trainable, total_params=total, trainable_pct=round(100 * trainable / total, 3))
        active.append((row, model, step, optimizer, []))
    for r in range(args.repeats):
        print(f"... timing round {r + 1}/{args.repeats}", flush=True)
        for _, _, step, _, times in active:
            times.append(timed_ms(step, device))
    for row, model, step, optimizer, times in active:
        row["step_ms"] = round(statistics.median(times), 1)
        held = state_mb(model, optimizer)
        if device.type == "cuda":
            row.update(mem_method="cuda max_memory_allocated", peak_step_mb=round(peak_memory_mb(step, device), 1))
        else:
            row.update(mem_method="cpu peak RSS (subprocess)", peak_step_mb=round(rss_probe(row["case"], args), 1))
        row.update(state_mb=round(held, 1), peak_mem_mb=round(held + row["peak_step_mb"], 1), note="")
    return rows


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss_probe(case: str, args) -> float:
    """CPU: peak RSS of one training step above the RSS held between steps, in MB.

    A fresh subprocess per case builds the model, takes a warm-up step (Adam state, lazily loaded
    kernels), frees the gradients, resets the RSS high-water mark (``/proc/self/clear_refs``), takes one
    step and reads ``VmHWM``. ``MALLOC_MMAP_THRESHOLD_`` is fixed so freed tensors go back to the OS
    (glibc would otherwise keep them and hide later reuse from RSS).
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-probe", case, "--arch", args.arch,
           "--img-size", str(args.img_size), "--batch", str(args.batch), "--depth", str(args.depth), "--device", "cpu"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def _probe_main(case: str, args) -> None:
    depth = args.depth if case.startswith("3d_") else None
    model, _ = prepare(case, args.arch, args.img_size, torch.device("cpu"))
    step, optimizer = step_fn(model, make_batch(1 if depth else args.batch, args.img_size, depth, torch.device("cpu")))
    step()
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    held = _proc_status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    print(f"{_proc_status_mb('VmHWM') - held:.1f}")


def add_ratios(rows: list[dict]) -> None:
    base = {r["slices"]: r for r in rows if r["case"] == "full_ft" and "step_ms" in r}
    base_3d = next((r for r in rows if r["case"] == "3d_medadapt" and "step_ms" in r), None)
    for row in rows:
        if "step_ms" not in row:
            continue
        ref = base.get(row["slices"])
        if row["case"].startswith("3d_"):
            ref = base_3d  # the 3D rows compare SD-Trans with the slices-as-batch adapters
        row["param_share"] = round(row["trainable_params"] / row["total_params"], 4)
        if ref is not None and ref is not row:
            row["memory_ratio"] = round(row["peak_mem_mb"] / max(ref["peak_mem_mb"], 1e-9), 3)
            row["time_ratio"] = round(row["step_ms"] / ref["step_ms"], 3)
        if row["case"] in ("medadapt", "peft_lora"):
            row["meets_goals"] = all(row.get(k, float("inf")) <= v for k, v in GOALS.items())


def markdown(rows: list[dict]) -> str:
    lines = ["| case | slices | trainable params | share | step (ms) | peak mem (MB) | mem / ref | time / ref "
             "| goals |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "step_ms" not in r:
            lines.append(f"| {r['case']} | {r['slices']} | — | — | — | — | — | — | {r['note']} |")
            continue
        goals = {True: "met", False: "missed"}.get(r.get("meets_goals"), "")
        lines.append(f"| {r['case']} | {r['slices']} | {r['trainable_params']:,} | {100 * r['param_share']:.2f}% | "
                     f"{r['step_ms']:.0f} | {r['peak_mem_mb']:.0f} | {r.get('memory_ratio', '—')} | "
                     f"{r.get('time_ratio', '—')} | {goals} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    done = [r for r in rows if "step_ms" in r]
    if plt is None or not done:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    names = [r["case"] for r in done]
    for ax, key, title in zip(axes, ("trainable_pct", "step_ms", "peak_mem_mb"),
                              ("trainable parameters (%)", "step time (ms)", "peak memory (MB)")):
        ax.bar(names, [r[key] for r in done], color="#4363d8")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    volumes = [r for r in done if r["slices"] > 1]
    extra = f"; 3D rows: one volume of {volumes[0]['slices']} slices" if volumes else ""
    fig.suptitle(f"SAM {done[0]['arch']} @ {done[0]['img_size']} px, batch {done[0]['batch']}{extra}: "
                 f"{done[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default=None, help="SAM geometry (default vit_b; small with --quick)")
    parser.add_argument("--img-size", type=int, default=None, help="default 1024 on CUDA, 224 on CPU, 128 quick")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--depth", type=int, default=8, help="slices of the 3D case")
    parser.add_argument("--with-3d", action="store_true", help="add the 3D step (D slices, with/without SD-Trans)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small geometry and few repeats (CPU smoke run)")
    parser.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_probe:
        _probe_main(args.rss_probe, args)
        return 0
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.arch = args.arch or ("small" if args.quick else "vit_b")
    args.img_size = args.img_size or (128 if args.quick else (1024 if cuda else 224))
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (10 if cuda else (2 if args.quick else 3))
    cases = ["full_ft", "medadapt", "peft_lora"] + (["3d_medadapt", "3d_sdtrans"] if args.with_3d else [])
    rows = run_cases(cases, args, device)
    add_ratios(rows)
    name = f"finetune_{device.type}"
    write_csv(os.path.join(args.out, name + ".csv"), rows)
    plot(rows, os.path.join(args.out, name + ".png"))
    print(f"SAM {args.arch} @ {args.img_size} px, batch {args.batch}, one Adam step, {rows[0]['device']}, "
          f"torch {torch.__version__}")
    print(markdown(rows))
    print(f"ref: full_ft for 2D rows, 3d_medadapt for 3D rows. Goals for adapters: share <= "
          f"{GOALS['param_share']:.0%}, memory <= {GOALS['memory_ratio']}x, time <= {GOALS['time_ratio']}x full "
          f"fine-tuning; CSV: {os.path.join(args.out, name + '.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
