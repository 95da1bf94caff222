"""medadapt: parameter-efficient adapters for foundation segmenters in medical imaging.

    import medadapt as ma
    ma.inject(sam, ma.MedSAConfig(mlp_ratio=0.25, modules_to_save=["mask_decoder"]))
    ma.print_trainable_parameters(sam)
    ma.save_adapter(sam, "run/"); ma.load_adapter(other_sam, "run/")
"""

from . import adapters  # noqa: F401  (registers the Med-SA method)
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

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "HostIntegration",
    "MedSAConfig",
    "__version__",
    "disable_adapters",
    "inject",
    "load_adapter",
    "print_trainable_parameters",
    "register_host",
    "register_method",
    "remove_adapters",
    "save_adapter",
    "trainable_parameters",
]
