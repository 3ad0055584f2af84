"""Pictures for people to check by eye (PNG thumbnails with overlays)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from slidejob import chunkstore
from slidejob.chunkstore import CHUNK_PX


def tissue_overlay(
    thumbnail: npt.NDArray[np.uint8],
    tissue_mask: npt.NDArray[np.bool_],
    grid: npt.NDArray[np.bool_],
    downsample_yx: tuple[float, float],
    *,
    min_side_px: int = 512,
) -> Image.Image:
    """Thumbnail with detected tissue tinted green and tissue chunks outlined.

    ``tissue_mask`` may be coarser than the thumbnail (detection runs at a
    fixed low resolution, the picture can be sharper); it is scaled to the
    thumbnail by nearest neighbour, so what is drawn is what was detected.
    Small thumbnails are enlarged so the grid stays visible on slides of a few chunks.
    """
    if tissue_mask.shape != thumbnail.shape[:2]:
        scaled = Image.fromarray(tissue_mask.astype(np.uint8) * 255).resize(
            (thumbnail.shape[1], thumbnail.shape[0]), Image.Resampling.NEAREST
        )
        tissue_mask = np.asarray(scaled) > 127
    base = thumbnail.astype(np.float32)
    tint = np.array([0, 200, 0], np.float32)
    base[tissue_mask] = 0.75 * base[tissue_mask] + 0.25 * tint
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    scale = max(1, int(np.ceil(min_side_px / max(1, min(img.size)))))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    sy, sx = scale * CHUNK_PX / downsample_yx[0], scale * CHUNK_PX / downsample_yx[1]
    for cy, cx in zip(*np.nonzero(grid)):
        draw.rectangle(
            [cx * sx, cy * sy, min((cx + 1) * sx, img.width) - 1, min((cy + 1) * sy, img.height) - 1],
            outline=(0, 90, 255),
        )
    return img


def save_png(img: Image.Image, path: Path) -> None:
    """Write a PNG atomically (:func:`slidejob.chunkstore.write_file_atomic`)."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    chunkstore.write_file_atomic(path, buffer.getvalue())
