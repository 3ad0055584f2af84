"""Losses that do not reward calling everything background.

Plain cross-entropy on tiles that are mostly background is minimised early by
predicting "no cancer" everywhere, and on small batches it spikes whenever a
batch happens to hold a lot of cancer.  Two remedies, combinable:

- weight the positive pixels (``pos_weight`` = negatives / positives of the
  training set), so both classes carry the same total weight;
- add a soft Dice term, pooled over the whole batch: it measures overlap of the
  cancer class only, so an all-negative prediction scores its worst (1.0).

Focal loss (Lin et al., 2017) down-weights pixels that are already right and is
offered as the alternative to weighted BCE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from slidejob.training.config import LOSSES

__all__ = ["LOSSES", "focal_loss", "make_loss", "soft_dice_loss"]


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_dice_loss(logits: torch.Tensor, truth: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of sigmoid(``logits``) against ``truth``, pooled over the whole batch.

    Pooling over the batch (not per tile) keeps all-negative tiles from
    producing 0/0; ``smooth`` keeps an all-negative batch finite.

    >>> round(float(soft_dice_loss(torch.full((1, 1, 2, 2), 20.0), torch.ones(1, 1, 2, 2))), 6)
    0.0
    """
    probabilities = torch.sigmoid(logits.float())
    truth = truth.float()
    overlap = (probabilities * truth).sum()
    return 1.0 - (2.0 * overlap + smooth) / (probabilities.sum() + truth.sum() + smooth)


def focal_loss(
    logits: torch.Tensor, truth: torch.Tensor, gamma: float = 2.0, alpha: float = 0.5
) -> torch.Tensor:
    """Mean focal loss; ``alpha`` weighs positives, ``1 - alpha`` negatives."""
    logits, truth = logits.float(), truth.float()
    bce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    p_correct = torch.exp(-bce)
    weight = alpha * truth + (1 - alpha) * (1 - truth)
    return (weight * (1 - p_correct) ** gamma * bce).mean()


def make_loss(name: str, *, pos_weight: float = 1.0, dice_weight: float = 1.0) -> LossFn:
    """The loss function ``(logits, truth) -> scalar`` called ``name``.

    Parameters
    ----------
    name
        One of :data:`LOSSES`.
    pos_weight
        Weight of positive pixels in BCE (negatives / positives balances the classes).
        For focal loss it sets ``alpha = pos_weight / (1 + pos_weight)``.
    dice_weight
        Weight of the soft Dice term in the ``*-dice`` losses.
    """
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    if pos_weight <= 0:
        raise ValueError(f"pos_weight must be positive, got {pos_weight}")

    def pixel_term(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        if name.startswith("focal"):
            return focal_loss(logits, truth, alpha=pos_weight / (1.0 + pos_weight))
        weight = torch.tensor(pos_weight, dtype=torch.float32, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), truth.float(), pos_weight=weight)

    def loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        value = pixel_term(logits, truth)
        if name.endswith("-dice"):
            value = value + dice_weight * soft_dice_loss(logits, truth)
        return value

    return loss
