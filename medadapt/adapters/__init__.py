"""Med-SA adapters: the bottleneck adapter, its wrappers, SD-Trans and HyP-Adpt, host integrations."""

from .bottleneck import BottleneckAdapter, ParallelAdapterWrapper, SequentialAdapterWrapper, hidden_width
from .medsa import apply_medsa

__all__ = [
    "BottleneckAdapter",
    "ParallelAdapterWrapper",
    "SequentialAdapterWrapper",
    "apply_medsa",
    "hidden_width",
]
