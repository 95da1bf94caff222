"""MambaMIM pretraining of ``HybridMambaEncoder`` on NIfTI volumes, then an optional fine-tuning check.

    python examples/pretrain_mambamim.py --out runs/mambamim --finetune      # bundled MNI152, small preset
    python examples/pretrain_mambamim.py --preset paper --crop 96 --data DIR  # paper sizes, your volumes

Pretraining: random ``crop³`` crops (bundled MNI152 T1 by default, or every NIfTI in ``--data``), a random
mask per sample, AdamW with linear warm-up then cosine decay of the learning rate, weight decay rising
0.04 → 0.2 on a cosine, gradient clipping (the paper's recipe; the small preset uses a larger learning
rate for a short CPU run). The warm-up lasts ``int(warmup · steps)`` steps, where ``warmup`` is
``--warmup`` if given, else the preset's share: 0.4 for ``paper`` (the paper's 40 of 100 epochs), 0.1 for
``small``. Writes ``checkpoint.pt`` every ``--save-every`` steps and at the end (model,
optimizer, step, RNG state: ``--resume`` continues exactly where it stopped when given the same
arguments), ``encoder.safetensors`` (loads into a plain ``HybridMambaEncoder``), ``reconstruction.png``
and ``summary.json``. ``--finetune`` then trains a segmentation head on MNI152 tissue labels from the
pretrained and from a random encoder with the same budget and prints both held-out Dice scores.
Pretraining is label-free but sees the whole volume, including the half whose labels are held out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from .._atomic import atomic_output, atomic_write_text
from .._optional import require
from ._data import CropSampler, load_folder_volumes, load_tissue_volume
from .config import MambaMIMConfig
from .finetune import compare_finetuning
from .mambamim import MambaMIM

__all__ = ["PRESETS", "build_parser", "build_encoder", "main"]

PRESETS = {
    "small": dict(channels=(8, 16, 32, 64, 128), depths=(1, 1, 1, 1, 1), expansions=(2, 2, 2, 2, 2),
                  mamba_depth=2, crop=48, lr=1e-3, warmup=0.1),
    "paper": dict(channels=(32, 64, 128, 192, 384), depths=(1, 2, 2, 2, 1), expansions=(2, 2, 4, 4, 4),
                  mamba_depth=4, crop=96, lr=1e-4, warmup=0.4),
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--data", help="folder of .nii/.nii.gz volumes (default: the bundled MNI152 T1)")
    p.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"), help="intensity window, e.g. -175 250")
    p.add_argument("--out", default="runs/mambamim", help="output folder (default runs/mambamim)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="encoder and recipe sizes: small (CPU demo, default) or paper")
    p.add_argument("--channels", type=_ints, help="CNN widths, e.g. 32,64,128,192,384")
    p.add_argument("--depths", type=_ints, help="blocks per stage (default: preset, or 1 each)")
    p.add_argument("--expansions", type=_ints, help="MedNeXt expansion per stage (default: preset, or 2)")
    p.add_argument("--mamba-depth", type=int)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--crop", type=int, help="crop size (a multiple of the patch size)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=300, help="total pretraining steps (schedule length)")
    p.add_argument("--stop-after", type=int, help="stop (and checkpoint) after this step, as if interrupted")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=float, help="warm-up share of --steps (default: preset; paper 0.4, small 0.1)")
    p.add_argument("--weight-decay", type=float, nargs=2, default=(0.04, 0.2), metavar=("START", "END"))
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--toki-exponent", choices=("causal", "official"), default="causal")
    p.add_argument("--decoder-width", type=int)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", help="checkpoint.pt (or the folder holding it) to continue from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-png", action="store_true", help="skip reconstruction.png")
    p.add_argument("--finetune", action="store_true", help="then compare pretrained vs random encoder Dice")
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    return p


def _settings(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    channels = args.channels or preset["channels"]
    same = len(channels) == len(preset["channels"])
    settings = dict(
        channels=tuple(channels),
        depths=args.depths or (preset["depths"] if same else (1,) * len(channels)),
        expansions=args.expansions or (preset["expansions"] if same else (2,) * len(channels)),
        mamba_depth=preset["mamba_depth"] if args.mamba_depth is None else args.mamba_depth,
        d_state=args.d_state,
    )
    if len(settings["depths"]) != len(channels) or len(settings["expansions"]) != len(channels):
        raise ValueError("--depths and --expansions must have one entry per --channels entry")
    return settings


def _warmup_steps(args: argparse.Namespace) -> int:
    """Warm-up length in steps: ``int(share · steps)``, ``share = --warmup`` if given, else the preset's."""
    share = PRESETS[args.preset]["warmup"] if args.warmup is None else args.warmup
    return int(share * args.steps)


def build_encoder(settings: dict, seed: int):
    """``HybridMambaEncoder(**settings)`` initialised from ``seed`` (the "random encoder" of the comparison)."""
    from medadapt.models import HybridMambaEncoder

    torch.manual_seed(seed)
    return HybridMambaEncoder(**settings)


def _schedules(step: int, total: int, warmup: int, lr: float, wd: tuple[float, float]) -> tuple[float, float]:
    """Learning rate (linear warm-up, cosine to 1% of ``lr``) and weight decay (cosine rise) at ``step``."""
    if step < warmup:
        rate = lr * (step + 1) / warmup
    else:
        t = (step - warmup) / max(1, total - warmup)
        rate = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))
    t = step / max(1, total - 1)
    return rate, wd[0] + (wd[1] - wd[0]) * 0.5 * (1 - math.cos(math.pi * t))


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            skip = param.ndim <= 1 or getattr(param, "_no_weight_decay", False)
            (no_decay if skip else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "decay": True}, {"params": no_decay, "weight_decay": 0.0,
                                                                  "decay": False}], betas=(0.9, 0.95))


def _save(path: Path, state: dict) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    try:
        import resource
    except ImportError:  # not on Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux: process peak RSS


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Run pretraining (and ``--finetune``) from command-line arguments; returns the summary dict."""
    args = build_parser(prog).parse_args(argv)
    tqdm = require("tqdm", "the pretraining progress bar").tqdm
    settings = _settings(args)
    crop = args.crop or PRESETS[args.preset]["crop"]
    lr = args.lr if args.lr is not None else PRESETS[args.preset]["lr"]
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    encoder = build_encoder(settings, args.seed)
    if crop % encoder.patch_size:
        raise ValueError(f"--crop must be a multiple of the patch size {encoder.patch_size}, got {crop}")
    config = MambaMIMConfig(mask_ratio=args.mask_ratio, toki_exponent=args.toki_exponent,
                            decoder_width=args.decoder_width)
    mim = MambaMIM(encoder, config).to(device)
    optimizer = _optimizer(mim)
    generator = torch.Generator().manual_seed(args.seed)
    volumes = load_folder_volumes(args.data, args.window) if args.data else [load_tissue_volume()[0]]
    sampler = CropSampler(volumes, crop)
    start, losses = 0, []
    if args.resume:
        path = Path(args.resume)
        state = torch.load(path / "checkpoint.pt" if path.is_dir() else path, map_location=device,
                           weights_only=True)
        mim.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start, losses = state["step"], state["losses"]

    stop = min(args.steps, args.stop_after or args.steps)
    warmup = _warmup_steps(args)

    def checkpoint(step: int) -> None:
        _save(out / "checkpoint.pt", {"step": step, "model": mim.state_dict(), "optimizer": optimizer.state_dict(),
                                      "generator": generator.get_state(), "losses": losses,
                                      "settings": settings, "config": config.to_dict(),
                                      "args": {k: v for k, v in vars(args).items()}})

    mim.train()
    step_times = []
    bar = tqdm(range(start, stop), initial=start, total=stop, desc="MambaMIM pretrain")
    for step in bar:
        began = time.perf_counter()
        rate, wd = _schedules(step, args.steps, warmup, lr, tuple(args.weight_decay))
        for group in optimizer.param_groups:
            group["lr"] = rate
            if group["decay"]:
                group["weight_decay"] = wd
        images, _ = sampler.sample(args.batch_size, generator)
        loss = mim(images.to(device), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mim.parameters(), args.clip)
        optimizer.step()
        losses.append(loss.item())
        step_times.append(time.perf_counter() - began)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{rate:.2e}")
        if (step + 1) % args.save_every == 0 and step + 1 < stop:
            checkpoint(step + 1)
    checkpoint(stop)

    summary = {"steps_done": stop, "final_loss": losses[-1] if losses else None,
               "first_loss": losses[0] if losses else None, "crop": crop, "batch_size": args.batch_size,
               "encoder_parameters": sum(p.numel() for p in encoder.parameters()),
               "mean_step_s": sum(step_times[1:]) / max(1, len(step_times) - 1) if step_times else None,
               "peak_memory_mb": _peak_memory_mb(device), "device": str(device)}
    if not args.no_png:
        from .visualize import save_reconstruction_png

        fixed = torch.Generator().manual_seed(args.seed + 99)
        images, _ = sampler.sample(1, fixed)
        shown = mim.reconstruct(images.to(device), generator=fixed)
        summary["png"] = save_reconstruction_png(out / "reconstruction.png", shown, images,
                                                 f"step {stop}, masked-patch loss {float(shown['loss']):.3f}")
    safetensors = require("safetensors.torch", "saving the encoder")
    with atomic_output(out / "encoder.safetensors") as tmp:
        safetensors.save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp))
    if args.finetune:
        image, label, class_names = load_tissue_volume()
        pretrained = {k: v.detach().clone().cpu() for k, v in encoder.state_dict().items()}

        def from_pretrained():
            fresh = build_encoder(settings, args.seed)
            fresh.load_state_dict(pretrained)
            return fresh

        summary["finetune_dice"] = compare_finetuning(
            {"random": lambda: build_encoder(settings, args.seed), "pretrained": from_pretrained},
            image, label, class_names, args.finetune_steps, crop, args.batch_size, args.finetune_lr,
            seed=args.seed, progress=tqdm, device=device)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "finetune_dice"}, indent=2))
    return summary
