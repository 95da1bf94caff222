"""The reusable SAM prompted-segmentation fine-tune pipeline (2D slices now, 3D slabs with SD-Trans).

    from medadapt.train import build_sam, PromptedSAM, PromptCollate, run_finetune
    sam = build_sam("vit_b", img_size=224)                  # or checkpoint="sam_vit_b_01ec64.pth"
    ma.inject(sam, ma.MedSAConfig(modules_to_save=["mask_decoder"]))
    result = run_finetune(sam, train_set, PromptCollate([2], "box"), eval_batches, "runs/x", ["white_matter"])
    sam, spec = load_run("runs/finetune3d")                 # a job's run folder (job.json + adapter/)
    segment_file(sam, spec, "case.nii.gz", "case_pred.nii.gz", prompt_label="rough.nii.gz")

Pieces: :func:`build_sam` (SAM at a CPU-sized input, checkpoint weights resized), :class:`PromptedSAM`
(pixel normalisation, batched prompt encoder + mask decoder, masks at the label size),
:class:`PromptedSegmentationLoss` (MONAI DiceCE), :func:`evaluate` (MONAI Dice), :func:`fit`, the DDP
helpers in :mod:`medadapt.train.distributed`, the figures in :mod:`medadapt.train.plots`.
Submodules import segment_anything / MONAI / matplotlib / tqdm only when used.
"""

from .batches import PromptCollate, add_prompts
from .distributed import (
    DistContext,
    cleanup_distributed,
    init_distributed,
    make_train_loader,
    shard,
    unwrap,
    wrap_ddp,
)
from .job import FinetuneOptions, FinetuneResult, add_training_arguments, options_from_args, run_finetune
from .loop import History, fit, train_step
from .objectives import PromptedSegmentationLoss, dice_sums, evaluate
from .prompted import PromptedSAM, decode_masks, preprocess_images, scale_coords
from .run_spec import RunSpec, load_run, read_run_spec
from .sam_factory import SAM_GEOMETRIES, build_sam, resize_sam_state_dict
from .segment3d import predict_label_map, segment_file

__all__ = [
    "SAM_GEOMETRIES",
    "DistContext",
    "FinetuneOptions",
    "FinetuneResult",
    "History",
    "PromptCollate",
    "PromptedSAM",
    "PromptedSegmentationLoss",
    "RunSpec",
    "add_prompts",
    "add_training_arguments",
    "build_sam",
    "cleanup_distributed",
    "decode_masks",
    "dice_sums",
    "evaluate",
    "fit",
    "init_distributed",
    "load_run",
    "make_train_loader",
    "options_from_args",
    "predict_label_map",
    "preprocess_images",
    "read_run_spec",
    "resize_sam_state_dict",
    "run_finetune",
    "scale_coords",
    "segment_file",
    "shard",
    "train_step",
    "unwrap",
    "wrap_ddp",
]
