"""The bundled demo volume: the MNI152 T1 template with a brain-tissue label, from nilearn.

The ICBM152 2009a T1 template and its grey- and white-matter probability maps ship inside the
``nilearn`` wheel (``nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz``), so
nothing is downloaded. The label of a voxel with probabilities ``p_gm``, ``p_wm`` (and ``p_csf``):

    label = 0                                   if p_gm + p_wm (+ p_csf) < brain_threshold
    label = 1 + argmax(p_gm, p_wm (, p_csf))    otherwise

i.e. the argmax over (background, grey, white[, CSF]) restricted to voxels that are brain with
probability at least ``brain_threshold``. The nilearn wheel has no CSF map; pass one (e.g. the
``csf`` file of ``nilearn.datasets.fetch_icbm152_2009``, downloaded by the user) as ``csf_map``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._optional import require

__all__ = ["TISSUE_CLASSES", "TissueVolume", "default_cache_dir", "load_mni152_tissue", "write_mni152_tissue"]

TISSUE_CLASSES = ("background", "grey_matter", "white_matter")


@dataclass(frozen=True)
class TissueVolume:
    """A T1 volume and its tissue label on the same voxel grid.

    Attributes:
        image: T1 intensities, float32, shape ``(X, Y, Z)``, in [0, 1] for the template.
        label: int64 class index per voxel, same shape (see ``class_names``).
        affine: 4×4 voxel-to-world (RAS+, mm) matrix.
        class_names: name of each label value, ``class_names[k]`` for label ``k``.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def default_cache_dir() -> Path:
    """``$MEDADAPT_CACHE`` or ``~/.cache/medadapt``."""
    return Path(os.environ.get("MEDADAPT_CACHE", Path.home() / ".cache" / "medadapt"))


def _csf_probabilities(csf_map, template) -> np.ndarray:
    """CSF probabilities on the template grid (resampled when a NIfTI on another grid is given)."""
    if isinstance(csf_map, np.ndarray):
        if csf_map.shape != template.shape:
            raise ValueError(f"csf_map must have the template shape {template.shape}, got {csf_map.shape}")
        return csf_map.astype(np.float64)
    nib = require("nibabel", "csf_map")
    image = nib.load(os.fspath(csf_map)) if isinstance(csf_map, (str, os.PathLike)) else csf_map
    if not hasattr(image, "affine"):
        raise ValueError(f"csf_map must be a path, a NIfTI image or an array, got {type(csf_map).__name__}")
    if image.shape[:3] != template.shape or not np.allclose(image.affine, template.affine):
        nilearn_image = require("nilearn.image", "csf_map resampling")
        image = nilearn_image.resample_to_img(image, template, interpolation="continuous")
    return np.asarray(image.get_fdata(), dtype=np.float64).reshape(template.shape)


def load_mni152_tissue(resolution: int = 2, brain_threshold: float = 0.5, csf_map=None) -> TissueVolume:
    """The MNI152 T1 template and its tissue label (0 background, 1 grey, 2 white matter[, 3 CSF]).

    Args:
        resolution: voxel size in mm (nilearn resamples the 1 mm template: 2 gives 99×117×95).
        brain_threshold: a voxel is brain when its summed tissue probability reaches this.
        csf_map: optional CSF probability map (path, NIfTI image, or array on the template grid);
            when given the label gets a fourth class, 3 = CSF.

    Returns:
        A :class:`TissueVolume` (float32 image, int64 label, affine, class names).
    """
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer (mm), got {resolution!r}")
    if not 0.0 < float(brain_threshold) <= 1.0:
        raise ValueError(f"brain_threshold must be in (0, 1], got {brain_threshold}")
    datasets = require("nilearn.datasets", "the MNI152 demo volume")
    template = datasets.load_mni152_template(resolution=int(resolution))
    probs = [datasets.load_mni152_gm_template(resolution=int(resolution)).get_fdata(),
             datasets.load_mni152_wm_template(resolution=int(resolution)).get_fdata()]
    names = list(TISSUE_CLASSES)
    if csf_map is not None:
        probs.append(_csf_probabilities(csf_map, template))
        names.append("csf")
    tissue = np.stack(probs)
    brain = tissue.sum(0) >= brain_threshold
    label = np.where(brain, 1 + tissue.argmax(0), 0).astype(np.int64)
    image = np.asarray(template.get_fdata(), dtype=np.float32)
    return TissueVolume(image, label, np.asarray(template.affine, dtype=np.float64), tuple(names))


def write_mni152_tissue(cache_dir: str | os.PathLike | None = None, resolution: int = 2,
                        brain_threshold: float = 0.5, csf_map=None) -> tuple[Path, Path]:
    """Write the demo volume as ``(image, label)`` NIfTI files for the path-based pipeline.

    Files are ``<cache_dir>/mni152/t1_<r>mm.nii.gz`` and ``tissue_<r>mm_t<threshold>[_csf].nii.gz``,
    reused when present, written through a temporary name and renamed (safe with several processes).

    Returns:
        ``(image_path, label_path)``.
    """
    nib = require("nibabel", "write_mni152_tissue")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "mni152"
    suffix = "_csf" if csf_map is not None else ""
    image_path = folder / f"t1_{resolution}mm.nii.gz"
    label_path = folder / f"tissue_{resolution}mm_t{brain_threshold:g}{suffix}.nii.gz"
    if image_path.is_file() and label_path.is_file() and csf_map is None:
        return image_path, label_path
    volume = load_mni152_tissue(resolution, brain_threshold, csf_map)
    folder.mkdir(parents=True, exist_ok=True)
    for path, data in ((image_path, volume.image), (label_path, volume.label.astype(np.uint8))):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
        nib.save(nib.Nifti1Image(data, volume.affine), os.fspath(tmp))
        os.replace(tmp, path)
    return image_path, label_path
