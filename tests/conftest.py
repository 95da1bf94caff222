"""Test-wide settings: Triton kernels run in the CPU interpreter when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before triton.jit decorates anything
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
