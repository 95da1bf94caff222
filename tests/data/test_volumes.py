"""NIfTI pairs: validation errors name the file, folder pairing rules, MONAI loading."""

import warnings
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from medadapt.data import (  # noqa: E402
    build_volume_transforms,
    check_volume_pair,
    find_volume_pairs,
    load_volume_pairs,
    pairs_from_arguments,
    resolve_volume_pairs,
)

SHAPE = (7, 6, 5)


def write_nifti(path: Path, data: np.ndarray, spacing: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path


def volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.uniform(10, 110, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[2:5, 1:4, 1:3] = 1
    label[3, 4, 3] = 2
    return image, label


def write_pair(folder: Path, image_name: str, label_name: str, seed: int = 0) -> tuple[Path, Path]:
    image, label = volume(seed)
    return write_nifti(folder / image_name, image), write_nifti(folder / label_name, label)


def test_good_pair_returns_shape(tmp_path):
    assert check_volume_pair(*write_pair(tmp_path, "a.nii.gz", "a_label.nii.gz")) == SHAPE


def test_trailing_singleton_dimension_is_3d(tmp_path):
    image, label = volume()
    i = write_nifti(tmp_path / "i.nii", image[..., None])
    lab = write_nifti(tmp_path / "l.nii", label)
    assert check_volume_pair(i, lab) == SHAPE


def test_label_shape_mismatch_names_label(tmp_path):
    image, label = volume()
    i = write_nifti(tmp_path / "img.nii.gz", image)
    lab = write_nifti(tmp_path / "wrong_shape.nii.gz", label[:, :, :4])
    with pytest.raises(ValueError, match=r"wrong_shape\.nii\.gz.*shape \(7, 6, 4\)"):
        check_volume_pair(i, lab)


def test_empty_label_names_file(tmp_path):
    image, label = volume()
    i = write_nifti(tmp_path / "img.nii.gz", image)
    lab = write_nifti(tmp_path / "blank.nii.gz", np.zeros_like(label))
    with pytest.raises(ValueError, match=r"blank\.nii\.gz.*empty"):
        check_volume_pair(i, lab)


def test_probability_map_as_label_names_file(tmp_path):
    image, label = volume()
    i = write_nifti(tmp_path / "img.nii.gz", image)
    lab = write_nifti(tmp_path / "gm_prob.nii.gz", label * np.float32(0.4))
    with pytest.raises(ValueError, match=r"gm_prob\.nii\.gz.*non-integer"):
        check_volume_pair(i, lab)


def test_non_nifti_files_name_file(tmp_path):
    _, lab = write_pair(tmp_path, "a.nii.gz", "a_label.nii.gz")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.txt.*not NIfTI"):
        check_volume_pair(text, lab)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match=r"garbage\.nii\.gz.*not a readable NIfTI"):
        check_volume_pair(garbage, lab)
    with pytest.raises(ValueError, match=r"missing\.nii\.gz.*does not exist"):
        check_volume_pair(tmp_path / "missing.nii.gz", lab)


def test_2d_file_names_file(tmp_path):
    image, label = volume()
    flat = write_nifti(tmp_path / "slice2d.nii.gz", image[:, :, 0])
    lab = write_nifti(tmp_path / "l.nii.gz", label)
    with pytest.raises(ValueError, match=r"slice2d\.nii\.gz.*3D"):
        check_volume_pair(flat, lab)
    four_d = write_nifti(tmp_path / "multi.nii.gz", np.stack([image, image], -1))
    with pytest.raises(ValueError, match=r"multi\.nii\.gz.*3D"):
        check_volume_pair(four_d, lab)


def test_pairs_from_arguments(tmp_path):
    a = write_pair(tmp_path, "a.nii.gz", "a_seg.nii.gz", 0)
    b = write_pair(tmp_path, "b.nii", "b_seg.nii", 1)
    pairs = pairs_from_arguments([a[0], b[0]], [a[1], b[1]])
    assert pairs == [{"image": str(a[0]), "label": str(a[1])}, {"image": str(b[0]), "label": str(b[1])}]
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        pairs_from_arguments([a[0], b[0]], [a[1]])
    assert pairs_from_arguments([str(tmp_path)], []) == find_volume_pairs(tmp_path)


@pytest.mark.parametrize("layout", ["decathlon", "images_labels", "flat"])
def test_folder_pairing_rules(tmp_path, layout):
    if layout == "decathlon":
        write_pair(tmp_path, "imagesTr/case1_0000.nii.gz", "labelsTr/case1.nii.gz", 0)
        write_pair(tmp_path, "imagesTr/case2.nii.gz", "labelsTr/case2.nii.gz", 1)
        expected = [("imagesTr/case1_0000.nii.gz", "labelsTr/case1.nii.gz"),
                    ("imagesTr/case2.nii.gz", "labelsTr/case2.nii.gz")]
    elif layout == "images_labels":
        write_pair(tmp_path, "images/x.nii.gz", "labels/x.nii.gz", 0)
        write_pair(tmp_path, "images/y.nii", "labels/y.nii", 1)
        expected = [("images/x.nii.gz", "labels/x.nii.gz"), ("images/y.nii", "labels/y.nii")]
    else:
        write_pair(tmp_path, "p1.nii.gz", "p1_label.nii.gz", 0)
        write_pair(tmp_path, "p2.nii.gz", "p2_mask.nii", 1)
        expected = [("p1.nii.gz", "p1_label.nii.gz"), ("p2.nii.gz", "p2_mask.nii")]
    found = find_volume_pairs(tmp_path)
    assert [(str(Path(p["image"]).relative_to(tmp_path)), str(Path(p["label"]).relative_to(tmp_path)))
            for p in found] == expected


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        find_volume_pairs(tmp_path / "nope")
    with pytest.raises(ValueError, match="no NIfTI images"):
        find_volume_pairs(tmp_path)
    write_pair(tmp_path, "p1.nii.gz", "p1_label.nii.gz")
    image, _ = volume()
    write_nifti(tmp_path / "orphan.nii.gz", image)
    with pytest.raises(ValueError, match=r"orphan\.nii\.gz"):
        find_volume_pairs(tmp_path)


def test_resolve_prefers_user_files(tmp_path):
    a = write_pair(tmp_path, "a.nii.gz", "a_label.nii.gz")
    pairs, is_demo = resolve_volume_pairs([a[0]], [a[1]])
    assert not is_demo and pairs[0]["label"] == str(a[1])
    with pytest.raises(ValueError, match="not both"):
        resolve_volume_pairs([a[0]], [a[1]], data_dir=tmp_path)


def test_load_window_spacing_and_label_crop(tmp_path):
    image, label = volume()
    i = write_nifti(tmp_path / "ct.nii.gz", image, spacing=2.0)
    lab = write_nifti(tmp_path / "ct_label.nii.gz", label, spacing=2.0)
    pair = [{"image": str(i), "label": str(lab)}]
    (out,) = load_volume_pairs(pair, intensity="window", window=(10.0, 110.0), crop_foreground=None)
    assert out["image"].shape == out["label"].shape == (1, *SHAPE)
    np.testing.assert_allclose(out["image"][0], (image - 10.0) / 100.0, atol=1e-5)
    np.testing.assert_array_equal(out["label"][0], label)
    (fine,) = load_volume_pairs(pair, pixdim=(1.0, 1.0, 1.0), intensity="percentile", crop_foreground=None)
    assert fine["image"].shape[1:] == tuple(2 * s - 1 for s in SHAPE)
    assert set(np.unique(fine["label"])) <= {0, 1, 2} and fine["label"].dtype == np.int64
    assert 0.0 <= fine["image"].min() and fine["image"].max() <= 1.0
    (cropped,) = load_volume_pairs(pair, intensity=None, crop_foreground="label", margin=0)
    assert cropped["label"].shape == (1, 3, 4, 3)  # bounding box of label > 0
    np.testing.assert_array_equal(cropped["label"][0], label[2:5, 1:5, 1:4])


def _write_with_affine(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


@pytest.mark.parametrize("pixdim", [None, (1.0, 1.0, 1.0)])
def test_label_with_a_shifted_affine_is_resampled_onto_the_image_grid(tmp_path, pixdim):
    mask = np.zeros((12, 12, 12), np.float32)
    mask[4:8, 5:9, 3:7] = 1.0
    image = _write_with_affine(tmp_path / "s.nii.gz", mask * 100.0, np.eye(4))
    # the label's grid starts 3 mm further right (+x) and 2 mm lower: the same world positions sit at other voxels
    shifted = np.eye(4)
    shifted[:3, 3] = (3.0, 0.0, -2.0)
    label_data = np.zeros((12, 12, 12), np.uint8)
    label_data[1:5, 5:9, 5:9] = 1
    label = _write_with_affine(tmp_path / "s_label.nii.gz", label_data, shifted)
    with pytest.warns(UserWarning, match="resampled onto the image's voxel grid"):
        (out,) = load_volume_pairs([{"image": image, "label": label}], pixdim=pixdim, intensity=None,
                                   crop_foreground=None)
    assert out["label"].shape == out["image"].shape == (1, 12, 12, 12)
    np.testing.assert_array_equal(out["label"][0], mask.astype(np.int64))  # paired by world position


def test_float_noise_in_the_affine_is_no_resampling_and_far_labels_are_an_error(tmp_path):
    image_data, label_data = volume()
    image = _write_with_affine(tmp_path / "a.nii.gz", image_data, np.eye(4))
    noisy = np.eye(4)
    noisy[0, 3] = 1e-5
    label = _write_with_affine(tmp_path / "a_label.nii.gz", label_data, noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (out,) = load_volume_pairs([{"image": image, "label": label}], intensity=None, crop_foreground=None)
    np.testing.assert_array_equal(out["label"][0], label_data)
    far = np.eye(4)
    far[0, 3] = 100.0
    far_label = _write_with_affine(tmp_path / "b_label.nii.gz", label_data, far)
    with pytest.warns(UserWarning, match="different affines"), \
            pytest.raises(ValueError, match="b_label.nii.gz.*no voxel > 0 inside image.*a.nii.gz"):
        load_volume_pairs([{"image": image, "label": far_label}], intensity=None, crop_foreground=None)


def test_bad_transform_options():
    with pytest.raises(ValueError, match="intensity"):
        build_volume_transforms(intensity="zscore")
    with pytest.raises(ValueError, match="pixdim"):
        build_volume_transforms(pixdim=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="crop_foreground"):
        build_volume_transforms(crop_foreground=True)


def test_command_line_arguments(tmp_path):
    import argparse

    from medadapt.data import add_volume_arguments, volume_pairs_from_args

    a = write_pair(tmp_path, "a.nii.gz", "a_label.nii.gz", 0)
    b = write_pair(tmp_path, "b.nii.gz", "b_label.nii.gz", 1)
    parser = add_volume_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--image", str(a[0]), "--label", str(a[1]), "--image", str(b[0]), "--label", str(b[1])])
    pairs, is_demo = volume_pairs_from_args(args)
    assert not is_demo and [p["image"] for p in pairs] == [str(a[0]), str(b[0])]
    pairs, _ = volume_pairs_from_args(parser.parse_args(["--data-dir", str(tmp_path)]))
    assert [p["label"] for p in pairs] == [str(a[1]), str(b[1])]


def test_ct_window_and_spacing_arguments(tmp_path):
    """``--ct-window``/``--spacing`` reach the transforms: HU window scaling, resampled grid; bad values named."""
    import argparse

    from medadapt.data import add_volume_arguments, volume_transform_options

    parser = add_volume_arguments(argparse.ArgumentParser())
    assert volume_transform_options(parser.parse_args([])) == {}
    options = volume_transform_options(parser.parse_args(["--ct-window", "10", "110", "--spacing", "1", "1", "1"]))
    assert options == {"intensity": "window", "window": (10.0, 110.0), "pixdim": (1.0, 1.0, 1.0)}
    image, label = volume()
    pair = [{"image": str(write_nifti(tmp_path / "ct.nii.gz", image, spacing=2.0)),
             "label": str(write_nifti(tmp_path / "ct_label.nii.gz", label, spacing=2.0))}]
    (out,) = load_volume_pairs(pair, crop_foreground=None, **options)
    assert out["image"].shape[1:] == tuple(2 * s - 1 for s in SHAPE)  # 2 mm → 1 mm
    (coarse,) = load_volume_pairs(pair, crop_foreground=None, **{**options, "pixdim": (2.0, 2.0, 2.0)})
    np.testing.assert_allclose(coarse["image"][0], np.clip((image - 10.0) / 100.0, 0, 1), atol=1e-5)
    with pytest.raises(ValueError, match="--ct-window"):
        volume_transform_options(parser.parse_args(["--ct-window", "250", "-175"]))
    with pytest.raises(ValueError, match="--spacing"):
        volume_transform_options(parser.parse_args(["--spacing", "1", "0", "1"]))


def test_label_on_a_coarser_grid_of_another_shape_is_resampled(tmp_path):
    """A label at 2 mm (6³ voxels) for a 1 mm image (12³): other shape and affine, paired by world position."""
    mask = np.zeros((12, 12, 12), np.float32)
    mask[4:8, 2:6, 6:10] = 1.0
    image = _write_with_affine(tmp_path / "c.nii.gz", mask * 50.0, np.eye(4))
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = 0.5  # voxel centres of the 2 mm grid sit between the 1 mm ones
    label = _write_with_affine(tmp_path / "c_label.nii.gz", mask[::2, ::2, ::2].astype(np.uint8), coarse)
    with pytest.warns(UserWarning, match="resampled"):
        check_volume_pair(image, label)
        (out,) = load_volume_pairs([{"image": image, "label": label}], intensity=None, crop_foreground=None)
    assert out["label"].shape == (1, 12, 12, 12)
    np.testing.assert_array_equal(out["label"][0], mask.astype(np.int64))
