"""Score any weights on any labelled folder: the figures of training, plus the Dice-maximising threshold."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slidejob.model.runtime import PRECISIONS, load_model
from slidejob.training.data import discover_samples, load_tiles
from slidejob.training.losses import make_loss
from slidejob.training.scoring import score_tiles

__all__ = ["EvaluationResult", "evaluate_model", "format_table"]

# Evaluation does not split, so every file name is its own group.
_ANY_NAME = r".*"


@dataclass(frozen=True)
class EvaluationResult:
    """Pooled metrics of one model on one labelled folder.

    Attributes
    ----------
    metrics
        ``loss``, pixel accuracy and the all-negative accuracy, Dice, IoU,
        sensitivity, specificity at ``metrics["threshold"]``, plus
        ``best_threshold`` and ``dice_at_best_threshold``.
    model_name, weights_sha256, card_path
        Which model was scored.
    data_dir, mask_threshold, negative_classes
        On what, under which data rules.
    """

    metrics: dict[str, Any]
    model_name: str
    weights_sha256: str
    card_path: Path
    data_dir: Path
    mask_threshold: int
    negative_classes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN metrics become ``null``)."""
        return {
            "model": self.model_name,
            "weights_sha256": self.weights_sha256,
            "card": str(self.card_path),
            "data": str(self.data_dir),
            "mask_threshold": self.mask_threshold,
            "negative_classes": list(self.negative_classes),
            "metrics": {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in self.metrics.items()
            },
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


def evaluate_model(
    data_dir: Path,
    *,
    weights: Path | None = None,
    mask_threshold: int | None = None,
    negative_classes: tuple[str, ...] | None = None,
    threshold: float | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    batch_size: int = 16,
) -> EvaluationResult:
    """Pooled pixel metrics of a model on every labelled tile under ``data_dir``.

    Parameters
    ----------
    data_dir
        Labelled folder in a layout :func:`~slidejob.training.data.discover_samples` reads.
    weights
        Model card (``.json``) or weights (``.safetensors``); ``None`` for the shipped model.
    mask_threshold, negative_classes
        Data rules; ``None`` takes the ones the model was trained with (from its card).
    threshold
        Decision threshold; ``None`` takes the card's.
    device
        ``None`` picks CUDA when available, else CPU.
    precision
        ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :func:`~slidejob.model.load_model`).
    batch_size
        Tiles per forward pass.

    Returns
    -------
    EvaluationResult
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    # A .json passed as weights is taken as the card (see resolve_model_paths).
    loaded = load_model(None, weights, device=device, precision=precision)
    card = loaded.card
    mask_threshold = card.mask_threshold if mask_threshold is None else mask_threshold
    from_card = negative_classes is None
    if negative_classes is None:
        negative_classes = card.negative_classes
    threshold = card.threshold if threshold is None else threshold
    # The card's negative classes need not all be present (a folder of only
    # cancer tiles is fine); ones named explicitly must be (a typo is an error).
    samples = discover_samples(
        Path(data_dir), negative_classes=negative_classes, group_regex=_ANY_NAME,
        require_negative_classes=not from_card,
    )
    tiles = load_tiles(samples, mask_threshold=mask_threshold)
    config = card.training.get("config", {})
    pos_weight = float(card.training.get("pos_weight", 1.0))
    loss_fn = make_loss(config.get("loss", "bce-dice"), pos_weight=pos_weight)
    scores = score_tiles(
        loaded.module, tiles, mean=card.input_normalization["mean"], std=card.input_normalization["std"],
        device=device, threshold=threshold, batch_size=batch_size, loss_fn=loss_fn,
        autocast_dtype=PRECISIONS[precision],
    )
    return EvaluationResult(
        metrics=scores.metrics(),
        model_name=card.name,
        weights_sha256=loaded.weights_sha256,
        card_path=loaded.card_path,
        data_dir=Path(data_dir),
        mask_threshold=mask_threshold,
        negative_classes=tuple(negative_classes),
    )


_TABLE_ROWS = (
    ("loss", "loss"),
    ("pixel_accuracy", "pixel accuracy"),
    ("all_negative_accuracy", "  all-negative accuracy"),
    ("dice", "Dice"),
    ("all_positive_dice", "  all-positive Dice"),
    ("iou", "IoU"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("positive_fraction", "cancer pixel fraction"),
    ("threshold", "threshold"),
    ("best_threshold", "Dice-maximising threshold"),
    ("dice_at_best_threshold", "  Dice at that threshold"),
    ("n_tiles", "tiles"),
    ("n_pixels", "pixels"),
)


def format_table(result: EvaluationResult) -> str:
    """A two-column text table of ``result`` for people (``--format table``)."""
    lines = [
        f"model   {result.model_name} (sha256 {result.weights_sha256[:12]}…)",
        (
            f"data    {result.data_dir} (mask >= {result.mask_threshold}; all-negative classes: "
            f"{', '.join(result.negative_classes) or 'none'})"
        ),
        "",
    ]
    width = max(len(label) for _, label in _TABLE_ROWS)
    for key, label in _TABLE_ROWS:
        value = result.metrics.get(key)
        if isinstance(value, int):
            shown = f"{value:d}"
        elif value is None or (isinstance(value, float) and not math.isfinite(value)):
            shown = "n/a"
        else:
            shown = f"{value:.4f}"
        lines.append(f"{label:<{width}}  {shown}")
    return "\n".join(lines)
