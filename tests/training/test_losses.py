from __future__ import annotations

import pytest
import torch

from slidejob.training.config import LOSSES
from slidejob.training.losses import make_loss, soft_dice_loss


def test_all_negative_prediction_is_not_rewarded() -> None:
    # 15 % cancer: the default loss must score "everything background" worse
    # than a prediction that finds the cancer with little confidence.
    truth = torch.zeros(1, 1, 20, 20)
    truth[..., :3, :20] = 1  # 60 of 400 pixels
    all_negative = torch.full_like(truth, -6.0)
    hedging = torch.where(truth > 0, torch.tensor(0.5), torch.tensor(-1.0))
    default = make_loss("bce-dice", pos_weight=340 / 60)
    assert default(all_negative, truth) > default(hedging, truth)
    assert soft_dice_loss(all_negative, truth) > 0.95


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_is_finite_on_an_all_negative_batch_and_has_gradients(name: str) -> None:
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    loss = make_loss(name, pos_weight=3.0)(logits, torch.zeros(2, 1, 8, 8))
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None and torch.isfinite(logits.grad).all()


def test_pos_weight_raises_the_cost_of_missed_cancer() -> None:
    truth = torch.ones(1, 1, 4, 4)
    logits = torch.full_like(truth, -2.0)
    assert make_loss("bce", pos_weight=4.0)(logits, truth) == pytest.approx(
        4.0 * float(make_loss("bce", pos_weight=1.0)(logits, truth))
    )


def test_bad_loss_arguments() -> None:
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss("mse")
    with pytest.raises(ValueError, match="pos_weight"):
        make_loss("bce", pos_weight=0)
