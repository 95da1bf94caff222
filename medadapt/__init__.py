"""medadapt: parameter-efficient adapters for foundation segmenters in medical imaging.

    import medadapt as ma
    ma.inject(sam, ma.MedSAConfig(mlp_ratio=0.25, modules_to_save=["mask_decoder"]))
    ma.print_trainable_parameters(sam)
    ma.save_adapter(sam, "run/"); ma.load_adapter(other_sam, "run/")
"""

from . import adapters, prompts  # noqa: F401  (register the Med-SA and CILMP methods)
from .core import (
    AdapterConfig,
    HostIntegration,
    MedSAConfig,
    disable_adapters,
    inject,
    load_adapter,
    print_trainable_parameters,
    register_host,
    register_method,
    remove_adapters,
    save_adapter,
    trainable_parameters,
)
from .mim import MambaMIM, MambaMIMConfig
from .models import HybridMambaEncoder, Mamba
from .prompts import CILMPConfig, encode_descriptions

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "CILMPConfig",
    "HostIntegration",
    "HybridMambaEncoder",
    "Mamba",
    "MambaMIM",
    "MambaMIMConfig",
    "MedSAConfig",
    "__version__",
    "disable_adapters",
    "encode_descriptions",
    "inject",
    "load_adapter",
    "print_trainable_parameters",
    "register_host",
    "register_method",
    "remove_adapters",
    "save_adapter",
    "trainable_parameters",
]
