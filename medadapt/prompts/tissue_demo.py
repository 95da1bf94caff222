"""Segmentation by class description, no clicks: CILMP prompts on a small SAM, MNI152 brain tissue.

Grey matter, white matter and CSF are described in words, encoded by the bundled MiniLM (token states
of its last layer), and turned by the CILMP prompt head into one SAM prompt token per class,
conditioned on the image. A small random-weight SAM (no checkpoint is available offline: its image
encoder and mask decoder are trained together with the head) learns on axial slices of the MNI152 T1
template; Dice per class (MONAI ``DiceMetric``) is measured on two held-out blocks of slices. The same
run with fixed random class vectors (same token counts and scale) in place of the language model's is
the ablation; whichever wins is reported as is.

Labels: the nilearn wheel has grey- and white-matter probability maps but no CSF map, so CSF is taken
as ``clip(brain_mask − p_gm − p_wm, 0, 1)`` and each brain voxel gets the argmax of (GM, WM, CSF).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._atomic import atomic_write_text
from .._optional import require
from ..core import inject
from .config import CILMPConfig
from .representations import encode_descriptions
from .sam_head import class_mask_logits

__all__ = ["DESCRIPTIONS", "build_small_sam", "load_tissue_slices", "main", "run"]

DESCRIPTIONS = {
    "grey_matter": "Grey matter of the brain: the cerebral cortex, a thin folded ribbon of neuronal cell bodies "
                   "along the gyri, and the deep nuclei; on T1-weighted MRI it is darker than white matter "
                   "and brighter than cerebrospinal fluid.",
    "white_matter": "White matter of the brain: bundles of myelinated axons deep to the cortex, such as the "
                    "corpus callosum and the centrum semiovale; on T1-weighted MRI it is the brightest tissue.",
    "csf": "Cerebrospinal fluid: the clear fluid that fills the lateral, third and fourth ventricles and the "
           "sulci around the brain; on T1-weighted MRI it is dark, nearly black.",
}
HELD_OUT = ((20, 26), (40, 46))  # axial slice blocks (2 mm) kept out of training, with a 2-slice margin
BRAIN_SLICES = (8, 72)


def load_tissue_slices() -> tuple[torch.Tensor, torch.Tensor]:
    """Axial slices of the 2 mm MNI152 T1 template ``(Z, 1, X, Y)`` in [0, 1] and labels ``(Z, X, Y)``.

    Labels: 0 background, 1 grey matter, 2 white matter, 3 CSF (see the module docstring).
    """
    datasets = require("nilearn.datasets", "the CILMP tissue demo")
    from ..data import load_mni152_tissue

    brain = datasets.load_mni152_brain_mask(resolution=2).get_fdata()
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata()
    volume = load_mni152_tissue(resolution=2, csf_map=np.clip(brain - gm - wm, 0.0, 1.0))
    image = torch.from_numpy(volume.image).permute(2, 0, 1).unsqueeze(1).float()
    label = torch.from_numpy(volume.label).permute(2, 0, 1).long()
    return image, label


def build_small_sam(img_size: int = 128, patch_size: int = 8, embed_dim: int = 64, depth: int = 2,
                    prompt_dim: int = 64, seed: int = 0):
    """A random-weight ``segment_anything`` SAM at a CPU size (windowed + global encoder blocks)."""
    modeling = require("segment_anything.modeling", "the CILMP tissue demo")
    torch.manual_seed(seed)
    grid = img_size // patch_size
    encoder = modeling.ImageEncoderViT(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                       num_heads=4, out_chans=prompt_dim, window_size=grid // 2,
                                       global_attn_indexes=tuple(range(1, depth, 2)), use_rel_pos=True, qkv_bias=True)
    prompt = modeling.PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                    input_image_size=(img_size, img_size), mask_in_chans=8)
    transformer = modeling.TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=4 * prompt_dim, num_heads=4)
    decoder = modeling.MaskDecoder(transformer_dim=prompt_dim, transformer=transformer, num_multimask_outputs=3,
                                   iou_head_depth=2, iou_head_hidden_dim=prompt_dim)
    return modeling.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)


def _split(num_slices: int) -> tuple[list[int], list[int]]:
    test = [z for lo, hi in HELD_OUT for z in range(lo, hi)]
    margin = {z for lo, hi in HELD_OUT for z in range(lo - 2, hi + 2)}
    train = [z for z in range(*BRAIN_SLICES) if z not in margin and z < num_slices]
    return train, test


def _logits(sam, images: torch.Tensor) -> torch.Tensor:
    """(B, 1, X, Y) intensities → (B, n_cls, X, Y) class logits at full resolution."""
    size = tuple(images.shape[-2:])
    low = class_mask_logits(sam, images.expand(-1, 3, -1, -1) * 255.0)
    return sam.postprocess_masks(low, size, size)


def _predict(logits: torch.Tensor) -> torch.Tensor:
    """Exclusive labels: the best class where its logit is positive, else background (0)."""
    best = logits.argmax(1) + 1
    return torch.where(logits.amax(1) > 0, best, torch.zeros_like(best))


def run(representations: dict[str, torch.Tensor], image: torch.Tensor, label: torch.Tensor, steps: int = 500,
        batch_size: int = 8, lr: float = 2e-3, seed: int = 0, workdir: str | Path = ".", log_every: int = 50,
        sam_kwargs: dict | None = None) -> dict[str, float]:
    """Train head + SAM on the training slices; held-out Dice per class (and its mean)."""
    monai_losses, monai_metrics = require("monai.losses", "the CILMP tissue demo"), require("monai.metrics")
    names = list(representations)
    cfg = CILMPConfig.from_representations(representations, Path(workdir) / "class_representations.safetensors",
                                           descriptions={n: DESCRIPTIONS.get(n, n) for n in names})
    sam = build_small_sam(seed=seed, **(sam_kwargs or {}))
    inject(sam, cfg)  # prompt head trainable, SAM frozen ...
    sam.image_encoder.requires_grad_(True)  # ... but a random-weight SAM must learn too (nothing saved here)
    sam.mask_decoder.base_layer.requires_grad_(True)
    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = monai_losses.DiceCELoss(sigmoid=True, squared_pred=True)
    train_z, test_z = _split(image.shape[0])
    onehot = F.one_hot(label, len(names) + 1).permute(0, 3, 1, 2)[:, 1:].float()  # (Z, n_cls, X, Y)
    gen = torch.Generator().manual_seed(seed)
    sam.train()
    for step in range(steps):
        idx = torch.tensor(train_z)[torch.randint(len(train_z), (batch_size,), generator=gen)]
        x, y = image[idx], onehot[idx]
        if torch.rand((), generator=gen) < 0.5:  # left-right flip (axis X of RAS)
            x, y = x.flip(-2), y.flip(-2)
        loss = loss_fn(_logits(sam, x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1:4d}/{steps}  DiceCE {loss.item():.4f}", flush=True)
    sam.eval()
    with torch.no_grad():
        pred = torch.cat([_predict(_logits(sam, image[test_z[i : i + 8]])) for i in range(0, len(test_z), 8)])
    truth = label[test_z]
    as_volume = lambda lab: F.one_hot(lab, len(names) + 1)[..., 1:].permute(3, 1, 2, 0).unsqueeze(0)  # noqa: E731
    metric = monai_metrics.DiceMetric(include_background=True, reduction="none")
    dice = metric(as_volume(pred), as_volume(truth))[0].tolist()
    return {**{n: float(d) for n, d in zip(names, dice)}, "mean": float(np.mean(dice))}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/cilmp_sam_tissue", help="folder for the representations and results")
    parser.add_argument("--language-model", default=None, help="local transformers model folder (default: MiniLM)")
    parser.add_argument("--layer", type=int, default=-1, help="hidden-state layer of the language model")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    image, label = load_tissue_slices()
    lm = encode_descriptions(args.language_model, DESCRIPTIONS, layer=args.layer)
    scale = torch.cat(list(lm.values())).std()
    gen = torch.Generator().manual_seed(args.seed + 1)
    random = {k: torch.randn(v.shape, generator=gen) * scale for k, v in lm.items()}
    print("class representations (L_c, D):", {k: tuple(v.shape) for k, v in lm.items()})
    results = {}
    for name, reps in (("language_model", lm), ("random_vectors", random)):
        print(f"[{name}] training {args.steps} steps", flush=True)
        t0 = time.perf_counter()
        results[name] = run(reps, image, label, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed, workdir=out / name)
        results[name]["seconds"] = time.perf_counter() - t0
    print("\nheld-out Dice (MONAI DiceMetric, 12 axial slices)")
    print(f"{'class vectors':16s} " + " ".join(f"{n:>13s}" for n in [*DESCRIPTIONS, "mean"]))
    for name, res in results.items():
        print(f"{name:16s} " + " ".join(f"{res[n]:13.4f}" for n in [*DESCRIPTIONS, "mean"]))
    winner = max(results, key=lambda k: results[k]["mean"])
    gap = abs(results["language_model"]["mean"] - results["random_vectors"]["mean"])
    print(f"winner on mean Dice: {winner} (by {gap:.4f}); total {time.perf_counter() - start:.0f} s")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
