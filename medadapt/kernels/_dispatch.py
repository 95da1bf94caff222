"""Choosing between the Triton kernels and the torch paths.

``MEDADAPT_KERNELS=torch`` forces the torch path, ``MEDADAPT_KERNELS=triton`` forces Triton (on CPU
tensors this needs ``TRITON_INTERPRET=1``, which is how CI runs the kernels), ``MEDADAPT_KERNELS=cpu``
forces the compiled CPU kernel where an op has one (the selective scan) and the torch path elsewhere;
unset or ``auto`` picks Triton when every tensor is on CUDA and Triton imports, else the compiled CPU
kernel where the op has one and it builds, else torch.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["forced_backend", "kernel_backend", "triton_available", "interpret_mode"]

_CHOICES = ("auto", "torch", "triton", "cpu")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


# the values Triton's getenv_bool reads as on (case-insensitive, not stripped): anything else is off
_TRUE_VALUES = ("1", "true", "on", "yes", "y")


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    Parsed as Triton parses it, so ``TRITON_INTERPRET=false`` (or ``off``, ``no``) means compiled kernels
    here too: reading it as on would send CPU tensors to a Triton that has no CPU driver.
    """
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE_VALUES


def forced_backend() -> str:
    """``MEDADAPT_KERNELS`` as ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpu"`` (ValueError otherwise)."""
    choice = os.environ.get("MEDADAPT_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"MEDADAPT_KERNELS must be one of {_CHOICES}, got {choice!r}")
    return choice


def kernel_backend(*tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op on ``tensors`` (``"torch"`` also under
    ``MEDADAPT_KERNELS=cpu``: ops with a compiled CPU kernel check for it themselves).

    Raises:
        ValueError: ``MEDADAPT_KERNELS`` holds an unknown value.
        ImportError: ``MEDADAPT_KERNELS=triton`` but Triton is missing (names the extra).
        RuntimeError: ``MEDADAPT_KERNELS=triton`` with CPU tensors outside interpreter mode.
    """
    choice = forced_backend()
    if choice in ("torch", "cpu"):
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if choice == "triton":
        if not triton_available():
            raise ImportError("MEDADAPT_KERNELS=triton needs Triton: pip install 'medadapt[triton]'")
        if not on_cuda and not interpret_mode():
            raise RuntimeError(
                "MEDADAPT_KERNELS=triton with CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)"
            )
        return "triton"
    return "triton" if on_cuda and triton_available() else "torch"
