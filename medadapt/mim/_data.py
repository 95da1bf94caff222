"""Volumes and random 3D crops for the MambaMIM example (private to ``medadapt.mim.pretrain``).

Pretraining volumes: the bundled MNI152 T1 (``medadapt.data.load_mni152_tissue``) or every
``.nii``/``.nii.gz`` in a folder (nibabel), each scaled to [0, 1] (min–max, or a CT window
``[lo, hi]`` HU → [0, 1]). Crops are drawn with a ``torch.Generator`` so a run is reproducible and
resumable: the crop centre is a uniformly drawn foreground voxel (intensity > 0.05), the crop is
clamped inside the volume, and volumes smaller than the crop are zero-padded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._optional import require

__all__ = ["CropSampler", "load_folder_volumes", "load_tissue_volume"]


def _to_unit(image: np.ndarray, window: tuple[float, float] | None) -> torch.Tensor:
    image = np.asarray(image, dtype=np.float32)
    lo, hi = window if window is not None else (float(image.min()), float(image.max()))
    if hi <= lo:
        raise ValueError(f"window must have hi > lo, got ({lo}, {hi})")
    return torch.from_numpy(np.clip((image - lo) / (hi - lo), 0.0, 1.0))


@functools.lru_cache(maxsize=2)
def load_tissue_volume(resolution: int = 2) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """MNI152 T1 in [0, 1] ``(X, Y, Z)``, its tissue label ``(X, Y, Z)`` int64, and the class names."""
    from medadapt.data import load_mni152_tissue

    volume = load_mni152_tissue(resolution=resolution)
    return _to_unit(volume.image, None), torch.from_numpy(volume.label), tuple(volume.class_names)


def load_folder_volumes(folder: str | os.PathLike, window: tuple[float, float] | None = None) -> list[torch.Tensor]:
    """Every NIfTI volume in ``folder`` (not recursive), scaled to [0, 1], as ``(X, Y, Z)`` tensors."""
    nib = require("nibabel", "pretraining on a folder of NIfTI volumes")
    if not Path(folder).is_dir():
        raise ValueError(f"data: {os.fspath(folder)!r} is not a folder")
    paths = sorted(p for p in Path(folder).iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not paths:
        raise ValueError(f"data: no .nii or .nii.gz files in {os.fspath(folder)!r}")
    volumes = []
    for path in paths:
        data = np.asarray(nib.load(os.fspath(path)).dataobj, dtype=np.float32)
        data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
        if data.ndim != 3:
            raise ValueError(f"data: {path.name} must be a 3D volume, got shape {data.shape}")
        volumes.append(_to_unit(data, window))
    return volumes


class CropSampler:
    """Random ``crop³`` crops (with matching label crops) from a list of ``(X, Y, Z)`` volumes."""

    def __init__(self, volumes: list[torch.Tensor], crop: int, labels: list[torch.Tensor] | None = None):
        if crop < 1:
            raise ValueError(f"crop must be positive, got {crop}")
        self.crop = crop
        self.volumes = [self._pad(v, crop) for v in volumes]
        self.labels = [self._pad(lab, crop) for lab in labels] if labels is not None else None
        self.foreground = []
        for volume in self.volumes:
            fg = (volume > 0.05).nonzero()
            self.foreground.append(fg if len(fg) else torch.tensor([[s // 2 for s in volume.shape]]))

    @staticmethod
    def _pad(volume: torch.Tensor, crop: int) -> torch.Tensor:
        pads = []
        for size in reversed(volume.shape):
            extra = max(0, crop - size)
            pads += [extra // 2, extra - extra // 2]
        return F.pad(volume, pads) if any(pads) else volume

    def sample(self, batch: int, generator: torch.Generator):
        """``(images (batch, 1, c, c, c), labels (batch, c, c, c) or None)``."""
        images, labels = [], []
        for _ in range(batch):
            index = int(torch.randint(len(self.volumes), (1,), generator=generator))
            volume, foreground = self.volumes[index], self.foreground[index]
            centre = foreground[int(torch.randint(len(foreground), (1,), generator=generator))]
            start = [int(min(max(int(c) - self.crop // 2, 0), s - self.crop))
                     for c, s in zip(centre, volume.shape)]
            window = tuple(slice(s, s + self.crop) for s in start)
            images.append(volume[window])
            if self.labels is not None:
                labels.append(self.labels[index][window])
        image = torch.stack(images).unsqueeze(1)
        return image, (torch.stack(labels) if self.labels is not None else None)
