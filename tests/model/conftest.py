from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from slidejob.model import ModelCard, UNet, receptive_radius_px, save_model


def _make_card(unet: UNet, **changes: Any) -> ModelCard:
    """A valid card for ``unet`` with placeholder training facts."""
    fields: dict[str, Any] = {
        "name": "test-unet",
        "description": "random weights for tests",
        "architecture": {
            "name": "unet",
            "config": unet.config.to_dict(),
            "receptive_radius_px": receptive_radius_px(unet),
        },
        "input_normalization": {"space": "rgb_0_1", "mean": [0.6, 0.4, 0.7], "std": [0.2, 0.25, 0.15]},
        "mpp_um": None,
        "magnification": "400x microscope",
        "threshold": 0.5,
        "training": {
            "dataset": "synthetic",
            "data_rules": {"mask_threshold": 128, "negative_classes": ["Normal"], "group_regex": "^(G\\d+)"},
            "split": {"method": "group", "seed": 0, "val_fraction": 0.25, "val_groups": ["G1"]},
        },
        "validation_metrics": {"dice": 0.5, "sensitivity": None},
        "weights_sha256": "0" * 64,
        "weights_dtype": "float32",
        "slidejob_version": "0.0.test",
    }
    fields.update(changes)
    return ModelCard(**fields)


@pytest.fixture
def make_card() -> Callable[..., ModelCard]:
    """``make_card(unet, **changes)``: a valid card for ``unet`` with placeholder training facts."""
    return _make_card


@pytest.fixture
def saved_model(tmp_path: Path) -> tuple[Path, Path, UNet]:
    """A width-4 U-Net with non-trivial BatchNorm statistics, saved as card + safetensors."""
    torch.manual_seed(0)
    unet = UNet(base_channels=4)
    unet.train()
    with torch.no_grad():  # a few forward passes give the running statistics non-default values
        for _ in range(3):
            unet(torch.randn(2, 3, 32, 32))
    unet.eval()
    weights = tmp_path / "tiny.safetensors"
    save_model(unet, _make_card(unet), weights)
    return weights.with_suffix(".json"), weights, unet
