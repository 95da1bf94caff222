"""Loss over present (slice, class) pairs; Dice per class from MONAI's DiceMetric; evaluate()."""

import pytest
import torch
from monai.losses import DiceCELoss

from medadapt.train import PromptedSegmentationLoss, dice_sums, evaluate


def _pairs():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.rand(3, 2, 6, 5) > 0.6
    present = torch.tensor([[True, False], [True, True], [False, True]])
    iou = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    return {"logits": logits, "iou": iou}, {"target": target, "present": present}


def test_loss_is_dice_ce_on_present_pairs_plus_iou_mse():
    out, batch = _pairs()
    keep = batch["present"].reshape(-1)
    logits = out["logits"].reshape(-1, 6, 5)[keep].unsqueeze(1)
    target = batch["target"].reshape(-1, 6, 5)[keep].unsqueeze(1).double()
    pred, truth = logits > 0, target.bool()
    actual = (pred & truth).flatten(1).sum(1) / (pred | truth).flatten(1).sum(1)
    expected = DiceCELoss(sigmoid=True)(logits, target) + torch.mean((out["iou"].reshape(-1)[keep] - actual) ** 2)
    torch.testing.assert_close(PromptedSegmentationLoss()(out, batch), expected)
    torch.testing.assert_close(PromptedSegmentationLoss(iou_weight=0)(out, batch),
                               DiceCELoss(sigmoid=True)(logits, target))


def test_absent_pairs_do_not_change_the_loss():
    out, batch = _pairs()
    loss = PromptedSegmentationLoss()(out, batch)
    moved = {"logits": out["logits"].detach().clone(), "iou": out["iou"].detach().clone()}
    moved["logits"][0, 1] += 5.0
    moved["iou"][2, 0] = -3.0
    torch.testing.assert_close(PromptedSegmentationLoss()(moved, batch), loss.detach())


def test_no_present_pair_gives_zero_loss_with_a_graph():
    out, batch = _pairs()
    batch["present"] = torch.zeros(3, 2, dtype=torch.bool)
    loss = PromptedSegmentationLoss()(out, batch)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(out["logits"].grad) == 0


def test_dice_sums_per_class():
    target = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    target[0, 0, :2] = True        # 8 pixels
    target[1, 0, :, :1] = True     # 4 pixels
    target[0, 1, 3, 3] = True      # class 1 present in slice 0 only
    logits = -torch.ones(2, 2, 4, 4)
    logits[0, 0, :1] = 1           # 4 of 8 right, nothing extra: Dice 2·4/12
    logits[1, 0, :, :2] = 1        # 4 right + 4 extra: Dice 2·4/12
    logits[0, 1, 3, 3] = 1         # perfect
    logits[1, 1] = 1               # class 1 absent in slice 1: not scored
    present = target.flatten(2).any(-1)
    sums, counts = dice_sums(logits, target, present)
    torch.testing.assert_close(sums, torch.tensor([4 / 3, 1.0], dtype=torch.float64))
    assert counts.tolist() == [2.0, 1.0]


class _Fixed(torch.nn.Module):
    """Returns the logits stored in the batch (a stand-in for PromptedSAM)."""

    def forward(self, batch):
        return {"logits": batch["fixed_logits"], "iou": torch.zeros(batch["present"].shape)}


def test_evaluate_means_over_slices_then_classes():
    target = torch.zeros(3, 2, 4, 4, dtype=torch.bool)
    target[:, 0, :2] = True
    target[0, 1, 0, 0] = True
    logits = torch.where(target, 1.0, -1.0)
    logits[2, 0] = -1.0                   # slice 2, class 0: Dice 0
    present = target.flatten(2).any(-1)
    batches = [{"fixed_logits": logits[:2], "target": target[:2], "present": present[:2]},
               {"fixed_logits": logits[2:], "target": target[2:], "present": present[2:]}]
    result = evaluate(_Fixed(), batches)
    assert result["dice_per_class"] == pytest.approx([2 / 3, 1.0])
    assert result["dice"] == pytest.approx((2 / 3 + 1.0) / 2) and result["pairs"] == [3.0, 1.0]
    assert evaluate(_Fixed(), [], num_classes=2)["dice"] == 0.0
    with pytest.raises(ValueError, match="num_classes"):
        evaluate(_Fixed(), [])
