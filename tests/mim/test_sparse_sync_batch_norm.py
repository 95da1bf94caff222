"""A SyncBatchNorm under torch.distributed takes visible-only statistics over the whole distributed batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from medadapt.mim.sparse_ops import visible_norm

HERE = Path(__file__).parent


def test_two_gloo_ranks_equal_one_batch_norm_over_the_joined_batch(tmp_path):
    """Outputs, input gradients and running statistics of each rank's half equal one process's BatchNorm
    (visible voxels only) over the whole batch, though the ranks see different numbers of visible voxels."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "sync_bn_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sys.path.insert(0, str(HERE))
    from sync_bn_worker import fixed_batch, norm_module

    x, m, weights = fixed_batch()
    x = x.clone().requires_grad_()
    module = norm_module(torch.nn.BatchNorm3d)
    y = visible_norm(module, x, m)
    (y * weights).sum().backward()
    for rank in (0, 1):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        part = slice(2 * rank, 2 * rank + 2)
        torch.testing.assert_close(got["y"], y[part].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["grad"], x.grad[part], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["running_mean"], module.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["running_var"], module.running_var, rtol=1e-12, atol=1e-12)
