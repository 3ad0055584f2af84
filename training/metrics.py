"""Pixel metrics for binary segmentation, pooled over every pixel of a set of tiles.

Pure numpy, no torch: the same functions score training epochs and
``slidejob evaluate``.  Pooling (summing the confusion counts over all tiles,
then computing the ratios once) weighs every pixel equally; averaging per-tile
Dice instead would let a tile with three cancer pixels count as much as a tile
full of cancer.

Conventions for empty denominators: Dice and IoU are 1.0 when neither the
prediction nor the truth has a positive pixel (nothing to find, nothing
claimed: perfect agreement); sensitivity without positive pixels, specificity
without negative pixels and accuracy of zero pixels are NaN (undefined, written
as ``null`` in JSON), never silently 0 or 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "METRIC_NAMES",
    "PixelCounts",
    "ThresholdSweep",
    "all_negative_accuracy",
    "all_positive_dice",
    "dice",
    "iou",
    "metrics_from_counts",
    "pixel_accuracy",
    "pixel_counts",
    "sensitivity",
    "specificity",
]

#: Metric names in report order (CSV columns, table rows).
METRIC_NAMES = (
    "pixel_accuracy",
    "all_negative_accuracy",
    "dice",
    "iou",
    "sensitivity",
    "specificity",
    "all_positive_dice",
    "positive_fraction",
)


@dataclass(frozen=True)
class PixelCounts:
    """Confusion counts of a binary prediction, in pixels.

    Counts add, so per-tile counts pool into per-set counts:

    >>> PixelCounts(1, 2, 3, 4) + PixelCounts(10, 0, 0, 0)
    PixelCounts(tp=11, fp=2, fn=3, tn=4)
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: PixelCounts) -> PixelCounts:
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def total(self) -> int:
        """All pixels counted."""
        return self.tp + self.fp + self.fn + self.tn

    @property
    def positives(self) -> int:
        """Pixels that are positive in the truth."""
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        """Pixels that are negative in the truth."""
        return self.tn + self.fp


def pixel_counts(predicted: npt.ArrayLike, truth: npt.ArrayLike) -> PixelCounts:
    """Confusion counts of boolean ``predicted`` against boolean ``truth`` (same shape).

    >>> pixel_counts([[True, False], [True, True]], [[True, True], [False, True]])
    PixelCounts(tp=2, fp=1, fn=1, tn=0)
    """
    predicted = np.asarray(predicted, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"prediction shape {predicted.shape} differs from truth shape {truth.shape}")
    tp = int(np.count_nonzero(predicted & truth))
    fp = int(np.count_nonzero(predicted)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    return PixelCounts(tp=tp, fp=fp, fn=fn, tn=int(truth.size) - tp - fp - fn)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def dice(counts: PixelCounts) -> float:
    """2·TP / (2·TP + FP + FN); 1.0 when there is nothing positive on either side.

    >>> dice(PixelCounts(tp=2, fp=1, fn=1, tn=0))
    0.6666666666666666
    """
    denominator = 2 * counts.tp + counts.fp + counts.fn
    return 2 * counts.tp / denominator if denominator else 1.0


def iou(counts: PixelCounts) -> float:
    """TP / (TP + FP + FN) (Jaccard); 1.0 when there is nothing positive on either side."""
    denominator = counts.tp + counts.fp + counts.fn
    return counts.tp / denominator if denominator else 1.0


def sensitivity(counts: PixelCounts) -> float:
    """TP / (TP + FN), the share of cancer pixels found; NaN without positive pixels."""
    return _ratio(counts.tp, counts.positives)


def specificity(counts: PixelCounts) -> float:
    """TN / (TN + FP), the share of non-cancer pixels left alone; NaN without negative pixels."""
    return _ratio(counts.tn, counts.negatives)


def pixel_accuracy(counts: PixelCounts) -> float:
    """(TP + TN) / all pixels."""
    return _ratio(counts.tp + counts.tn, counts.total)


def all_negative_accuracy(counts: PixelCounts) -> float:
    """Accuracy a model that calls every pixel negative would reach on the same pixels.

    Reported next to :func:`pixel_accuracy`: with 85 % background, 95 % accuracy
    is much less than it sounds.
    """
    return _ratio(counts.negatives, counts.total)


def all_positive_dice(counts: PixelCounts) -> float:
    """Dice a model that calls every pixel positive would reach: 2·P / (2·P + N).

    The floor a Dice figure should be read against when most pixels are cancer.
    """
    return dice(PixelCounts(tp=counts.positives, fp=counts.negatives))


def metrics_from_counts(counts: PixelCounts) -> dict[str, float]:
    """Every metric of :data:`METRIC_NAMES` from pooled counts."""
    return {
        "pixel_accuracy": pixel_accuracy(counts),
        "all_negative_accuracy": all_negative_accuracy(counts),
        "dice": dice(counts),
        "iou": iou(counts),
        "sensitivity": sensitivity(counts),
        "specificity": specificity(counts),
        "all_positive_dice": all_positive_dice(counts),
        "positive_fraction": _ratio(counts.positives, counts.total),
    }


class ThresholdSweep:
    """Pooled confusion counts at every threshold ``k / bins`` (k = 0 … bins), accumulated tile by tile.

    Keeps two histograms of predicted probabilities (over truly positive and
    truly negative pixels), so memory does not grow with the data.  A pixel
    with probability ``p`` counts as predicted positive at threshold ``k / bins``
    when ``floor(p · bins) >= k``, i.e. the usual ``p >= t`` up to rounding at
    the bin edges.

    Parameters
    ----------
    bins
        Number of threshold steps (100 gives thresholds 0.00, 0.01, …, 1.00).

    Examples
    --------
    >>> sweep = ThresholdSweep(bins=10)
    >>> sweep.add(np.array([0.05, 0.35, 0.75, 0.95]), np.array([False, True, False, True]))
    >>> sweep.counts_at(5)
    PixelCounts(tp=1, fp=1, fn=1, tn=1)
    >>> sweep.best()
    (0.1, 0.8)
    """

    def __init__(self, bins: int = 100) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = bins
        # bins + 1 slots: probability 1.0 lands in its own slot, predicted positive at every threshold.
        self._positive = np.zeros(bins + 1, dtype=np.int64)
        self._negative = np.zeros(bins + 1, dtype=np.int64)

    def add(self, probabilities: npt.ArrayLike, truth: npt.ArrayLike) -> None:
        """Add the pixels of one tile or batch (any shape; ``truth`` boolean of the same shape)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        truth = np.asarray(truth, dtype=bool)
        if probabilities.shape != truth.shape:
            raise ValueError(
                f"probability shape {probabilities.shape} differs from truth shape {truth.shape}"
            )
        slots = np.clip(np.floor(probabilities * self.bins), 0, self.bins).astype(np.int64)
        self._positive += np.bincount(slots[truth], minlength=self.bins + 1)
        self._negative += np.bincount(slots[~truth], minlength=self.bins + 1)

    def counts_at(self, k: int) -> PixelCounts:
        """Pooled counts at threshold ``k / bins``."""
        tp = int(self._positive[k:].sum())
        fp = int(self._negative[k:].sum())
        return PixelCounts(tp=tp, fp=fp, fn=int(self._positive.sum()) - tp, tn=int(self._negative.sum()) - fp)

    def best(self) -> tuple[float, float]:
        """``(threshold, dice)`` of the threshold that maximises pooled Dice (the lowest on ties)."""
        # Predicted-positive counts at every k at once: reverse cumulative sums.
        tp = np.cumsum(self._positive[::-1])[::-1]
        fp = np.cumsum(self._negative[::-1])[::-1]
        fn = self._positive.sum() - tp
        denominator = 2 * tp + fp + fn
        scores = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
        k = int(np.argmax(scores))
        return k / self.bins, float(scores[k])
