"""The mask store's pyramid reductions against plain numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from slidejob import maskstore


def _reference(block: np.ndarray, mode: str) -> np.ndarray:
    h, w = block.shape
    padded = np.pad(block, ((0, h % 2), (0, w % 2)), mode="constant" if mode == "max" else "edge")
    quads = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).astype(np.float64)
    out = quads.max(axis=(1, 3)) if mode == "max" else np.round(quads.mean(axis=(1, 3)))
    return out.astype(np.uint8)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 7), (6, 4), (7, 9), (512, 511), (300, 301)])
def test_downsamples_equal_the_numpy_reductions(h: int, w: int) -> None:
    rng = np.random.default_rng(h * 1000 + w)
    # Values whose 2x2 means often end in .5 (rounded to even) and 0/1 masks.
    for block in (rng.integers(0, 256, (h, w)).astype(np.uint8), (rng.integers(0, 3, (h, w)) * 127).astype(np.uint8),
                  (rng.random((h, w)) > 0.7).astype(np.uint8)):
        np.testing.assert_array_equal(maskstore.downsample_max(block), _reference(block, "max"))
        np.testing.assert_array_equal(maskstore.downsample_mean(block), _reference(block, "mean"))
