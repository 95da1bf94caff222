"""Makes the helpers beside these tests (``_synthetic``, ``ddp_worker``) importable."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """These tests run tiny ops, where a second OpenMP thread on a shared 2-core machine costs up to
    10x (threads spin-waiting for a descheduled peer); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
