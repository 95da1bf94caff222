"""Reference backbones: the Mamba-1 block and the hybrid CNN–Mamba 3D encoder MambaMIM pretrains."""

from .hybrid_encoder import (
    CNNStage,
    HybridMambaEncoder,
    MambaLayer,
    MambaSequence,
    MambaStage,
    sincos_position_embedding_3d,
)
from .mamba import Mamba, init_dt_projection
from .mednext import LayerNorm3d, MedNeXtBlock, MedNeXtDownBlock

__all__ = [
    "CNNStage",
    "HybridMambaEncoder",
    "LayerNorm3d",
    "Mamba",
    "MambaLayer",
    "MambaSequence",
    "MambaStage",
    "MedNeXtBlock",
    "MedNeXtDownBlock",
    "init_dt_projection",
    "sincos_position_embedding_3d",
]
