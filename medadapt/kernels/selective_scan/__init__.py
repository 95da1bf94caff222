"""Selective scan (Mamba-1): reference loop, chunked torch path, Triton kernel, dispatch."""

from .reference import selective_scan_reference

selective_scan = selective_scan_reference  # replaced by the dispatching function

__all__ = ["selective_scan", "selective_scan_reference"]
