"""Fused bottleneck adapter: reference, Triton kernel (forward + backward), dispatch."""

from .reference import fused_adapter_reference

fused_adapter = fused_adapter_reference  # replaced by the dispatching function

__all__ = ["fused_adapter", "fused_adapter_reference"]
