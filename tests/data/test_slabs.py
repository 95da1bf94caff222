"""Slabs of D consecutive slices: contents, ranges, resizing, errors."""

import numpy as np
import pytest
import torch

from medadapt.data import TissueVolume, VolumeSlabDataset, split_slice_range


def make_volume(shape=(5, 6, 11), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    label = np.zeros(shape, np.int64)
    label[1:4, 2:5, 3:9] = 1
    label[2, 3, 5:7] = 2
    return {"image": image, "label": label}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slab_holds_consecutive_slices(axis):
    vol = make_volume()
    ds = VolumeSlabDataset([vol], depth=2, axis=axis, stride=1, min_foreground=0)
    n = vol["image"].shape[axis]
    assert len(ds) == n - 1
    item = ds[1]
    expected = torch.from_numpy(np.moveaxis(vol["image"], axis, 0)[1:3])
    assert item["image"].shape == (1, 2, *expected.shape[1:]) and item["start"] == 1 and item["volume"] == 0
    torch.testing.assert_close(item["image"][0], expected, rtol=0, atol=0)
    torch.testing.assert_close(item["label"], torch.from_numpy(np.moveaxis(vol["label"], axis, 0)[1:3]))


def test_range_stride_and_foreground_filter():
    vol = make_volume()  # foreground on axis-2 slices 3..8
    ds = VolumeSlabDataset([vol], depth=3, axis=2, slice_range=range(1, 10), stride=2)
    assert [s for _, s in ds.index] == [1, 3, 5, 7]  # start 1 covers slice 3; all within range(1, 10)
    ds_all = VolumeSlabDataset([vol, make_volume(seed=1)], depth=3, axis=2, min_foreground=0)
    assert [i for i, _ in ds_all.index] == [0] * 3 + [1] * 3
    strict = VolumeSlabDataset([vol], depth=1, axis=2, min_foreground=1)
    assert [s for _, s in strict.index] == [3, 4, 5, 6, 7, 8]


def test_resize_channels_and_label_values():
    ds = VolumeSlabDataset([make_volume()], depth=4, axis=2, slice_size=9, channels=3, min_foreground=0)
    item = ds[0]
    assert item["image"].shape == (3, 4, 9, 9) and item["label"].shape == (4, 9, 9)
    assert torch.equal(item["image"][0], item["image"][2]) and item["label"].dtype == torch.int64
    assert set(item["label"].unique().tolist()) <= {0, 1, 2}


def test_channel_first_volumes_and_tissue_volume_objects():
    vol = make_volume()
    tissue = TissueVolume(vol["image"], vol["label"], np.eye(4), ("bg", "a", "b"))
    a = VolumeSlabDataset([{"image": vol["image"][None], "label": vol["label"][None]}], depth=2)
    b = VolumeSlabDataset([tissue], depth=2)
    assert a.index == b.index and torch.equal(a[0]["image"], b[0]["image"])


def test_errors():
    vol = make_volume()
    with pytest.raises(ValueError, match="depth"):
        VolumeSlabDataset([vol], depth=0)
    with pytest.raises(ValueError, match="axis"):
        VolumeSlabDataset([vol], depth=1, axis=3)
    with pytest.raises(ValueError, match="no slab of depth 12"):
        VolumeSlabDataset([vol], depth=12)
    with pytest.raises(ValueError, match="label shape"):
        VolumeSlabDataset([{"image": vol["image"], "label": vol["label"][:, :, :5]}], depth=1)
    with pytest.raises(ValueError, match=r"volumes\[0\]\['image'\] must be 3D"):
        VolumeSlabDataset([{"image": vol["image"][0], "label": vol["label"][0]}], depth=1)
    with pytest.raises(ValueError, match="slice_range"):
        VolumeSlabDataset([vol], depth=1, slice_range=range(0, 6, 2))  # a step would be ignored


def test_split_slice_range():
    train, held = split_slice_range(95, 0.25, depth=8)
    assert train == range(0, 71) and held == range(71, 95)
    train, held = split_slice_range(10, 0.01, depth=3, held_out="start")
    assert held == range(0, 3) and train == range(3, 10)
    with pytest.raises(ValueError, match="2·depth"):
        split_slice_range(5, 0.5, depth=3)
    with pytest.raises(ValueError, match="held_out"):
        split_slice_range(10, 0.5, held_out="middle")


@pytest.mark.parametrize("box", [(20, 60, 30, 90), (7, 41, 55, 112), (50, 97, 3, 40)])
def test_resized_label_aligns_with_resized_image(box):
    # image == label mask: the resized label must cover the same pixels as the resized image (> 0.5),
    # also for a non-integer scale (99 x 117 -> 128); plain "nearest" shifted it by ~half a pixel.
    r0, r1, c0, c1 = box
    label = np.zeros((99, 117, 1), np.int64)
    label[r0:r1, c0:c1] = 1
    item = VolumeSlabDataset([{"image": label.astype(np.float32), "label": label}], depth=1, slice_size=128)[0]
    image_mask, resized = item["image"][0, 0] > 0.5, item["label"][0].bool()
    dice = 2 * (image_mask & resized).sum() / (image_mask.sum() + resized.sum())
    assert dice >= 0.99
    coords = torch.arange(128.0)
    for dim in (0, 1):
        centroid = [(m.float().sum(1 - dim) * coords).sum() / m.sum() for m in (image_mask, resized)]
        assert abs(float(centroid[0] - centroid[1])) < 0.1
