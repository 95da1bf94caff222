"""Built-in host integrations: Meta's SAM, timm ViTs, MONAI transformer blocks."""

from . import monai_host, sam_host, timm_host

__all__ = ["monai_host", "sam_host", "timm_host"]
