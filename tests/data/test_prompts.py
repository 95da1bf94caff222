"""Prompt sampling from labels: exact boxes, bounded jitter, points in the right regions, seeding."""

import pytest
import torch

from medadapt.data import class_masks, mask_bounding_boxes, sample_box_prompts, sample_point_prompts


def label_map() -> torch.Tensor:
    """Two slices of 9×13 (odd sizes); class 2 missing from slice 1."""
    label = torch.zeros(2, 9, 13, dtype=torch.long)
    label[0, 2:5, 3:10] = 1
    label[0, 7, 11] = 2
    label[1, 0:9, 12] = 1
    return label


def test_bounding_boxes_exact():
    boxes, present = mask_bounding_boxes(class_masks(label_map(), [1, 2, 3]))
    assert boxes.shape == (2, 3, 4) and present.tolist() == [[True, True, False], [True, False, False]]
    assert boxes[0, 0].tolist() == [3, 2, 9, 4]  # x0, y0, x1, y1 inclusive
    assert boxes[0, 1].tolist() == [11, 7, 11, 7]
    assert boxes[1, 0].tolist() == [12, 0, 12, 8]
    assert boxes[1, 1].tolist() == [0, 0, 0, 0] and boxes[0, 2].tolist() == [0, 0, 0, 0]


def test_box_jitter_zero_is_tight_box_and_batch_equals_per_slice():
    label = label_map()
    boxes, present = sample_box_prompts(label, [1, 2], jitter=0.0)
    for s in range(2):
        single, single_present = sample_box_prompts(label[s], [1, 2], jitter=0.0)
        assert torch.equal(boxes[s], single) and torch.equal(present[s], single_present)


def test_box_jitter_bounded_ordered_seeded():
    label = label_map().repeat(50, 1, 1)  # many draws
    tight, present = mask_bounding_boxes(class_masks(label, [1, 2]))
    boxes, _ = sample_box_prompts(label, [1, 2], jitter=0.2, generator=3)
    side = torch.stack([tight[..., 2] - tight[..., 0] + 1, tight[..., 3] - tight[..., 1] + 1], -1).repeat(1, 1, 2)
    assert torch.all((boxes - tight).abs() <= 0.2 * side + 0.5)
    assert torch.all(boxes[..., :2] <= boxes[..., 2:]) and boxes.min() >= 0
    assert torch.all(boxes[..., [0, 2]] <= 12) and torch.all(boxes[..., [1, 3]] <= 8)
    assert not torch.equal(boxes[present], tight[present])  # jitter moved something
    assert torch.equal(boxes, sample_box_prompts(label, [1, 2], jitter=0.2, generator=3)[0])
    assert not torch.equal(boxes, sample_box_prompts(label, [1, 2], jitter=0.2, generator=4)[0])
    assert torch.all(boxes[~present] == 0)


def test_points_inside_and_outside_masks():
    label = label_map().repeat(20, 1, 1)
    coords, labels, present = sample_point_prompts(label, [1], num_positive=3, num_negative=4, generator=0)
    assert coords.shape == (40, 1, 7, 2) and labels.shape == (40, 1, 7) and present.all()
    x, y = coords[..., 0].long(), coords[..., 1].long()
    value = label[torch.arange(40)[:, None, None], y, x]  # class under each point
    assert torch.all(labels[..., :3] == 1) and torch.all(value[..., :3] == 1)
    assert torch.all(labels[..., 3:] == 0) and torch.all(value[..., 3:] != 1)
    flat = (y * 13 + x)[:, 0]
    assert all(len(set(row[:3].tolist())) == 3 for row in flat)  # distinct positives


def test_box_region_negatives_and_padding():
    label = label_map()
    coords, labels, present = sample_point_prompts(label, [1, 2], num_positive=2, num_negative=3,
                                                   negative_region="box", generator=1)
    # slice 0, class 1: negatives inside its box (x 3..9, y 2..4) but the box is full -> padding
    assert labels[0, 0].tolist() == [1, 1, -1, -1, -1]
    # slice 0, class 2 is one pixel: one positive, one padding, no negatives inside a 1-pixel box
    assert labels[0, 1].tolist() == [1, -1, -1, -1, -1] and coords[0, 1, 0].tolist() == [11, 7]
    # slice 1, class 2 absent: all padding, zero coordinates
    assert not present[1, 1] and labels[1, 1].tolist() == [-1] * 5 and torch.all(coords[1, 1] == 0)
    wide = torch.zeros(11, 15, dtype=torch.long)
    wide[2:9, 2:9] = 1
    wide[4:7, 4:7] = 0  # a hole: the only in-box negatives
    c, lab, _ = sample_point_prompts(wide, [1], num_positive=0, num_negative=9, negative_region="box", generator=2)
    assert torch.all(lab == 0)
    assert torch.all((c >= 4) & (c <= 6))


def test_more_points_than_pixels_are_padding():
    label = torch.zeros(3, 4, dtype=torch.long)
    label[1, 1:3] = 1
    coords, labels, present = sample_point_prompts(label, [1], num_positive=15, num_negative=14, generator=0)
    assert present.all() and labels.shape == (1, 29)
    assert labels[0, :15].tolist() == [1, 1] + [-1] * 13  # the mask's 2 pixels, then padding
    assert labels[0, 15:].tolist() == [0] * 10 + [-1] * 4  # the 10 other pixels, then padding
    assert torch.all(coords[0, labels[0] == -1] == 0)


def test_points_cover_the_mask_uniformly_enough():
    label = torch.zeros(400, 5, 5, dtype=torch.long)
    label[:, 1:3, 1:4] = 1  # 6 pixels
    coords, _, _ = sample_point_prompts(label, [1], num_positive=1, generator=0)
    hits = torch.bincount((coords[:, 0, 0, 1] * 5 + coords[:, 0, 0, 0]).long(), minlength=25)
    assert (hits > 0).sum() == 6 and hits.max() < 120  # each pixel about 400/6 ≈ 67 times


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_positive"):
        sample_point_prompts(label_map(), [1], num_positive=0, num_negative=0)
    with pytest.raises(ValueError, match="negative_region"):
        sample_point_prompts(label_map(), [1], negative_region="ring")
    with pytest.raises(ValueError, match="jitter"):
        sample_box_prompts(label_map(), [1], jitter=-1)
    with pytest.raises(ValueError, match="classes"):
        sample_box_prompts(label_map(), [])
    with pytest.raises(ValueError, match="generator"):
        sample_box_prompts(label_map(), [1], generator="seed")


def test_interior_points_take_the_deepest_pixel_nearest_the_centre():
    from medadapt.data.prompts import interior_points

    masks = torch.zeros(2, 3, 9, 11, dtype=torch.bool)
    masks[0, 0, 2:7, 1:10] = True  # 5 x 9 rectangle: deepest row 4, columns 3..7 -> the centre column 5
    masks[0, 1, :, 0:3] = True  # a strip on the slice border: the border counts as outside
    ring = torch.zeros(9, 11, dtype=torch.bool)
    ring[1:8, 1:10] = True
    ring[3:6, 3:8] = False
    masks[1, 0] = ring
    xy, present = interior_points(masks)
    assert xy[0, 0].tolist() == [5.0, 4.0] and xy[0, 1].tolist() == [1.0, 4.0]
    x, y = (int(v) for v in xy[1, 0])
    assert ring[y, x]  # on the ring, not in its hole
    assert present.tolist() == [[True, True, False], [True, False, False]] and xy[1, 1].tolist() == [0.0, 0.0]
    single = torch.zeros(1, 4, 4, dtype=torch.bool)
    single[0, 3, 0] = True
    assert interior_points(single)[0].tolist() == [[0.0, 3.0]]


def test_interior_points_are_the_same_with_and_without_scipy(monkeypatch):
    import builtins

    from medadapt.data.prompts import interior_points

    torch.manual_seed(0)
    blobs = torch.nn.functional.max_pool2d(torch.rand(6, 1, 23, 19), 5, stride=1, padding=2)[:, 0] > 0.9
    blobs[5] = False  # an absent mask
    with_scipy = interior_points(blobs)
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    without = interior_points(blobs)
    assert torch.equal(with_scipy[0], without[0]) and torch.equal(with_scipy[1], without[1])
    x, y = with_scipy[0][:5].long().unbind(-1)
    assert blobs[torch.arange(5), y, x].all()
