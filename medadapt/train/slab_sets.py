"""Training and held-out slab sets of labelled volumes, for the 3D (SD-Trans) fine-tune.

Per volume, the slices along ``axis`` whose labelled area reaches ``min_fraction`` of the largest
slice's form the extent ``[first, last]``. The extent is split into a lower training block and an
upper held-out block (``held_out_fraction`` of it, :func:`~medadapt.data.split_slice_range`), and the
last ``gap`` training slices (default D) are dropped, so no training slab touches a held-out slice
nor its nearest, near-identical neighbours. Training slabs start at every slice (``train_stride`` 1:
overlapping slabs, more variety per epoch), held-out slabs tile their block (stride D).
Slabs are turned in-plane by 90° (:class:`OrientedSlabs`: anterior up for RAS axial slices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from ..data import VolumeSlabDataset, split_slice_range

__all__ = ["OrientedSlabs", "SlabSets", "foreground_extent", "label_classes", "slab_sets"]


class OrientedSlabs(Dataset):
    """Slabs of a :class:`~medadapt.data.VolumeSlabDataset` turned in-plane by ``quarter_turns`` × 90°.

    ``image (C, D, H, W)`` and ``label (D, H, W)`` are rotated over their last two axes
    (``torch.rot90``); for RAS volumes sliced axially, one turn puts anterior up, as radiologists view.
    """

    def __init__(self, slabs: Dataset, quarter_turns: int = 1) -> None:
        self.slabs, self.quarter_turns = slabs, int(quarter_turns)

    def __len__(self) -> int:
        return len(self.slabs)

    def __getitem__(self, item: int) -> dict:
        slab = dict(self.slabs[item])
        for key in ("image", "label"):
            slab[key] = torch.rot90(slab[key], self.quarter_turns, (-2, -1)).contiguous()
        return slab


def _label_volume(volume) -> np.ndarray:
    label = np.asarray(volume["label"] if isinstance(volume, dict) else volume.label)
    return label[0] if label.ndim == 4 and label.shape[0] == 1 else label


def foreground_extent(label, axis: int = 2, min_fraction: float = 0.05) -> range:
    """Slices along ``axis`` from the first to the last whose labelled (> 0) area is at least
    ``min_fraction`` × the largest slice's area.

    Args:
        label: class map ``(X, Y, Z)`` (or ``(1, X, Y, Z)``).
        axis: slice axis.
        min_fraction: in ``[0, 1)``; 0 keeps every slice with a labelled voxel.
    """
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    label = np.asarray(label)
    label = label[0] if label.ndim == 4 and label.shape[0] == 1 else label
    if label.ndim != 3 or axis not in (0, 1, 2):
        raise ValueError(f"label must be 3D and axis 0, 1 or 2, got shape {label.shape} and axis {axis!r}")
    counts = (np.moveaxis(label, axis, 0) > 0).reshape(label.shape[axis], -1).sum(1)
    if counts.max() == 0:
        raise ValueError("label has no voxel > 0")
    keep = np.nonzero((counts > 0) & (counts >= min_fraction * counts.max()))[0]
    return range(int(keep[0]), int(keep[-1]) + 1)


def label_classes(volumes: Sequence) -> list[int]:
    """The sorted class values > 0 found in the volumes' labels."""
    found: set[int] = set()
    for volume in volumes:
        found.update(int(v) for v in np.unique(_label_volume(volume)) if v > 0)
    return sorted(found)


@dataclass
class SlabSets:
    """``train`` and ``held_out`` slab datasets, and the slice ranges each volume gave them."""

    train: Dataset
    held_out: Dataset
    train_ranges: list[range]
    held_out_ranges: list[range]


def slab_sets(volumes: Sequence, depth: int, slice_size: int | tuple[int, int] | None, held_out_fraction: float = 0.25,
              axis: int = 2, train_stride: int = 1, gap: int | None = None, min_fraction: float = 0.05,
              channels: int = 3, quarter_turns: int = 1) -> SlabSets:
    """Split each volume's labelled extent into training and held-out slabs of ``depth`` slices.

    Args:
        volumes: dicts with ``image`` and ``label`` ``(X, Y, Z)`` or ``(1, X, Y, Z)`` (e.g. from
            :func:`~medadapt.data.load_volume_pairs`).
        depth: D, slices per slab.
        slice_size: in-plane size of every slice after resizing (None: the volume's).
        held_out_fraction: share of each extent held out (its upper end along ``axis``).
        axis: slice axis (2: axial for RAS volumes).
        train_stride: step between training slab starts.
        gap: training slices dropped next to the held-out block (default ``depth``).
        min_fraction: see :func:`foreground_extent`.
        channels: image channels (3 for SAM).
        quarter_turns: in-plane rotation of every slab (:class:`OrientedSlabs`).

    Raises:
        ValueError: naming the volume (and its file, when known) whose extent is too thin for
            ``depth``, ``gap`` and the split.
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    gap = depth if gap is None else gap
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    if not volumes:
        raise ValueError("volumes must hold at least one volume")
    train_parts, held_parts, train_ranges, held_ranges = [], [], [], []
    for index, volume in enumerate(volumes):
        where = volume.get("label_path", f"volumes[{index}]") if isinstance(volume, dict) else f"volumes[{index}]"
        extent = foreground_extent(_label_volume(volume), axis, min_fraction)
        too_thin = ValueError(f"label {where!r} is labelled on {len(extent)} slices along axis {axis}: too few "
                              f"for a training block ({depth} + {gap} gap slices at least) and a held-out block "
                              f"({held_out_fraction:g} of them, >= {depth}) of slabs of depth {depth}; lower the depth")
        if len(extent) < 2 * depth + gap:
            raise too_thin
        train_part, held_part = split_slice_range(len(extent), held_out_fraction, depth=depth)
        if len(train_part) - gap < depth:
            raise too_thin
        train_range = range(extent.start + train_part.start, extent.start + train_part.stop - gap)
        held_range = range(extent.start + held_part.start, extent.start + held_part.stop)
        common = dict(depth=depth, axis=axis, slice_size=slice_size, channels=channels, min_foreground=1)
        train_parts.append(VolumeSlabDataset([volume], slice_range=train_range, stride=train_stride, **common))
        held_parts.append(VolumeSlabDataset([volume], slice_range=held_range, stride=depth, **common))
        train_ranges.append(train_range)
        held_ranges.append(held_range)

    def joined(parts: list[Dataset]) -> Dataset:
        return OrientedSlabs(parts[0] if len(parts) == 1 else ConcatDataset(parts), quarter_turns)

    return SlabSets(joined(train_parts), joined(held_parts), train_ranges, held_ranges)
