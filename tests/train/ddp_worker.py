"""Run under ``torchrun --nproc_per_node 2``: a tiny prompted fine-tune, then each rank dumps its adapter.

Used by ``test_distributed.py``; not a test module itself.
"""

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from _synthetic import Squares  # noqa: E402

import medadapt as ma  # noqa: E402
from medadapt.core.io import adapter_state_dict  # noqa: E402
from medadapt.train import (  # noqa: E402
    FinetuneOptions,
    PromptCollate,
    PromptedSAM,
    PromptedSegmentationLoss,
    build_sam,
    cleanup_distributed,
    init_distributed,
    run_finetune,
    wrap_ddp,
)


def tiny_injected(seed: int):
    sam = build_sam("tiny", img_size=32, seed=seed)
    return ma.inject(sam, ma.MedSAConfig(modules_to_save=["mask_decoder"]))


def gradient_batch(items: range) -> dict:
    data = Squares(4, seed=3)
    return PromptCollate([1, 2], "box", jitter=0.0)([data[i] for i in items])


def dump_ddp_gradients(ctx, out: str) -> None:
    """One backward through DDP, each rank on half of a 4-item batch; rank 0 writes the averaged grads."""
    model = PromptedSAM(tiny_injected(0))
    parallel = wrap_ddp(model, ctx)
    batch = gradient_batch(range(2 * ctx.rank, 2 * ctx.rank + 2))
    PromptedSegmentationLoss()(parallel(batch), batch).backward()
    if ctx.rank == 0:
        grads = {n: p.grad.contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(grads, os.path.join(out, "ddp_grads.safetensors"))


def main(out: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    dump_ddp_gradients(ctx, out)
    # a different seed per rank: DDP must still start every rank from rank 0's weights
    sam = tiny_injected(ctx.rank)
    train = Squares(8, seed=1)
    held = Squares(3, seed=2)
    evaluation = PromptCollate([1, 2], "box", jitter=0.0)
    eval_batches = [evaluation([held[i] for i in range(3)])]
    options = FinetuneOptions(steps=3, batch_size=2, lr=1e-2, eval_every=2, max_train_minutes=None,
                              num_overlays=2, progress=False)
    collate = PromptCollate([1, 2], "box", jitter=0.1, seed=100 + ctx.rank)
    result = run_finetune(sam, train, collate, eval_batches, os.path.join(out, "run"), ["a", "b"], options, ctx,
                          log=lambda line: print(line, flush=True))
    state = {k: v.contiguous() for k, v in adapter_state_dict(sam).items()}
    save_file(state, os.path.join(out, f"rank{ctx.rank}.safetensors"))
    with open(os.path.join(out, f"rank{ctx.rank}.txt"), "w") as f:
        f.write(f"{ctx.world_size} {result.dice_after!r} {result.history.losses!r}\n")
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
