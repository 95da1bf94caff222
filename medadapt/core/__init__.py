"""The injection core: configs, target matching, inject/remove/disable, parameter counts, save/load."""

from .base import AdapterModule, AdapterWrapper, adapter_modules, adapter_state_names
from .config import AdapterConfig, MedSAConfig, config_from_dict, get_method, register_method
from .hosts import HostIntegration, find_host, host_blocks, register_host
from .inject import disable_adapters, inject, injected_configs, remove_adapters
from .io import adapter_state_dict, load_adapter, loading_adapter, save_adapter
from .modules_to_save import ModulesToSaveWrapper
from .params import print_trainable_parameters, trainable_parameters

__all__ = [
    "AdapterConfig",
    "AdapterModule",
    "AdapterWrapper",
    "HostIntegration",
    "MedSAConfig",
    "ModulesToSaveWrapper",
    "adapter_modules",
    "adapter_state_dict",
    "adapter_state_names",
    "config_from_dict",
    "disable_adapters",
    "find_host",
    "get_method",
    "host_blocks",
    "inject",
    "injected_configs",
    "load_adapter",
    "loading_adapter",
    "print_trainable_parameters",
    "register_host",
    "register_method",
    "remove_adapters",
    "save_adapter",
    "trainable_parameters",
]
