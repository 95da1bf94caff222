"""The main job: SAM + Med-SA adapters + SD-Trans (3D) + HyP-Adpt on slabs of the bundled MNI152 volume.

    python examples/finetune_sam3d.py                          # ViT-B geometry at 128 px, D = 4, random backbone
    python examples/finetune_sam3d.py --checkpoint sam_vit_b_01ec64.pth   # SAM's real weights (local file)
    python examples/finetune_sam3d.py --prompt point           # one positive click per slice and class
    python examples/finetune_sam3d.py --image ct.nii.gz --label seg.nii.gz   # your volume(s); or --data-dir DIR
    python examples/finetune_sam3d.py --no-compare             # skip the decoder-only comparison run
    torchrun --nproc_per_node 2 examples/finetune_sam3d.py     # DDP: gloo on CPU, NCCL on GPU

The same job as ``medadapt finetune --3d`` and ``make demo``. What it does, in library calls
(``medadapt.train.finetune3d``):

1. ``prepare_data``: NIfTI pairs through MONAI transforms (``medadapt.data.load_volume_pairs``), the
   labelled axial extent of each volume split into a lower training block and an upper held-out
   block, slabs of D slices (``medadapt.train.slab_sets``);
2. ``build_sam`` + ``ma.inject(sam, arm_config("adapted", D))``: ``MedSAConfig(space_depth=True,
   hyper_prompt=True, depth_pos_embed=D, modules_to_save=["mask_decoder"])``;
3. ``run_finetune``: a box (jittered) or click per slice and class, DiceCE, Adam; held-out MONAI Dice
   per class before, during and after; ``overlays.png``, ``curves.png``, the adapter;
4. the same with ``arm_config("decoder_only")`` (no encoder adapter), and the side-by-side verdict
   (``comparison.png``, ``comparison.json``, the last printed line).
"""

from medadapt.train.finetune3d import main

if __name__ == "__main__":
    raise SystemExit(main(prog="finetune_sam3d.py"))
