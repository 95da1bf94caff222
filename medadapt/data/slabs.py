"""Slabs of D consecutive slices from labelled volumes, the input unit of the 3D (SD-Trans) pipeline.

A slab starting at slice ``s`` along ``axis`` holds slices ``s, s+1, ..., s+D-1``; starts step by
``stride`` through the allowed slice range, so train and held-out slabs can come from disjoint parts
of one volume (:func:`split_slice_range`). Each slice is resized in-plane to ``slice_size``
(bilinear for the image, ``nearest-exact`` for the label: both sample at pixel centres, so the
resized label stays aligned with the resized image).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["VolumeSlabDataset", "split_slice_range"]


def split_slice_range(num_slices: int, held_out_fraction: float = 0.25, depth: int = 1,
                      held_out: str = "end") -> tuple[range, range]:
    """Split ``range(num_slices)`` into a training and a held-out contiguous block of slices.

    Args:
        num_slices: slices along the slab axis.
        held_out_fraction: share of slices held out (at least ``depth`` slices each side).
        depth: slab depth D, so that both parts hold at least one slab.
        held_out: ``"end"`` (the last slices) or ``"start"`` (the first slices).
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    if num_slices < 2 * depth:
        raise ValueError(f"num_slices ({num_slices}) must be at least 2·depth ({2 * depth}) to split")
    n_held = min(max(depth, round(held_out_fraction * num_slices)), num_slices - depth)
    if held_out == "end":
        return range(0, num_slices - n_held), range(num_slices - n_held, num_slices)
    if held_out == "start":
        return range(n_held, num_slices), range(0, n_held)
    raise ValueError(f"held_out must be 'end' or 'start', got {held_out!r}")


def _as_volume(array, name: str, index: int) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(array))
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3:
        raise ValueError(f"volumes[{index}]['{name}'] must be 3D (X, Y, Z) or (1, X, Y, Z), "
                         f"got shape {tuple(tensor.shape)}")
    return tensor


class VolumeSlabDataset(Dataset):
    """Slabs ``{"image": (C, D, H, W) float32, "label": (D, H, W) int64, "volume": i, "start": s}``.

    Args:
        volumes: dicts with ``image`` and ``label`` arrays of shape ``(X, Y, Z)`` or ``(1, X, Y, Z)``
            (e.g. from :func:`~medadapt.data.load_volume_pairs`), or :class:`TissueVolume` objects.
        depth: D, slices per slab.
        axis: slab axis of the ``(X, Y, Z)`` volume (2: axial for RAS volumes).
        slice_range: allowed slice indices along ``axis`` (a ``range``; default all); the same for
            every volume, clipped to its length.
        stride: step between slab starts (default ``depth``: non-overlapping).
        slice_size: in-plane ``(H, W)`` after resizing; None keeps the volume's size.
        channels: repeat the grey-level image to this many channels (3 for SAM's RGB input).
        min_foreground: keep only slabs with at least this many labelled (> 0) voxels.
    """

    def __init__(self, volumes: Sequence, depth: int, axis: int = 2, slice_range: range | None = None,
                 stride: int | None = None, slice_size: tuple[int, int] | int | None = None,
                 channels: int = 1, min_foreground: int = 1) -> None:
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
        stride = depth if stride is None else stride
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if slice_range is not None and (not isinstance(slice_range, range) or slice_range.step != 1):
            raise ValueError(f"slice_range must be a contiguous range (step 1; slab spacing is stride), "
                             f"got {slice_range!r}")
        if isinstance(slice_size, int):
            slice_size = (slice_size, slice_size)
        self.depth, self.axis, self.channels, self.slice_size = depth, axis, channels, slice_size
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.index: list[tuple[int, int]] = []
        for v, volume in enumerate(volumes):
            get = volume.__getitem__ if isinstance(volume, dict) else lambda k, vol=volume: getattr(vol, k)
            image = _as_volume(get("image"), "image", v).float().movedim(axis, 0)
            label = _as_volume(get("label"), "label", v).long().movedim(axis, 0)
            if image.shape != label.shape:
                raise ValueError(f"volumes[{v}]: label shape {tuple(label.shape)} differs from image "
                                 f"shape {tuple(image.shape)}")
            n = image.shape[0]
            allowed = range(n)
            if slice_range is not None:
                allowed = range(max(0, slice_range.start), min(n, slice_range.stop))
            foreground = (label > 0).flatten(1).sum(1)
            for start in range(allowed.start, allowed.stop - depth + 1, stride):
                if int(foreground[start:start + depth].sum()) >= min_foreground:
                    self.index.append((v, start))
            self.images.append(image)
            self.labels.append(label)
        if not self.index:
            raise ValueError(f"no slab of depth {depth} with >= {min_foreground} foreground voxels in "
                             f"slice_range {slice_range} of {len(self.images)} volume(s)")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict:
        v, start = self.index[item]
        image = self.images[v][start:start + self.depth]  # (D, H, W)
        label = self.labels[v][start:start + self.depth]
        if self.slice_size is not None and tuple(image.shape[1:]) != tuple(self.slice_size):
            image = F.interpolate(image[:, None], size=self.slice_size, mode="bilinear",
                                  align_corners=False)[:, 0]
            # "nearest-exact" samples at pixel centres like bilinear with align_corners=False; plain
            # "nearest" samples at pixel corners and shifts the label by up to half an output pixel.
            label = F.interpolate(label[:, None].float(), size=self.slice_size,
                                  mode="nearest-exact")[:, 0].long()
        image = image[None].expand(self.channels, -1, -1, -1).contiguous()
        return {"image": image, "label": label, "volume": v, "start": start}
