"""Image/label NIfTI pairs: finding them, checking them, and loading them through MONAI transforms.

Pairs come from the command line (``--image a.nii.gz --label b.nii.gz``, repeated) or from a folder.
Folder pairing rule (first that applies):

1. ``imagesTr/`` + ``labelsTr/`` (Medical Segmentation Decathlon / nnU-Net): an image
   ``case_0000.nii.gz`` (channel suffix ``_0000`` removed) or ``case.nii.gz`` pairs with
   ``labelsTr/case.nii.gz``; several channels of one case (``case_0000``, ``case_0001``: e.g. T1 and T2)
   become one grey-level volume each, all with that label (SAM reads one modality per image);
2. ``images/`` + ``labels/``: identical file names;
3. a flat folder: ``case.nii.gz`` pairs with ``case_label``, ``case_seg``, ``case_mask`` or
   ``case_labels`` (``.nii`` or ``.nii.gz``).

Every image must find its label (else ValueError naming the image). Checks before loading
(:func:`check_volume_pair`) raise ValueError naming the file: not NIfTI, not 3D, label shape differs
from the image, label empty (no voxel > 0). A label whose affine differs from its image's (beyond
1e-3, float noise) is resampled onto the image's voxel grid (nearest neighbour, zeros outside the
label's field of view) when loaded, so image and label voxels pair up by world position.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._optional import require

__all__ = [
    "INTENSITY_MODES",
    "NIFTI_SUFFIXES",
    "build_volume_preprocessing",
    "build_volume_transforms",
    "check_volume_pair",
    "find_volume_pairs",
    "load_volume_pairs",
    "pairs_from_arguments",
    "volume_preprocessing_options",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LABEL_TAGS = ("_label", "_seg", "_mask", "_labels")


def _is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


def _nifti_header(path: Path, role: str):
    """Load a NIfTI proxy image (no voxel data read), or raise naming the file."""
    nib = require("nibabel", "NIfTI volumes")
    if not path.is_file():
        raise ValueError(f"{role} file {str(path)!r} does not exist")
    if not _is_nifti_name(path):
        raise ValueError(f"{role} file {str(path)!r} is not NIfTI: expected a name ending in .nii or .nii.gz")
    try:
        image = nib.load(os.fspath(path))
    except Exception as err:  # nibabel raises several types for unreadable files
        raise ValueError(f"{role} file {str(path)!r} is not a readable NIfTI file: {err}") from err
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{role} file {str(path)!r} is not NIfTI (nibabel read a {type(image).__name__})")
    return image


def _spatial_shape(image, path: Path, role: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{role} file {str(path)!r} must be a 3D volume, got shape {tuple(image.shape)}")
    return shape


def check_volume_pair(image_path: str | os.PathLike, label_path: str | os.PathLike) -> tuple[int, int, int]:
    """Check that an image/label pair is usable; return the spatial shape.

    A label on another voxel grid (other affine, and possibly another shape) is accepted with a warning: it
    is resampled onto the image's grid when loaded.

    Raises:
        ValueError naming the file when it is missing, not NIfTI, not 3D, when the label's shape differs
        from the image's on the same grid (same affine), when the label has no foreground voxel (nothing > 0)
        or holds non-integer values.
    """
    image_path, label_path = Path(image_path), Path(label_path)
    image = _nifti_header(image_path, "image")
    label = _nifti_header(label_path, "label")
    image_shape = _spatial_shape(image, image_path, "image")
    label_shape = _spatial_shape(label, label_path, "label")
    same_grid = np.allclose(image.affine, label.affine, atol=1e-3)
    if image_shape != label_shape and same_grid:
        raise ValueError(f"label file {str(label_path)!r} has shape {label_shape}, but its image "
                         f"{str(image_path)!r} has shape {image_shape} (with the same affine)")
    if not same_grid:
        shift = float(np.abs(image.affine - label.affine).max())
        warnings.warn(f"label file {str(label_path)!r} and image {str(image_path)!r} have different affines "
                      f"(largest difference {shift:.4g}); the label is resampled onto the image's voxel grid "
                      "(nearest neighbour) when loaded", stacklevel=2)
    data = np.asanyarray(label.dataobj)
    if not np.any(data > 0):
        raise ValueError(f"label file {str(label_path)!r} is empty: no voxel has a class > 0")
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
        raise ValueError(f"label file {str(label_path)!r} holds non-integer values (a probability map?): "
                         "expected class indices 0, 1, 2, ...")
    return image_shape  # type: ignore[return-value]


def pairs_from_arguments(images: Sequence[str | os.PathLike], labels: Sequence[str | os.PathLike]
                         ) -> list[dict[str, str]]:
    """``--image a --label b`` (repeated) as ``[{"image": a, "label": b}, ...]``, checked.

    A single entry of ``images`` that is a folder is expanded with :func:`find_volume_pairs`
    (``labels`` must then be empty).
    """
    images, labels = list(images or []), list(labels or [])
    if len(images) == 1 and not labels and Path(images[0]).is_dir():
        return find_volume_pairs(images[0])
    if not images:
        raise ValueError("images must name at least one NIfTI file (or one folder)")
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels: pass one --label per --image")
    pairs = [{"image": os.fspath(i), "label": os.fspath(lab)} for i, lab in zip(images, labels)]
    for pair in pairs:
        check_volume_pair(pair["image"], pair["label"])
    return pairs


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and _is_nifti_name(p) and not p.name.startswith("."))


def _label_in(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def find_volume_pairs(folder: str | os.PathLike, check: bool = True) -> list[dict[str, str]]:
    """Image/label pairs in ``folder`` by the pairing rule in this module's docstring, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"folder {str(root)!r} is not a directory")
    pairs: list[tuple[Path, Path | None]] = []
    for image_dir, label_dir in (("imagesTr", "labelsTr"), ("images", "labels")):
        if (root / image_dir).is_dir() and (root / label_dir).is_dir():
            for image in _nifti_files(root / image_dir):
                stem = re.sub(r"_\d{4}$", "", _stem(image)) if image_dir == "imagesTr" else _stem(image)
                label = _label_in(root / label_dir, stem) or _label_in(root / label_dir, _stem(image))
                pairs.append((image, label))
            break
    else:
        files = _nifti_files(root)
        label_like = {p for p in files if _stem(p).endswith(_LABEL_TAGS)}
        for image in (p for p in files if p not in label_like):
            found = [lab for tag in _LABEL_TAGS if (lab := _label_in(root, _stem(image) + tag)) is not None]
            pairs.append((image, found[0] if found else None))
    if not pairs:
        raise ValueError(f"folder {str(root)!r} holds no NIfTI images "
                         "(see medadapt.data.volumes for the layout)")
    missing = [str(image) for image, label in pairs if label is None]
    if missing:
        raise ValueError(f"no label found for image file {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    result = [{"image": os.fspath(image), "label": os.fspath(label)} for image, label in pairs]
    if check:
        for pair in result:
            check_volume_pair(pair["image"], pair["label"])
    return result


INTENSITY_MODES = ("window", "percentile", "minmax")  # or None: intensities as stored


def volume_preprocessing_options(**chosen) -> dict:
    """Every keyword argument of :func:`build_volume_preprocessing` but ``keys``: its defaults updated by
    ``chosen`` (what a run records, so a later change of a default does not change how its volumes are read).

    Raises:
        ValueError naming an unknown option or a value :func:`build_volume_preprocessing` refuses.
    """
    defaults = {name: p.default for name, p in inspect.signature(build_volume_preprocessing).parameters.items()
                if name != "keys"}
    unknown = sorted(set(chosen) - set(defaults))
    if unknown:
        raise ValueError(f"unknown volume preprocessing options {unknown}; expected some of {sorted(defaults)}")
    options = {**defaults, **chosen}
    if options["intensity"] not in (*INTENSITY_MODES, None):
        raise ValueError(f"intensity must be one of {INTENSITY_MODES} or None, got {options['intensity']!r}")
    if options["crop_foreground"] not in (None, "image", "label"):
        raise ValueError(f"crop_foreground must be 'image', 'label' or None, got {options['crop_foreground']!r}")
    if options["orientation"] is not None and not isinstance(options["orientation"], str):
        raise ValueError(f"orientation must be axis codes such as 'RAS' or None, got {options['orientation']!r}")
    for key in ("window", "percentiles", "pixdim"):
        if isinstance(options[key], list):
            options[key] = tuple(options[key])
    return options


def build_volume_preprocessing(keys: Sequence[str] = ("image", "label"), pixdim: Sequence[float] | None = None,
                               orientation: str | None = "RAS", intensity: str | None = "percentile",
                               window: tuple[float, float] = (-175.0, 250.0),
                               percentiles: tuple[float, float] = (0.5, 99.5), crop_foreground: str | None = "image",
                               margin: int = 2):
    """MONAI dictionary transforms applied to loaded volumes: ``Orientationd → Spacingd → intensity →
    CropForegroundd``, the part of :func:`build_volume_transforms` after loading.

    ``keys[0]`` is the image (bilinear, intensity-scaled, the crop's source), the other keys are class maps
    (nearest neighbour). Every spatial step is invertible: MONAI's ``Invertd`` with this transform maps a
    prediction made on the preprocessed image back onto the file's own voxel grid
    (:mod:`medadapt.train.segment3d`). Options as in :func:`build_volume_transforms`.
    """
    transforms = require("monai.transforms", "volume transforms")
    keys = list(keys)
    image_key, class_keys = keys[0], keys[1:]
    steps = []
    if orientation:
        steps.append(transforms.Orientationd(keys=keys, axcodes=orientation,
                                                labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if pixdim is not None:
        if len(pixdim) != 3 or any(float(p) <= 0 for p in pixdim):
            raise ValueError(f"pixdim must be three positive spacings in mm, got {pixdim!r}")
        steps.append(transforms.Spacingd(keys=keys, pixdim=tuple(float(p) for p in pixdim),
                                         mode=["bilinear"] + ["nearest"] * len(class_keys)))
    if intensity == "window":
        steps.append(transforms.ScaleIntensityRanged(keys=image_key, a_min=window[0], a_max=window[1],
                                                     b_min=0.0, b_max=1.0, clip=True))
    elif intensity == "percentile":
        steps.append(transforms.ScaleIntensityRangePercentilesd(keys=image_key, lower=percentiles[0],
                                                                upper=percentiles[1], b_min=0.0, b_max=1.0,
                                                                clip=True))
    elif intensity == "minmax":
        steps.append(transforms.ScaleIntensityd(keys=image_key, minv=0.0, maxv=1.0))
    elif intensity is not None:
        raise ValueError(f"intensity must be 'window', 'percentile', 'minmax' or None, got {intensity!r}")
    if crop_foreground not in (None, "image", "label"):
        raise ValueError(f"crop_foreground must be 'image', 'label' or None, got {crop_foreground!r}")
    if crop_foreground is not None:
        source = image_key if crop_foreground == "image" else (class_keys[0] if class_keys else None)
        if source is None:
            raise ValueError("crop_foreground='label' needs a class-map key besides the image")
        steps.append(transforms.CropForegroundd(keys=keys, source_key=source, margin=margin, allow_smaller=True))
    return transforms.Compose(steps)


def build_volume_transforms(pixdim: Sequence[float] | None = None, orientation: str | None = "RAS",
                            intensity: str | None = "percentile",
                            window: tuple[float, float] = (-175.0, 250.0),
                            percentiles: tuple[float, float] = (0.5, 99.5), crop_foreground: str | None = "image",
                            margin: int = 2):
    """MONAI dictionary transforms for keys ``image`` (float) and ``label`` (class index).

    ``LoadImaged → EnsureChannelFirstd → ResampleToMatchd → Orientationd → Spacingd → intensity →
    CropForegroundd``; ``ResampleToMatchd`` puts the label on the image's voxel grid (nearest neighbour,
    zeros outside the label's field of view; a no-op when the affines agree within 1e-3);
    intensity is ``"window"`` (``ScaleIntensityRanged``: ``[a, b] → [0, 1]``, clipped, e.g. CT HU
    [−175, 250]), ``"percentile"`` (``ScaleIntensityRangePercentilesd``: the given percentiles
    → [0, 1], clipped; for MRI), ``"minmax"`` (``ScaleIntensityd``: the volume's minimum and maximum → 0
    and 1) or None. ``crop_foreground="image"`` keeps the bounding box of
    ``image > 0`` plus ``margin`` voxels, ``"label"`` that of ``label > 0``, None no crop.
    The steps after loading are :func:`build_volume_preprocessing`.
    """
    transforms = require("monai.transforms", "volume transforms")
    keys = ["image", "label"]
    loading = [transforms.LoadImaged(keys=keys, image_only=True),
               transforms.EnsureChannelFirstd(keys=keys),
               transforms.ResampleToMatchd(keys="label", key_dst="image", mode="nearest", padding_mode="zeros")]
    preprocessing = build_volume_preprocessing(keys, pixdim, orientation, intensity, window, percentiles,
                                               crop_foreground, margin)
    return transforms.Compose(loading + list(preprocessing.transforms))


def load_volume_pairs(pairs: Sequence[dict[str, str]], check: bool = True,
                      **transform_kwargs) -> list[dict[str, np.ndarray]]:
    """Check and load pairs: ``[{"image": float32 (1, X, Y, Z), "label": int64 (1, X, Y, Z), ...}]``.

    ``check=False`` skips :func:`check_volume_pair` for pairs that were checked already (those from
    :func:`pairs_from_arguments`, :func:`find_volume_pairs` or ``resolve_volume_pairs``): it reads every label.
    ``transform_kwargs`` go to :func:`build_volume_transforms`. The file names are kept under
    ``image_path`` / ``label_path``. A label with another affine than its image is resampled onto the
    image's voxel grid first (nearest neighbour), so both pair voxels at the same world position.

    Raises:
        ValueError naming the files: a check of :func:`check_volume_pair` fails, or no labelled voxel
        lies inside the image once the label is on the image's grid.
    """
    transform = build_volume_transforms(**transform_kwargs)
    volumes = []
    for pair in pairs:
        if check:
            check_volume_pair(pair["image"], pair["label"])
        data = transform({"image": pair["image"], "label": pair["label"]})
        image = np.asarray(data["image"], dtype=np.float32)
        label = np.rint(np.asarray(data["label"])).astype(np.int64)
        if image.shape != label.shape:
            raise ValueError(f"label file {pair['label']!r} does not match image {pair['image']!r} after "
                             f"resampling: {label.shape} vs {image.shape}")
        if not np.any(label > 0):
            raise ValueError(f"label file {pair['label']!r} has no voxel > 0 inside image {pair['image']!r} "
                             "once resampled onto the image's grid: do their affines place them apart?")
        volumes.append({"image": image, "label": label,
                        "image_path": pair["image"], "label_path": pair["label"]})
    return volumes
