"""Run under ``torchrun --nproc_per_node 2``: the 3D job (tiny SAM, 2 steps, both runs), then each rank dumps
the adapter weights of both runs. Used by ``test_finetune3d.py``; not a test module itself.

    torchrun --nproc_per_node 2 ddp_worker3d.py OUT_DIR IMAGE LABEL
"""

import os
import sys

import torch
from safetensors.torch import save_file

from medadapt.core.io import adapter_state_dict
from medadapt.train import cleanup_distributed, init_distributed
from medadapt.train.finetune3d import build_parser, run


def main(out: str, image: str, label: str) -> None:
    torch.set_num_threads(1)
    args = build_parser().parse_args(
        ["--arch", "tiny", "--img-size", "32", "--depth", "2", "--steps", "2", "--batch-size", "1",
         "--eval-every", "1", "--overlays", "2", "--no-progress", "--lr", "1e-2", "--max-train-minutes", "0",
         "--image", image, "--label", label, "--out", os.path.join(out, "run")])
    ctx = init_distributed("cpu")
    result = run(args, ctx, log=lambda line: print(line, flush=True))
    for arm, model in result.models.items():
        state = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
        save_file(state, os.path.join(out, f"{arm}_rank{ctx.rank}.safetensors"))
    with open(os.path.join(out, f"rank{ctx.rank}.txt"), "w") as f:
        f.write(f"{ctx.world_size} {result.adapted.dice_after!r} {result.decoder_only.dice_after!r}\n")
    cleanup_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
