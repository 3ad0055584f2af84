from __future__ import annotations

import math

import numpy as np
import pytest

from slidejob.training.metrics import (
    PixelCounts,
    ThresholdSweep,
    all_negative_accuracy,
    all_positive_dice,
    dice,
    iou,
    metrics_from_counts,
    pixel_accuracy,
    pixel_counts,
    sensitivity,
    specificity,
)

TRUTH = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)  # 3 positive, 5 negative
PRED = np.array([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=bool)  # tp 2, fp 1, fn 1, tn 4


def test_counts_by_hand() -> None:
    assert pixel_counts(PRED, TRUTH) == PixelCounts(tp=2, fp=1, fn=1, tn=4)


def test_metrics_by_hand() -> None:
    counts = PixelCounts(tp=2, fp=1, fn=1, tn=4)
    assert dice(counts) == pytest.approx(4 / 6)
    assert iou(counts) == pytest.approx(2 / 4)
    assert sensitivity(counts) == pytest.approx(2 / 3)
    assert specificity(counts) == pytest.approx(4 / 5)
    assert pixel_accuracy(counts) == pytest.approx(6 / 8)
    assert all_negative_accuracy(counts) == pytest.approx(5 / 8)
    assert all_positive_dice(counts) == pytest.approx(6 / 11)  # 2·3 / (2·3 + 5)


def test_empty_truth_and_empty_prediction_is_perfect_but_sensitivity_undefined() -> None:
    counts = pixel_counts(np.zeros((3, 3), bool), np.zeros((3, 3), bool))
    assert counts == PixelCounts(tn=9)
    assert dice(counts) == 1.0 and iou(counts) == 1.0
    assert math.isnan(sensitivity(counts))
    assert specificity(counts) == 1.0 and pixel_accuracy(counts) == 1.0 and all_negative_accuracy(counts) == 1.0


def test_empty_truth_with_false_positives_scores_zero() -> None:
    counts = pixel_counts(np.eye(3, dtype=bool), np.zeros((3, 3), bool))
    assert dice(counts) == 0.0 and iou(counts) == 0.0
    assert specificity(counts) == pytest.approx(6 / 9)


def test_all_positive_truth_and_prediction() -> None:
    counts = pixel_counts(np.ones((2, 5), bool), np.ones((2, 5), bool))
    assert counts == PixelCounts(tp=10)
    assert dice(counts) == 1.0 and sensitivity(counts) == 1.0
    assert math.isnan(specificity(counts))
    assert all_negative_accuracy(counts) == 0.0 and all_positive_dice(counts) == 1.0


def test_all_negative_prediction_on_all_positive_truth() -> None:
    counts = pixel_counts(np.zeros(4, bool), np.ones(4, bool))
    assert dice(counts) == 0.0 and sensitivity(counts) == 0.0 and pixel_accuracy(counts) == 0.0


def test_pooling_weighs_pixels_not_tiles() -> None:
    # A tile with 1 of 100 positives missed and a perfect tile of 100 positives:
    # per-tile mean Dice is 0.5, pooled Dice is 200 / 201.
    big = pixel_counts(np.ones(100, bool), np.ones(100, bool))
    small = pixel_counts(np.zeros(100, bool), np.eye(1, 100, dtype=bool)[0])
    assert dice(big + small) == pytest.approx(200 / 201)


def test_metrics_from_counts_has_every_name() -> None:
    metrics = metrics_from_counts(PixelCounts(tp=2, fp=1, fn=1, tn=4))
    assert metrics["positive_fraction"] == pytest.approx(3 / 8)
    assert set(metrics) >= {"dice", "iou", "pixel_accuracy", "all_negative_accuracy", "sensitivity", "specificity"}


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        pixel_counts(np.zeros(3, bool), np.zeros(4, bool))


def test_sweep_matches_direct_counts_at_every_threshold() -> None:
    rng = np.random.default_rng(0)
    probabilities = rng.uniform(size=(3, 16, 16))
    truth = rng.uniform(size=(3, 16, 16)) < probabilities  # informative probabilities
    sweep = ThresholdSweep(bins=20)
    for p, t in zip(probabilities, truth):
        sweep.add(p, t)
    for k in range(21):
        direct = pixel_counts(np.floor(probabilities * 20) >= k, truth)
        assert sweep.counts_at(k) == direct
    threshold, best = sweep.best()
    assert best == max(dice(sweep.counts_at(k)) for k in range(21))
    assert best == pytest.approx(dice(pixel_counts(np.floor(probabilities * 20) >= round(threshold * 20), truth)))


def test_sweep_best_threshold_by_hand() -> None:
    sweep = ThresholdSweep(bins=10)
    sweep.add(np.array([0.05, 0.35, 0.75, 0.95]), np.array([False, True, False, True]))
    assert sweep.best() == (0.1, 0.8)  # 0.35, 0.75, 0.95 positive: tp 2, fp 1 → 4/5


def test_sweep_of_empty_truth_prefers_calling_nothing() -> None:
    sweep = ThresholdSweep(bins=10)
    sweep.add(np.array([0.2, 0.4]), np.array([False, False]))
    assert sweep.best() == (0.5, 1.0)
