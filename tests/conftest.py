"""Test-wide settings: Triton kernels run in the CPU interpreter when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before triton.jit decorates anything
    os.environ.setdefault("TRITON_INTERPRET", "1")

# under pytest-xdist each worker gets one thread: two workers on two cores, no oversubscription
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))
