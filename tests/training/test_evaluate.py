from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from slidejob.training.config import TrainConfig
from slidejob.training.evaluate import evaluate_model, format_table
from slidejob.training.train import TrainResult, train_model


@pytest.fixture(scope="module")
def tiny_run(synthetic_tiles: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig(
            data_dir=str(synthetic_tiles), epochs=2, batch_size=8, crop_px=48, base_channels=4, lr=3e-2,
            val_fraction=0.25, negative_classes=("Normal",),
        )
        return train_model(config, out_dir=tmp_path_factory.mktemp("eval-run"), show_progress=False)
    finally:
        torch.set_num_threads(before)


def test_data_rules_default_to_the_card(tiny_run: TrainResult, synthetic_tiles: Path) -> None:
    result = evaluate_model(synthetic_tiles, weights=tiny_run.card_path)
    assert result.mask_threshold == 128 and result.negative_classes == ("Normal",)
    assert result.metrics["n_tiles"] == 40
    # Overriding the rules changes the truth: Normal glands become "cancer".
    overridden = evaluate_model(synthetic_tiles, weights=tiny_run.weights_path, negative_classes=())
    assert overridden.negative_classes == ()
    assert overridden.metrics["positive_fraction"] > result.metrics["positive_fraction"]


def test_best_threshold_is_at_least_as_good_as_the_card_threshold(tiny_run: TrainResult,
                                                                   synthetic_tiles: Path) -> None:
    metrics = evaluate_model(synthetic_tiles, weights=tiny_run.card_path).metrics
    assert 0.0 <= metrics["best_threshold"] <= 1.0
    assert metrics["dice_at_best_threshold"] >= metrics["dice"] - 0.01  # the sweep's bins are 0.01 wide


def test_json_and_table_output(tiny_run: TrainResult, synthetic_tiles: Path) -> None:
    result = evaluate_model(synthetic_tiles, weights=tiny_run.card_path)
    data = json.loads(result.to_json())
    assert data["weights_sha256"] == result.weights_sha256
    assert set(data["metrics"]) >= {"loss", "pixel_accuracy", "all_negative_accuracy", "dice", "iou",
                                    "sensitivity", "specificity", "best_threshold"}
    table = format_table(result)
    assert "all-negative accuracy" in table and "Dice-maximising threshold" in table


def test_folder_of_only_negatives(tiny_run: TrainResult, synthetic_tiles: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(synthetic_tiles / "Normal", tmp_path / "only-normal" / "Normal")
    result = evaluate_model(tmp_path / "only-normal", weights=tiny_run.card_path)
    assert math.isnan(result.metrics["sensitivity"])  # no cancer pixels to find
    assert json.loads(result.to_json())["metrics"]["sensitivity"] is None
    assert "n/a" in format_table(result)


def test_card_negative_class_may_be_absent_from_the_folder(tiny_run: TrainResult, synthetic_tiles: Path,
                                                           tmp_path: Path) -> None:
    # Regression: evaluating a folder of only cancer tiles failed because the
    # card's negative class "Normal" had no folder there.
    import shutil

    from slidejob.errors import DataError

    shutil.copytree(synthetic_tiles / "Tumour", tmp_path / "only-tumour" / "Tumour")
    result = evaluate_model(tmp_path / "only-tumour", weights=tiny_run.card_path)
    assert result.metrics["n_tiles"] == 32
    with pytest.raises(DataError, match="not found"):
        evaluate_model(tmp_path / "only-tumour", weights=tiny_run.card_path, negative_classes=("Normal",))
