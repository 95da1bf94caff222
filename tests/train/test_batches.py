"""Batches with prompts sampled from labels."""

import pytest
import torch

from medadapt.train import PromptCollate, add_prompts


def _label():
    label = torch.zeros(2, 8, 10, dtype=torch.long)
    label[0, 1:4, 2:7] = 1
    label[0, 5:7, 0:3] = 2
    label[1, 2:6, 4:9] = 2
    return label


def test_box_prompts_are_the_masks_bounding_boxes_without_jitter():
    batch = add_prompts({"image": torch.rand(2, 3, 8, 10), "label": _label()}, [1, 2], "box", jitter=0.0)
    assert batch["target"].shape == (2, 2, 8, 10) and batch["target"].dtype == torch.bool
    assert torch.equal(batch["target"][:, 1], _label() == 2)
    assert batch["present"].tolist() == [[True, True], [False, True]]
    assert batch["boxes"][0].tolist() == [[2, 1, 6, 3], [0, 5, 2, 6]]
    assert batch["boxes"][1, 1].tolist() == [4, 2, 8, 5]
    assert batch["label_size"] == (8, 10)


def test_point_prompts_fall_inside_their_mask():
    batch = add_prompts({"image": torch.rand(2, 3, 8, 10), "label": _label()}, [1, 2], "point", num_points=2,
                        generator=0)
    assert batch["points"].shape == (2, 2, 2, 2) and batch["point_labels"].shape == (2, 2, 2)
    for n, k, p in torch.nonzero(batch["point_labels"] == 1).tolist():
        x, y = batch["points"][n, k, p].long().tolist()
        assert batch["target"][n, k, y, x]
    assert (batch["point_labels"][1, 0] == -1).all()  # class 1 absent from slice 1: padding


def test_collate_stacks_and_squeezes_one_slice_slabs():
    samples = [{"image": torch.rand(3, 1, 8, 10), "label": _label()[i:i + 1]} for i in range(2)]
    batch = PromptCollate([2], "box", jitter=0.2, seed=0, squeeze_depth=True)(samples)
    assert batch["image"].shape == (2, 3, 8, 10) and batch["boxes"].shape == (2, 1, 4)
    again = PromptCollate([2], "box", jitter=0.2, seed=0, squeeze_depth=True)(samples)
    assert torch.equal(batch["boxes"], again["boxes"])
    with pytest.raises(ValueError, match="one-slice"):
        PromptCollate([2], squeeze_depth=True)([{"image": torch.rand(3, 2, 8, 10), "label": _label()}])


@pytest.mark.parametrize("kwargs, match", [({"prompt": "mask"}, "prompt"), ({"classes": []}, "classes")])
def test_bad_collate_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptCollate(**{"classes": [1], **kwargs})
