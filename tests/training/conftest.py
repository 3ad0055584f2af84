"""A factory of small labelled folders in EBHI-Seg's layout, with cancer that is easy to tell apart.

Cancer is drawn as textured blobs (dark violet speckle) on a smooth pink
background, so a tiny U-Net learns it in seconds.  The ``Normal`` class has
pale ring-shaped "glands" whose masks are white, as in EBHI-Seg, where Normal
masks mark normal glands: a run that forgot ``--negative-class Normal`` would
learn them as cancer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _ellipses(rng: np.random.Generator, side_px: int, count: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side_px, 0:side_px]
    mask = np.zeros((side_px, side_px), dtype=bool)
    for _ in range(count):
        cy, cx = rng.uniform(0, side_px, size=2)
        ry, rx = rng.uniform(side_px / 10, side_px / 4, size=2)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return mask


def _background(rng: np.random.Generator, side_px: int) -> np.ndarray:
    pink = np.array([235, 180, 215], dtype=np.float64)
    return pink + rng.normal(0, 6, size=(side_px, side_px, 3))


def write_labelled_folder(
    root: Path,
    *,
    cancer_groups: int = 8,
    normal_groups: int = 2,
    tiles_per_group: int = 4,
    side_px: int = 64,
    seed: int = 0,
) -> Path:
    """Write ``root/Tumour/{image,label}`` and ``root/Normal/{image,label}`` PNG pairs; return ``root``.

    File names are ``GT<group>-1-400-<index>.png`` so the default group regex applies.
    """
    rng = np.random.default_rng(seed)
    for class_name, groups, offset in (("Tumour", cancer_groups, 0), ("Normal", normal_groups, 1000)):
        (root / class_name / "image").mkdir(parents=True, exist_ok=True)
        (root / class_name / "label").mkdir(parents=True, exist_ok=True)
        for group in range(groups):
            for index in range(tiles_per_group):
                image = _background(rng, side_px)
                if class_name == "Tumour":
                    mask = _ellipses(rng, side_px, count=int(rng.integers(1, 4)))
                    speckle = rng.uniform(0, 1, size=(side_px, side_px, 1)) > 0.5
                    cancer = np.where(speckle, [90, 40, 140], [140, 80, 180]) + rng.normal(0, 8, (side_px, side_px, 3))
                    image[mask] = cancer[mask]
                else:
                    mask = _ellipses(rng, side_px, count=3)
                    image[mask] = [250, 225, 240]
                name = f"GT{2000000 + offset + group}-1-400-{index + 1:03d}.png"
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / class_name / "image" / name)
                # Anti-aliased-looking grey edges are what the mask threshold is for: 253 inside, 30 outside.
                label = np.where(mask, 253, 30).astype(np.uint8)
                Image.fromarray(label).save(root / class_name / "label" / name)
    return root


@pytest.fixture(scope="session")
def synthetic_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled folder: 8 cancer groups × 4 tiles and 2 normal groups × 4 tiles of 64×64 px."""
    return write_labelled_folder(tmp_path_factory.mktemp("synthetic") / "tiles")
