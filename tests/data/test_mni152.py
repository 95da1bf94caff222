"""The bundled MNI152 tissue volume: label rule, CSF option, cached NIfTI files."""

import numpy as np
import pytest

pytest.importorskip("nilearn")
nib = pytest.importorskip("nibabel")

from nilearn import datasets  # noqa: E402

from medadapt.data import TissueVolume, load_mni152_tissue, resolve_volume_pairs, write_mni152_tissue  # noqa: E402


@pytest.fixture(scope="module")
def tissue() -> TissueVolume:
    return load_mni152_tissue(resolution=2)


@pytest.fixture(scope="module")
def maps() -> tuple[np.ndarray, np.ndarray]:
    return (datasets.load_mni152_gm_template(resolution=2).get_fdata(),
            datasets.load_mni152_wm_template(resolution=2).get_fdata())


def test_shapes_types_and_affine(tissue):
    assert tissue.image.shape == tissue.label.shape == (99, 117, 95)
    assert tissue.image.dtype == np.float32 and tissue.label.dtype == np.int64
    np.testing.assert_allclose(np.diag(tissue.affine)[:3], [2.0, 2.0, 2.0])
    assert tissue.class_names == ("background", "grey_matter", "white_matter") and tissue.num_classes == 3
    assert set(np.unique(tissue.label)) == {0, 1, 2}


def test_label_is_thresholded_argmax(tissue, maps):
    gm, wm = maps
    brain = gm + wm >= 0.5
    np.testing.assert_array_equal(tissue.label == 0, ~brain)
    np.testing.assert_array_equal(tissue.label == 2, brain & (wm > gm))
    np.testing.assert_array_equal(tissue.label == 1, brain & (gm >= wm))
    # a few percent of the head box is each tissue: a sanity bound, not a tautology
    assert 0.05 < (tissue.label == 1).mean() < 0.2 and 0.03 < (tissue.label == 2).mean() < 0.15


def test_brain_threshold_grows_background(tissue):
    strict = load_mni152_tissue(resolution=2, brain_threshold=0.9)
    assert (strict.label == 0).sum() > (tissue.label == 0).sum()
    assert np.all(strict.label[tissue.label == 0] == 0)


def test_csf_map_adds_a_fourth_class(tissue):
    csf = np.zeros(tissue.label.shape)
    csf[40:60, 50:70, 40:50] = 1.0  # CSF certain there, wins the argmax
    with_csf = load_mni152_tissue(resolution=2, csf_map=csf)
    assert with_csf.class_names[-1] == "csf"
    assert np.all(with_csf.label[40:60, 50:70, 40:50] == 3)
    outside = np.ones_like(csf, dtype=bool)
    outside[40:60, 50:70, 40:50] = False
    np.testing.assert_array_equal(with_csf.label[outside], tissue.label[outside])
    with pytest.raises(ValueError, match="csf_map"):
        load_mni152_tissue(resolution=2, csf_map=np.zeros((3, 3, 3)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="resolution"):
        load_mni152_tissue(resolution=0)
    with pytest.raises(ValueError, match="brain_threshold"):
        load_mni152_tissue(brain_threshold=1.5)


def test_write_files_round_trip_and_reuse(tmp_path, tissue):
    image_path, label_path = write_mni152_tissue(tmp_path, resolution=2)
    image, label = nib.load(image_path), nib.load(label_path)
    np.testing.assert_array_equal(np.asarray(label.dataobj), tissue.label)
    np.testing.assert_allclose(image.get_fdata(), tissue.image, atol=1e-6)
    np.testing.assert_allclose(image.affine, tissue.affine)
    stamp = image_path.stat().st_mtime_ns
    assert write_mni152_tissue(tmp_path, resolution=2) == (image_path, label_path)
    assert image_path.stat().st_mtime_ns == stamp
    assert not [p for p in image_path.parent.iterdir() if "tmp" in p.name]
    pairs, is_demo = resolve_volume_pairs(cache_dir=tmp_path)  # no user files: the demo volume
    assert is_demo and pairs == [{"image": str(image_path), "label": str(label_path)}]
