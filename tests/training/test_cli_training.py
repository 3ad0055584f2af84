from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from slidejob.cli_training import _NORMS, _PRECISIONS, evaluate, train


def test_cli_choices_match_the_library() -> None:
    from slidejob.model import PRECISIONS
    from slidejob.model.unet import NORMS

    assert set(_NORMS) == set(NORMS) and set(_PRECISIONS) == set(PRECISIONS)


def test_commands_are_registered_on_the_main_group() -> None:
    from slidejob.cli import cli

    assert cli.get_command(None, "train") is train and cli.get_command(None, "evaluate") is evaluate


@pytest.mark.slow
def test_train_then_evaluate_through_the_cli(synthetic_tiles: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    args = [str(synthetic_tiles), "--out", str(out), "--epochs", "2", "--batch-size", "8", "--crop-px", "48",
            "--base-channels", "4", "--lr", "0.03", "--val-fraction", "0.25", "--negative-class", "Normal",
            "--card-magnification", "400x microscope", "--quiet"]
    result = runner.invoke(train, args)
    assert result.exit_code == 0, result.output
    assert "validation Dice" in result.output and (out / "model.safetensors").is_file()
    assert json.loads((out / "model.json").read_text())["magnification"] == "400x microscope"

    again = runner.invoke(train, args)
    assert again.exit_code == 4 and "--resume" in again.output  # OutputExists

    table = runner.invoke(evaluate, ["--weights", str(out / "model.json"), str(synthetic_tiles)])
    assert table.exit_code == 0, table.output
    assert "all-negative accuracy" in table.output

    as_json = runner.invoke(evaluate, ["--weights", str(out / "model.safetensors"), str(synthetic_tiles),
                                       "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["negative_classes"] == ["Normal"] and data["mask_threshold"] == 128


def test_crop_not_multiple_of_8_is_a_usage_error(synthetic_tiles: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(train, [str(synthetic_tiles), "--out", str(tmp_path / "r"), "--crop-px", "50"])
    assert result.exit_code == 2 and "multiple of 8" in result.output


def test_pickle_weights_are_refused_by_evaluate(synthetic_tiles: Path, tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"\x80\x04K\x01.")
    result = CliRunner().invoke(evaluate, ["--weights", str(weights), str(synthetic_tiles)])
    assert result.exit_code == 1 and "arbitrary code" in result.output


def test_cli_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, slidejob.cli_training; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
