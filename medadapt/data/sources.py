"""Where the volumes of a run come from: the user's files or the bundled MNI152 demo volume.

Command-line tools share :func:`add_volume_arguments` (``--image/--label`` repeated, or ``--data-dir``;
``--ct-window``/``--spacing`` for how they are loaded), :func:`volume_pairs_from_args` and
:func:`volume_transform_options`; with no files, the MNI152 tissue volume is written to the cache and used.
"""

from __future__ import annotations

import argparse
import os

from .mni152 import write_mni152_tissue
from .volumes import find_volume_pairs, pairs_from_arguments

__all__ = ["add_volume_arguments", "resolve_volume_pairs", "volume_pairs_from_args", "volume_transform_options"]


def add_volume_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--image``, ``--label`` (repeatable, paired in order), ``--data-dir`` and ``--cache-dir``."""
    group = parser.add_argument_group("volumes (default: the bundled MNI152 T1 with a tissue label)")
    group.add_argument("--image", action="append", default=[], metavar="NIFTI",
                       help="image volume (.nii/.nii.gz); repeat with --label for several pairs")
    group.add_argument("--label", action="append", default=[], metavar="NIFTI",
                       help="label volume paired with the --image at the same position")
    group.add_argument("--data-dir", default=None, metavar="FOLDER",
                       help="folder of pairs: imagesTr/+labelsTr/, images/+labels/, or case + case_label")
    group.add_argument("--cache-dir", default=None, metavar="FOLDER",
                       help="where the demo volume is written (default $MEDADAPT_CACHE or ~/.cache/medadapt)")
    group.add_argument("--ct-window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                       help="CT: map intensities in [LOW, HIGH] (Hounsfield units, e.g. -175 250 for the abdomen) "
                            "to [0, 1], clipped, instead of the 0.5-99.5 percentile scaling used for MRI")
    group.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                       help="resample every volume to this voxel spacing in mm (default: each file's own)")
    return parser


def volume_transform_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`~medadapt.data.build_volume_transforms` (via ``load_volume_pairs``) chosen by
    ``--ct-window`` (``intensity="window"``) and ``--spacing`` (``pixdim``); empty for the defaults.

    Raises:
        ValueError: ``--ct-window`` with LOW >= HIGH, or a ``--spacing`` value that is not > 0.
    """
    options: dict = {}
    window = getattr(args, "ct_window", None)
    if window is not None:
        low, high = window
        if not low < high:
            raise ValueError(f"--ct-window LOW HIGH needs LOW < HIGH, got {low:g} {high:g}")
        options.update(intensity="window", window=(low, high))
    spacing = getattr(args, "spacing", None)
    if spacing is not None:
        if not all(v > 0 for v in spacing):
            raise ValueError(f"--spacing values must be > 0 (mm), got {spacing}")
        options["pixdim"] = tuple(spacing)
    return options


def resolve_volume_pairs(images=(), labels=(), data_dir: str | os.PathLike | None = None,
                         cache_dir: str | os.PathLike | None = None, resolution: int = 2
                         ) -> tuple[list[dict[str, str]], bool]:
    """The checked image/label pairs to use, and whether they are the bundled demo volume.

    ``images``/``labels`` take precedence, then ``data_dir``; with neither, the MNI152 demo volume at
    ``resolution`` mm is written to ``cache_dir`` (see :func:`write_mni152_tissue`).
    """
    if (images or labels) and data_dir is not None:
        raise ValueError("pass either --image/--label pairs or --data-dir, not both")
    if images or labels:
        return pairs_from_arguments(list(images), list(labels)), False
    if data_dir is not None:
        return find_volume_pairs(data_dir), False
    image_path, label_path = write_mni152_tissue(cache_dir, resolution=resolution)
    return [{"image": os.fspath(image_path), "label": os.fspath(label_path)}], True


def volume_pairs_from_args(args: argparse.Namespace, resolution: int = 2
                           ) -> tuple[list[dict[str, str]], bool]:
    """:func:`resolve_volume_pairs` on the arguments added by :func:`add_volume_arguments`."""
    return resolve_volume_pairs(args.image, args.label, args.data_dir, args.cache_dir, resolution)
