"""Volumes for the 3D pipeline: NIfTI pairs through MONAI transforms, slabs of D slices, SAM prompts.

The bundled demo volume is the MNI152 T1 template with a tissue label (0 background, 1 grey, 2 white
matter), built offline from the maps inside the ``nilearn`` wheel::

    from medadapt.data import load_mni152_tissue, VolumeSlabDataset, sample_box_prompts
    vol = load_mni152_tissue(resolution=2)                 # image, label, affine, class_names
    slabs = VolumeSlabDataset([vol], depth=8, axis=2, slice_size=64, channels=3)
    boxes, present = sample_box_prompts(slabs[0]["label"], classes=[1, 2], jitter=0.1, generator=0)

Importing this package needs torch and numpy only; nibabel, MONAI and nilearn are imported when used.
"""

from .mni152 import TISSUE_CLASSES, TissueVolume, default_cache_dir, load_mni152_tissue, write_mni152_tissue
from .prompts import class_masks, interior_points, mask_bounding_boxes, sample_box_prompts, sample_point_prompts
from .slabs import VolumeSlabDataset, split_slice_range
from .sources import add_volume_arguments, resolve_volume_pairs, volume_pairs_from_args, volume_transform_options
from .volumes import (
    NIFTI_SUFFIXES,
    build_volume_preprocessing,
    build_volume_transforms,
    check_volume_pair,
    find_volume_pairs,
    load_volume_pairs,
    pairs_from_arguments,
)

__all__ = [
    "NIFTI_SUFFIXES",
    "TISSUE_CLASSES",
    "TissueVolume",
    "VolumeSlabDataset",
    "add_volume_arguments",
    "build_volume_preprocessing",
    "build_volume_transforms",
    "check_volume_pair",
    "class_masks",
    "default_cache_dir",
    "find_volume_pairs",
    "interior_points",
    "load_mni152_tissue",
    "load_volume_pairs",
    "mask_bounding_boxes",
    "pairs_from_arguments",
    "resolve_volume_pairs",
    "sample_box_prompts",
    "sample_point_prompts",
    "split_slice_range",
    "volume_pairs_from_args",
    "volume_transform_options",
    "write_mni152_tissue",
]
