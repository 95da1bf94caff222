"""Kernels: per op a plain-torch reference, a Triton kernel, an autograd.Function and a dispatcher.

Importable with torch alone; Triton is imported lazily when a kernel runs on it.
``MEDADAPT_KERNELS=torch|triton|cpu`` forces a path (see ``_dispatch``); the selective scan also has a
fused C kernel for CPU tensors, compiled on first use (``_cbuild``).
"""

from ._dispatch import kernel_backend, triton_available
from .fused_adapter import fused_adapter, fused_adapter_backend, fused_adapter_reference
from .selective_scan import (
    selective_scan,
    selective_scan_cpu,
    selective_scan_reference,
    selective_scan_torch,
    selective_scan_triton,
)

__all__ = [
    "fused_adapter",
    "fused_adapter_backend",
    "fused_adapter_reference",
    "kernel_backend",
    "selective_scan",
    "selective_scan_cpu",
    "selective_scan_reference",
    "selective_scan_torch",
    "selective_scan_triton",
    "triton_available",
]
