"""Test-wide settings: Triton kernels run in the CPU interpreter when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before triton.jit decorates anything
    os.environ.setdefault("TRITON_INTERPRET", "1")

# one thread per test process: `make test` runs two xdist workers on two cores, and small ops get much
# slower when threads oversubscribe the cores
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
