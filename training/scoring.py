"""Run a network over labelled tiles and pool its pixel metrics (training's validation, ``evaluate``)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from slidejob.errors import DataError
from slidejob.model.runtime import normalization_affine, prepare_batch
from slidejob.training.data import LabelledTiles
from slidejob.training.metrics import PixelCounts, ThresholdSweep, metrics_from_counts, pixel_counts

__all__ = ["Scores", "score_tiles", "trim_to_multiple"]

#: The U-Net halves a tile 3 times; sides must be multiples of this.
SIDE_MULTIPLE_PX = 8


@dataclass
class Scores:
    """Pooled results over a set of tiles.

    Attributes
    ----------
    counts
        Confusion counts at the decision threshold.
    sweep
        Counts at every threshold on a 0.01 grid (for the Dice-maximising one).
    loss
        Loss averaged over batches, weighted by their pixel count (NaN without a loss function).
    threshold
        The decision threshold ``counts`` were taken at.
    n_tiles
        Tiles scored.
    """

    counts: PixelCounts
    sweep: ThresholdSweep
    loss: float
    threshold: float
    n_tiles: int

    def metrics(self) -> dict[str, float]:
        """Loss, the :data:`~slidejob.training.metrics.METRIC_NAMES` metrics, best threshold and its Dice."""
        best_threshold, best_dice = self.sweep.best()
        return {
            "loss": self.loss,
            **metrics_from_counts(self.counts),
            "threshold": self.threshold,
            "best_threshold": best_threshold,
            "dice_at_best_threshold": best_dice,
            "n_tiles": self.n_tiles,
            "n_pixels": self.counts.total,
        }


def trim_to_multiple(array: npt.NDArray[Any], multiple: int = SIDE_MULTIPLE_PX) -> npt.NDArray[Any]:
    """Centre crop of ``array`` (H, W, ...) to sides that are multiples of ``multiple``.

    >>> trim_to_multiple(np.zeros((226, 224, 3))).shape
    (224, 224, 3)
    """
    height, width = array.shape[:2]
    if height < multiple or width < multiple:
        raise DataError(f"a tile of {width}×{height} px is smaller than the {multiple} px the U-Net needs")
    top, left = (height % multiple) // 2, (width % multiple) // 2
    return array[top : top + height - height % multiple, left : left + width - width % multiple]


def score_tiles(
    module: torch.nn.Module,
    tiles: LabelledTiles,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    threshold: float,
    batch_size: int = 16,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Scores:
    """Predict every tile (whole, centre-trimmed to multiples of 8) and pool the metrics.

    Tiles are batched by size, so a folder of mixed sizes works.  The module is
    put in eval mode and left there.

    Parameters
    ----------
    module
        The U-Net.
    tiles
        Labelled tiles in memory.
    mean, std
        Input normalization (0..1 RGB units), as in the model card.
    device
        Where ``module`` lives.
    threshold
        Decision threshold on probabilities for the pooled counts.
    batch_size
        Tiles per forward pass.
    loss_fn
        Loss to report next to the metrics, or ``None``.
    autocast_dtype
        bf16/fp16 autocast, or ``None`` for float32.
    channels_last
        Feed NHWC memory layout.
    """
    module.eval()
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    trimmed = [
        (trim_to_multiple(image), trim_to_multiple(mask)) for image, mask in zip(tiles.images, tiles.masks)
    ]
    for index, (image, _) in enumerate(trimmed):
        by_shape[image.shape].append(index)
    # The same arithmetic as LoadedModel.predict_proba, so evaluate scores what inference computes.
    scale, shift = normalization_affine(mean, std, device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else nullcontext()
    )
    counts = PixelCounts()
    sweep = ThresholdSweep(bins=100)
    loss_sum, loss_pixels = 0.0, 0
    with torch.inference_mode():
        for shape in sorted(by_shape):
            indices = by_shape[shape]
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                images = np.stack([trimmed[i][0] for i in chunk])
                masks = np.stack([trimmed[i][1] for i in chunk])
                x = prepare_batch(images, scale, shift, device=device, channels_last=channels_last)
                with autocast:
                    logits = module(x).float()
                if loss_fn is not None:
                    truth = torch.from_numpy(masks).to(device)[:, None].float()
                    loss_sum += float(loss_fn(logits, truth)) * masks.size
                    loss_pixels += masks.size
                probabilities = torch.sigmoid(logits)[:, 0].cpu().numpy()
                counts = counts + pixel_counts(probabilities >= threshold, masks)
                sweep.add(probabilities, masks)
    return Scores(
        counts=counts,
        sweep=sweep,
        loss=loss_sum / loss_pixels if loss_pixels else math.nan,
        threshold=threshold,
        n_tiles=len(tiles),
    )
