"""Generated slides with known answers, for tests, benchmarks and the demo.

:func:`write_slide` writes a pyramidal tiled TIFF (JPEG or lossless deflate,
with µm/px in the resolution tags) holding glass with H&E-coloured tissue in
known rectangles, and returns the level-0 tissue mask and the expected
512-px tissue grid with it.  Pixels are generated block by block, so a slide
of any size is written in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile

GLASS_RGB = (242, 240, 244)
#: Typical H&E colours: eosin-pink stroma and hematoxylin-purple nuclei.
STROMA_RGB = (222, 150, 190)
NUCLEI_RGB = (110, 70, 160)
#: Weakly stained tissue: saturation ~0.13, which the tissue detector must keep.
PALE_RGB = (236, 208, 228)
#: "Cancer" in generated slides: crowded, dark, hematoxylin-heavy tissue — a
#: stand-in with a known mask, easy for a small test network to learn.
CANCER_RGB = (80, 30, 120)
CANCER_NUCLEI_RGB = (150, 90, 190)

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 in level-0 pixels


@dataclass(frozen=True)
class SyntheticSlide:
    """A generated slide and what a correct pipeline must find in it."""

    path: Path
    height_px: int
    width_px: int
    mpp_um: float | None
    tissue_boxes: tuple[Box, ...]
    pale_boxes: tuple[Box, ...]
    cancer_boxes: tuple[Box, ...] = ()

    def tissue_mask(self) -> npt.NDArray[np.bool_]:
        """Level-0 tissue mask (only for small slides in tests)."""
        mask = np.zeros((self.height_px, self.width_px), bool)
        for y0, x0, y1, x1 in self.tissue_boxes + self.pale_boxes + self.cancer_boxes:
            mask[y0:y1, x0:x1] = True
        return mask

    def cancer_mask(self) -> npt.NDArray[np.bool_]:
        """Level-0 cancer mask (only for small slides in tests)."""
        mask = np.zeros((self.height_px, self.width_px), bool)
        for y0, x0, y1, x1 in self.cancer_boxes:
            mask[y0:y1, x0:x1] = True
        return mask

    def chunk_fraction(self, chunk_px: int = 512) -> npt.NDArray[np.float64]:
        """Exact tissue fraction of each level-0 chunk, from the boxes."""
        gh, gw = -(-self.height_px // chunk_px), -(-self.width_px // chunk_px)
        frac = np.zeros((gh, gw))
        for cy in range(gh):
            for cx in range(gw):
                cy0, cx0 = cy * chunk_px, cx * chunk_px
                cy1, cx1 = min(cy0 + chunk_px, self.height_px), min(cx0 + chunk_px, self.width_px)
                m = np.zeros((cy1 - cy0, cx1 - cx0), bool)
                for y0, x0, y1, x1 in self.tissue_boxes + self.pale_boxes + self.cancer_boxes:
                    m[max(y0 - cy0, 0) : max(y1 - cy0, 0), max(x0 - cx0, 0) : max(x1 - cx0, 0)] = True
                frac[cy, cx] = m.mean()
        return frac


def render_block(
    y0: int,
    x0: int,
    height: int,
    width: int,
    *,
    tissue_boxes: Sequence[Box],
    pale_boxes: Sequence[Box] = (),
    cancer_boxes: Sequence[Box] = (),
    seed: int = 0,
) -> npt.NDArray[np.uint8]:
    """The pixels of one block: glass, with textured H&E-like tissue inside the boxes.

    Cancer boxes are painted last, over tissue.

    Deterministic per pixel position (the noise is seeded by block origin), so
    blocks rendered in any order give the same slide.
    """
    rng = np.random.default_rng([seed, y0, x0])
    out = np.empty((height, width, 3), np.uint8)
    out[...] = GLASS_RGB
    yy = np.arange(y0, y0 + height)[:, None]
    xx = np.arange(x0, x0 + width)[None, :]
    for boxes, kind in ((tissue_boxes, "tissue"), (pale_boxes, "pale"), (cancer_boxes, "cancer")):
        for by0, bx0, by1, bx1 in boxes:
            sy0, sy1 = max(by0, y0), min(by1, y0 + height)
            sx0, sx1 = max(bx0, x0), min(bx1, x0 + width)
            if sy0 >= sy1 or sx0 >= sx1:
                continue
            ys, xs = slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0)
            if kind == "pale":
                base = np.broadcast_to(np.array(PALE_RGB, np.float32), (sy1 - sy0, sx1 - sx0, 3))
            elif kind == "cancer":
                phase = (np.sin(yy[ys] / 4.0) * np.sin(xx[:, xs] / 5.0)) > 0.3
                base = np.where(
                    phase[..., None], np.array(CANCER_NUCLEI_RGB, np.float32), np.array(CANCER_RGB, np.float32)
                )
            else:
                # Nuclei as a lattice of dark blobs on pink stroma: texture that JPEG keeps.
                phase = (np.sin(yy[ys] / 9.0) * np.sin(xx[:, xs] / 7.0)) > 0.55
                base = np.where(phase[..., None], np.array(NUCLEI_RGB, np.float32), np.array(STROMA_RGB, np.float32))
            noise = rng.normal(0.0, 6.0, size=(sy1 - sy0, sx1 - sx0, 1)).astype(np.float32)
            out[ys, xs] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return out


def _inside(y0: int, x0: int, y1: int, x1: int, boxes: Sequence[Box]) -> bool:
    return any(by0 <= y0 and bx0 <= x0 and y1 <= by1 and x1 <= bx1 for by0, bx0, by1, bx1 in boxes)


def _overlaps(y0: int, x0: int, y1: int, x1: int, box: Box) -> bool:
    by0, bx0, by1, bx1 = box
    return by0 < y1 and y0 < by1 and bx0 < x1 and x0 < bx1


def _tiles(
    height: int,
    width: int,
    tile_px: int,
    level_factor: int,
    boxes: Sequence[Box],
    pale: Sequence[Box],
    seed: int,
    texture_pool: int = 0,
    cancer: Sequence[Box] = (),
) -> Iterator[npt.NDArray[np.uint8]]:
    """Tiles of one pyramid level in row-major order (level pixels = mean of level_factor² level-0 pixels).

    With ``texture_pool`` > 0, tiles wholly inside a (non-pale) tissue box are
    taken from a pool of that many pre-rendered tissue tiles: benchmark slides
    of a gigapixel are then written in seconds instead of minutes.
    """
    f = level_factor
    pool = [
        render_block(0, i * tile_px * f, tile_px * f, tile_px * f, tissue_boxes=[(0, 0, 1 << 30, 1 << 30)], seed=seed)
        for i in range(texture_pool)
    ]
    if f > 1:
        pool = [t.reshape(tile_px, f, tile_px, f, 3).mean(axis=(1, 3)).astype(np.uint8) for t in pool]
    for ty in range(0, height, tile_px):
        for tx in range(0, width, tile_px):
            h = min(tile_px, height - ty)
            w = min(tile_px, width - tx)
            if (
                pool
                and h == w == tile_px
                and _inside(ty * f, tx * f, (ty + h) * f, (tx + w) * f, boxes)
                and not any(_overlaps(ty * f, tx * f, (ty + h) * f, (tx + w) * f, b) for b in tuple(pale) + tuple(cancer))
            ):
                yield pool[(ty // tile_px * 7 + tx // tile_px) % len(pool)]
                continue
            full = render_block(
                ty * f, tx * f, h * f, w * f, tissue_boxes=boxes, pale_boxes=pale, cancer_boxes=cancer, seed=seed
            )
            if f > 1:
                full = full.reshape(h, f, w, f, 3).mean(axis=(1, 3)).astype(np.uint8)
            tile = np.full((tile_px, tile_px, 3), GLASS_RGB, np.uint8)
            tile[:h, :w] = full
            yield tile


def write_slide(
    path: Path,
    height_px: int,
    width_px: int,
    *,
    tissue_boxes: Sequence[Box] = (),
    pale_boxes: Sequence[Box] = (),
    cancer_boxes: Sequence[Box] = (),
    compression: str = "jpeg",
    tile_px: int = 256,
    n_levels: int = 3,
    mpp_um: float | None = 0.5,
    seed: int = 0,
    texture_pool: int = 0,
) -> SyntheticSlide:
    """Write a generated pyramidal tiled TIFF and return its description.

    Parameters
    ----------
    path
        Output ``.tif`` path.
    height_px, width_px
        Level-0 size (any size >= 1).
    tissue_boxes, pale_boxes, cancer_boxes
        ``(y0, x0, y1, x1)`` rectangles of normally stained tissue, of pale
        tissue and of "cancer" (painted over tissue).
    compression
        ``"jpeg"`` (lossy, like real scanners) or ``"zlib"`` (lossless, for
        pixel-exact tests).
    tile_px
        TIFF tile side (a multiple of 16).
    n_levels
        Pyramid levels, each half the previous (stored as SubIFDs); levels
        that would be smaller than one tile are not written.
    mpp_um
        Written as TIFF XResolution in px/cm; None writes no resolution.
    texture_pool
        Reuse this many pre-rendered tissue tiles (fast writing of large
        benchmark slides); 0 renders every tile.
    """
    path = Path(path)
    factors = [2**i for i in range(n_levels) if i == 0 or min(height_px, width_px) // 2**i >= tile_px]
    kwargs: dict[str, Any] = {"tile": (tile_px, tile_px), "photometric": "rgb", "compression": compression}
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": 90}
    if mpp_um is not None:
        kwargs["resolution"] = (1e4 / mpp_um, 1e4 / mpp_um)
        kwargs["resolutionunit"] = "CENTIMETER"
    boxes, pale, cancer = tuple(tissue_boxes), tuple(pale_boxes), tuple(cancer_boxes)
    with tifffile.TiffWriter(path, bigtiff=height_px * width_px * 3 > 2**31) as tw:
        for i, f in enumerate(factors):
            h, w = -(-height_px // f), -(-width_px // f)
            if f > 1:
                # Level sizes are floor-divided like real pyramids; tiles cover the remainder.
                h, w = height_px // f, width_px // f
            extra: dict[str, Any] = {"subifds": len(factors) - 1} if i == 0 else {"subfiletype": 1}
            tw.write(
                _tiles(h, w, tile_px, f, boxes, pale, seed, texture_pool, cancer),
                shape=(h, w, 3),
                dtype=np.uint8,
                **kwargs,
                **extra,
            )
    return SyntheticSlide(
        path=path,
        height_px=height_px,
        width_px=width_px,
        mpp_um=mpp_um,
        tissue_boxes=boxes,
        pale_boxes=pale,
        cancer_boxes=cancer,
    )
