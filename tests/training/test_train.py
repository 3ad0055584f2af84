from __future__ import annotations

import csv
import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slidejob.errors import DataError, OutputExists
from slidejob.model import ModelCard, load_model
from slidejob.training.config import TrainConfig
from slidejob.training.data import discover_samples, load_tiles, split_by_group
from slidejob.training.report import HISTORY_COLUMNS
from slidejob.training.scoring import score_tiles
from slidejob.training.train import TrainResult, lr_at, train_model

#: The bar the short synthetic run must clear; it reaches about 0.93.
SYNTHETIC_DICE_BAR = 0.85


def _config(data: Path, **changes) -> TrainConfig:
    base = TrainConfig(
        data_dir=str(data), epochs=10, batch_size=8, crop_px=48, base_channels=4, lr=3e-2,
        val_fraction=0.25, negative_classes=("Normal",), seed=0,
    )
    return replace(base, **changes)


@pytest.fixture(scope="module")
def short_run(synthetic_tiles: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped fixtures run outside the autouse one
    try:
        return train_model(_config(synthetic_tiles), out_dir=tmp_path_factory.mktemp("run"), show_progress=False)
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_short_training_learns_synthetic_cancer(short_run: TrainResult) -> None:
    losses = [row["train_loss"] for row in short_run.history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert short_run.metrics["dice"] >= SYNTHETIC_DICE_BAR, short_run.metrics
    assert short_run.metrics["dice"] == max(row["dice"] for row in short_run.history)
    assert short_run.best_epoch == max(short_run.history, key=lambda row: row["dice"])["epoch"]


@pytest.mark.slow
def test_run_folder_holds_history_curves_and_card(short_run: TrainResult) -> None:
    out = short_run.out_dir
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and tuple(rows[0]) == HISTORY_COLUMNS
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == short_run.best_epoch
    with Image.open(out / "curves.png") as curves:
        assert curves.format == "PNG" and curves.size[0] > 500
    card = ModelCard.load(short_run.card_path)
    assert card.training["split"]["seed"] == 0 and card.training["split"]["method"] == "group"
    assert card.training["data_rules"] == {
        "mask_threshold": 128, "negative_classes": ["Normal"], "group_regex": TrainConfig.group_regex,
        "classes": ["Normal", "Tumour"],
    }
    assert card.training["epochs_run"] == 10 and card.training["best_epoch"] == short_run.best_epoch
    metrics = card.validation_metrics
    assert metrics["all_negative_accuracy"] is not None and metrics["pixel_accuracy"] > metrics["all_negative_accuracy"]


@pytest.mark.slow
def test_exported_model_scores_what_validation_scored(short_run: TrainResult, synthetic_tiles: Path) -> None:
    loaded = load_model(short_run.card_path)
    samples = discover_samples(synthetic_tiles, negative_classes=["Normal"])
    _, val = split_by_group(samples, val_fraction=0.25, seed=0)
    assert sorted({s.group for s in val}) == loaded.card.training["split"]["val_groups"]
    scores = score_tiles(
        loaded.module, load_tiles(val, mask_threshold=128), mean=loaded.card.input_normalization["mean"],
        std=loaded.card.input_normalization["std"], device=loaded.device, threshold=0.5,
    )
    assert scores.metrics()["dice"] == pytest.approx(loaded.card.validation_metrics["dice"], abs=1e-9)


@pytest.mark.slow
def test_same_seed_gives_identical_weights(synthetic_tiles: Path, tmp_path: Path) -> None:
    config = _config(synthetic_tiles, epochs=2)
    first = train_model(config, out_dir=tmp_path / "a", show_progress=False)
    second = train_model(config, out_dir=tmp_path / "b", show_progress=False)
    assert first.weights_path.read_bytes() == second.weights_path.read_bytes()


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_resume_ends_where_an_uninterrupted_run_ends(
    synthetic_tiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slidejob.training.train as train_module

    config = _config(synthetic_tiles, epochs=3)
    whole = train_model(config, out_dir=tmp_path / "whole", show_progress=False)

    # Interrupt the second run right after its first checkpoint (history is written last in an epoch).
    def crash(*args, **kwargs):
        raise _Interrupted

    monkeypatch.setattr(train_module, "write_history", crash)
    with pytest.raises(_Interrupted):
        train_model(config, out_dir=tmp_path / "parts", show_progress=False)
    monkeypatch.undo()
    assert json.loads((tmp_path / "parts" / "checkpoint.json").read_text())["state"]["epoch"] == 1
    resumed = train_model(config, out_dir=tmp_path / "parts", resume=True, show_progress=False)
    for name in ("checkpoint.safetensors", "model.safetensors"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "parts" / name).read_bytes()
    assert [r["dice"] for r in resumed.history] == [r["dice"] for r in whole.history]


def test_existing_run_is_not_overwritten(synthetic_tiles: Path, tmp_path: Path) -> None:
    (tmp_path / "checkpoint.json").write_text("{}")
    with pytest.raises(OutputExists, match="--resume"):
        train_model(_config(synthetic_tiles), out_dir=tmp_path, show_progress=False)


def test_run_that_failed_on_its_data_can_be_started_again(synthetic_tiles: Path, tmp_path: Path) -> None:
    # Regression: a bad option used to leave run.json behind, and the corrected
    # command was then refused as "already holds a training run".
    with pytest.raises(DataError, match="larger than the smallest training tile"):
        train_model(_config(synthetic_tiles, crop_px=72), out_dir=tmp_path, show_progress=False)
    assert not (tmp_path / "run.json").exists()
    train_model(_config(synthetic_tiles, epochs=1), out_dir=tmp_path, show_progress=False)


@pytest.mark.slow
def test_resume_with_other_options_is_refused(synthetic_tiles: Path, tmp_path: Path) -> None:
    train_model(_config(synthetic_tiles, epochs=1), out_dir=tmp_path, show_progress=False)
    with pytest.raises(DataError, match="lr: run has 0.03, now 0.01"):
        train_model(_config(synthetic_tiles, lr=1e-2), out_dir=tmp_path, resume=True, show_progress=False)


def test_resume_without_a_run_is_refused(synthetic_tiles: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no checkpoint"):
        train_model(_config(synthetic_tiles), out_dir=tmp_path, resume=True, show_progress=False)


def test_crop_larger_than_tiles_is_refused(synthetic_tiles: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="larger than the smallest training tile"):
        train_model(_config(synthetic_tiles, crop_px=72), out_dir=tmp_path, show_progress=False)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        TrainConfig(data_dir=".", crop_px=50)
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(data_dir=".", loss="mse")
    config = _config(Path("x"))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_learning_rate_schedule() -> None:
    lrs = [lr_at(step, total_steps=100, warmup_steps=10, peak_lr=1.0) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.01, abs=0.002)


@pytest.mark.gpu
def test_training_on_cuda_uses_mixed_precision(synthetic_tiles: Path, tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    result = train_model(_config(synthetic_tiles, epochs=2), out_dir=tmp_path, device="cuda", show_progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert ModelCard.load(result.card_path).training["device"].startswith("cuda")
    # Exported weights load on the CPU.
    assert load_model(result.card_path).predict_proba(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 64, 64)
