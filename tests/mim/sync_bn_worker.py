"""Run under ``torchrun --nproc_per_node 2``: visible-only SyncBatchNorm statistics pooled over both ranks.

Each rank normalises its half of one fixed batch with ``visible_norm`` on a ``SyncBatchNorm``; it saves its
output, its input gradient and the running statistics for ``test_sparse_sync_batch_norm.py``.
"""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from medadapt.mim.sparse_ops import visible_norm


def fixed_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1
    m = torch.rand(4, 1, 2, 3, 3, generator=gen) > 0.4
    m[2:] &= torch.rand(2, 1, 2, 3, 3, generator=gen) > 0.5  # rank 1 sees fewer voxels: counts must be pooled
    weights = torch.randn(4, 3, 2, 3, 3, generator=gen, dtype=torch.float64)
    return x, m, weights


def norm_module(cls):
    torch.manual_seed(1)
    module = cls(3, momentum=0.3).double().train()
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    return module


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x, m, weights = fixed_batch()
    part = slice(2 * rank, 2 * rank + 2)
    xs = x[part].clone().requires_grad_()
    module = norm_module(torch.nn.SyncBatchNorm)
    y = visible_norm(module, xs, m[part])
    (y * weights[part]).sum().backward()
    save_file({"y": y.detach().contiguous(), "grad": xs.grad.contiguous(), "running_mean": module.running_mean,
               "running_var": module.running_var}, os.path.join(out, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
