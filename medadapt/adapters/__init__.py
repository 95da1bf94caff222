"""Med-SA adapters: the bottleneck adapter, its wrappers, SD-Trans and HyP-Adpt, host integrations."""

from .bottleneck import BottleneckAdapter, ParallelAdapterWrapper, SequentialAdapterWrapper, hidden_width
from .hyper_prompt import HyPDecoderBlock, HyperPromptAdapter, apply_hyper_prompt
from .medsa import apply_medsa
from .space_depth import SpaceDepthAttention, VolumeInput, volume_slices

__all__ = [
    "BottleneckAdapter",
    "HyPDecoderBlock",
    "HyperPromptAdapter",
    "ParallelAdapterWrapper",
    "SequentialAdapterWrapper",
    "SpaceDepthAttention",
    "VolumeInput",
    "apply_hyper_prompt",
    "apply_medsa",
    "hidden_width",
    "volume_slices",
]
