from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slidejob.model import ModelCard, default_weights, load_model


def test_default_weights_load_and_describe_themselves() -> None:
    card_path, weights_path = default_weights()
    assert card_path.name == "default.json" and weights_path.name == "default.safetensors"
    loaded = load_model()
    card = loaded.card
    assert isinstance(card, ModelCard) and loaded.weights_path == weights_path
    assert card.mpp_um is None and card.magnification == "400x microscope"
    assert card.validation_metrics["dice"] >= 0.85
    assert card.training["split"]["method"] == "group" and card.training["data_rules"]["negative_classes"] == [
        "Normal"
    ]
    assert "not a diagnostic device" in card.description
    assert "10.6084/m9.figshare.21540159.v1" in (card.data_attribution or "")
    assert weights_path.stat().st_size < 5_000_000
    probabilities = loaded.predict_proba(np.full((1, 64, 64, 3), 200, np.uint8))
    assert probabilities.shape == (1, 64, 64) and 0.0 <= probabilities.min() <= probabilities.max() <= 1.0


EBHI = Path(__file__).resolve().parents[3] / "shared" / "data" / "annotated" / "ebhi-seg"


@pytest.mark.slow
@pytest.mark.skipif(not EBHI.is_dir(), reason=f"EBHI-Seg not found at {EBHI} (../shared/data is absent)")
def test_shipped_model_reproduces_its_card_figures_on_ebhi_seg() -> None:
    # The validation groups recorded in the card, scored through the inference
    # path, give the card's pooled figures: the card describes these weights.
    from slidejob.training.data import discover_samples, load_tiles
    from slidejob.training.scoring import score_tiles

    loaded = load_model()
    card = loaded.card
    val_groups = set(card.training["split"]["val_groups"])
    samples = [s for s in discover_samples(EBHI, negative_classes=card.negative_classes) if s.group in val_groups]
    assert len(samples) == card.training["split"]["n_val_tiles"]
    scores = score_tiles(
        loaded.module, load_tiles(samples, mask_threshold=card.mask_threshold),
        mean=card.input_normalization["mean"], std=card.input_normalization["std"],
        device=loaded.device, threshold=card.threshold,
    )
    metrics = scores.metrics()
    for name in ("dice", "iou", "pixel_accuracy", "sensitivity", "specificity"):
        assert metrics[name] == pytest.approx(card.validation_metrics[name], abs=1e-6), name
