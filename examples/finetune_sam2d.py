"""Fine-tune Med-SA adapters + SAM's mask decoder on axial slices of the MNI152 T1 (label: white matter).

    python examples/finetune_sam2d.py                          # ViT-B geometry at 224 px, random backbone
    python examples/finetune_sam2d.py --prompt point           # one positive click per slice instead of a box
    python examples/finetune_sam2d.py --checkpoint sam_vit_b_01ec64.pth   # SAM's real weights (local file)
    torchrun --nproc_per_node 2 examples/finetune_sam2d.py     # DDP: gloo on CPU, NCCL on GPU

``medadapt finetune`` runs the same job. Each numbered step is one library call; replace step 2 with
your own slices (any dataset of ``{"image": (3, H, W) in [0, 1], "label": (H, W) class map}``).
Writes ``<out>/adapter/`` (a few MB of adapter + decoder weights), ``overlays.png``, ``curves.png``
and ``metrics.json``, and prints the held-out Dice before and after training.
"""

import medadapt as ma
from medadapt.train import (
    SAM_GEOMETRIES,
    PromptCollate,
    build_sam,
    cleanup_distributed,
    init_distributed,
    options_from_args,
    run_finetune,
)
from medadapt.train.finetune2d import build_parser, held_out_batches, mni152_slice_sets, random_backbone_note

WHITE_MATTER = 2  # label values of medadapt.data's MNI152 volume: 0 background, 1 grey, 2 white matter


def main() -> None:
    args = build_parser("finetune_sam2d.py").parse_args()
    ctx = init_distributed(args.device)  # one process, or one of torchrun's
    img_size = args.img_size or SAM_GEOMETRIES[args.arch].default_img_size

    # 1. SAM (random, or --checkpoint resized to img_size) with Med-SA adapters; the decoder trains in full
    sam = build_sam(args.arch, img_size, args.checkpoint, seed=args.seed)
    ma.inject(sam, ma.MedSAConfig(mlp_ratio=args.mlp_ratio, modules_to_save=["mask_decoder"]))
    if ctx.is_main and args.checkpoint is None:
        print(random_backbone_note(args.arch, img_size))
    sam.to(ctx.device)

    # 2. slices: the lower brain for training, the top quarter held out
    train_set, held_set = mni152_slice_sets(img_size, label_class=WHITE_MATTER, cache_dir=args.cache_dir)

    # 3. prompts from each mask: jittered boxes (or clicks) while training, fixed ones for scoring
    train_collate = PromptCollate([WHITE_MATTER], args.prompt, jitter=0.1, seed=args.seed + 1000 * (ctx.rank + 1))
    eval_batches = held_out_batches(held_set, PromptCollate([WHITE_MATTER], args.prompt, jitter=0.0, seed=args.seed))

    # 4. Dice before -> Adam on DiceCE -> Dice after; figures, adapter and a one-line summary from rank 0
    run_finetune(sam, train_set, train_collate, eval_batches, args.out, ["white_matter"], options_from_args(args), ctx,
                 backbone=args.checkpoint or "random", name=f"finetune_sam2d {args.prompt}")
    cleanup_distributed()


if __name__ == "__main__":
    main()
