from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest

from slidejob.training.progress import Progress
from slidejob.training.report import draw_curves, write_history


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_shows_running_loss() -> None:
    stream = _Terminal()
    with Progress(3, "epoch 1/2", stream=stream) as bar:
        for loss in (0.9, 0.7, 0.5):
            bar.update(loss=loss)
    text = stream.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    assert "3/3" in text and "loss=0.5000" in text


def test_progress_off_a_terminal_logs_plain_lines(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    with (
        caplog.at_level(logging.INFO, logger="slidejob.training.progress"),
        Progress(2, "epoch 1/1", stream=stream, interval_s=0.0) as bar,
    ):
        bar.update(loss=1.0)
        bar.update(loss=0.5)
    assert stream.getvalue() == ""  # no carriage returns in a log file
    assert len(caplog.records) == 3 and "2/2" in caplog.records[-1].getMessage()


def test_disabled_progress_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    stream = _Terminal()
    with caplog.at_level(logging.INFO), Progress(2, "x", stream=stream, enabled=False) as bar:
        bar.update(loss=1.0)
    assert stream.getvalue() == "" and not caplog.records


def test_history_files(tmp_path) -> None:
    history = [
        {"epoch": 1, "lr": 0.001, "train_loss": 1.0, "val_loss": 0.9, "dice": 0.5, "iou": 0.33,
         "pixel_accuracy": 0.7, "all_negative_accuracy": 0.6, "sensitivity": math.nan, "specificity": 0.8},
        {"epoch": 2, "lr": 0.0005, "train_loss": 0.8, "val_loss": 0.7, "dice": 0.6, "iou": 0.43,
         "pixel_accuracy": 0.75, "all_negative_accuracy": 0.6, "sensitivity": 0.5, "specificity": 0.85},
    ]
    write_history(history, tmp_path, best_epoch=2)
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].startswith("1,0.001,1.0,0.9,")
    assert '"sensitivity": null' in (tmp_path / "metrics.json").read_text()
    image = draw_curves(history, best_epoch=2)
    assert image.size == (1100, 460)
    # Something was drawn in both panels, in colour.
    for panel in ((60, 40, 520, 380), (620, 40, 1080, 380)):
        pixels = np.asarray(image.crop(panel)).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 3


def test_curves_of_a_single_epoch() -> None:
    draw_curves([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "dice": 0.5}], best_epoch=1)
