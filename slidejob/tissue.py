"""Tissue detection on a low-resolution image, mapped onto the level-0 chunk grid.

Pure functions on numpy arrays: no paths, no Dask.  The detector separates
stained tissue from glass by saturation (glass is grey-white, H&E is pink and
purple), with an Otsu threshold that is clamped so that pale tissue is kept
when a slide is mostly glass or mostly tissue.  Cheap rules drop what is
coloured but is not tissue: green/blue marker pen and the black borders some
scanners leave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

#: The saturation threshold never goes above this: pale (poorly stained or
#: thin) tissue sits around 0.08-0.15 and must not be dropped.
MAX_SATURATION_THRESHOLD = 0.08
#: ...nor below this: sensor and JPEG noise on glass reaches ~0.04 per pixel.
MIN_SATURATION_THRESHOLD = 0.05
#: Darker than this (value channel, 0-1) is scanner border, black pen or dust.
MIN_VALUE = 0.15
#: Default fraction of a chunk that must be tissue for the chunk to be kept;
#: small, because a chunk with a sliver of tissue is cheap and a missed
#: lesion is not.
DEFAULT_MIN_TISSUE_FRACTION = 0.01


@dataclass(frozen=True)
class TissueParams:
    """Knobs of :func:`detect_tissue` (defaults err toward keeping tissue)."""

    max_saturation_threshold: float = MAX_SATURATION_THRESHOLD
    min_saturation_threshold: float = MIN_SATURATION_THRESHOLD
    min_value: float = MIN_VALUE
    #: holes in tissue smaller than this fraction of the image are filled
    max_hole_fraction: float = 0.001
    #: specks smaller than this fraction of the image are removed
    min_object_fraction: float = 0.00002


def otsu_threshold(values: npt.NDArray[np.floating], bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1].

    >>> otsu_threshold(np.array([0.1] * 50 + [0.9] * 50)) > 0.1
    True
    """
    if values.size == 0:
        return 0.0
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


#: Paeth's 19 compare-exchanges that leave the median of 9 values in the fifth (as in Devillard's opt_med9).
_MEDIAN9_NETWORK = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
                    (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def median3x3(image: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    """``scipy.ndimage.median_filter(image, size=3, mode="nearest")`` of a 2-D array, by a sorting network.

    Elementwise minima and maxima of the nine shifted views: the same values
    (a median is one of its inputs), ~5x faster than scipy's general rank filter
    on a 512² thumbnail (10 against 49 ms).

    >>> median3x3(np.array([[1, 9, 2], [8, 3, 7], [4, 6, 5]], np.float32)).tolist()
    [[3.0, 3.0, 3.0], [4.0, 5.0, 5.0], [4.0, 5.0, 5.0]]
    """
    padded = np.pad(image, 1, mode="edge")
    h, w = image.shape
    v = [padded[i : i + h, j : j + w] for i in range(3) for j in range(3)]
    for i, j in _MEDIAN9_NETWORK:
        v[i], v[j] = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])
    return v[4]


def saturation_value(rgb: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Saturation and value (0-1) of an RGB uint8 image, exactly as :func:`hsv` gives them, without the hue.

    Max and min are taken on the uint8 channels (the float conversion keeps their order), plane by
    plane as :func:`hsv` takes them (along a last axis of 3 it was 15x slower: 3.85 against 0.25 ms
    for the 270² block means of a 2160² inference window), then converted as :func:`hsv` converts
    every channel: a third of the work where no hue is needed.

    >>> s, v = saturation_value(np.array([[[200, 100, 50], [0, 0, 0]]], np.uint8))
    >>> s.tolist(), v.tolist() == hsv(np.array([[[200, 100, 50], [0, 0, 0]]], np.uint8))[2].tolist()
    ([[0.75, 0.0]], True)
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    vmax = np.maximum(np.maximum(r, g), b).astype(np.float32) / 255.0
    vmin = np.minimum(np.minimum(r, g), b).astype(np.float32) / 255.0
    delta = vmax - vmin
    return np.divide(delta, vmax, out=np.zeros_like(vmax), where=vmax > 0), vmax


def hsv(rgb: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float32], ...]:
    """Hue (degrees), saturation and value (0-1) of an RGB uint8 image."""
    # Channel by channel (contiguous planes; max and min of three arrays, not along a last axis
    # of 3): 4.5x faster on a 512² thumbnail than one float image, the same values for all 2^24 colours.
    r, g, b = (rgb[..., i].astype(np.float32) / 255.0 for i in range(3))
    vmax = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    delta = vmax - vmin
    sat = np.divide(delta, vmax, out=np.zeros_like(vmax), where=vmax > 0)
    safe = np.where(delta > 0, delta, np.float32(1.0))
    hue = np.where(
        vmax == r,
        ((g - b) / safe) % np.float32(6.0),
        np.where(vmax == g, (b - r) / safe + np.float32(2.0), (r - g) / safe + np.float32(4.0)),
    )
    hue = np.where(delta > 0, hue * np.float32(60.0), np.float32(0.0)).astype(np.float32)
    return hue, sat, vmax


def pen_mask(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Green, cyan and saturated blue marker ink: hues H&E never takes.

    Hematoxylin is blue-purple (hue ~250-290°), eosin pink (~300-360°); marker
    pens are green (90-170°) or a saturated pure blue (200-240°).
    """
    hue, sat, _ = hsv(rgb)
    return _pen(hue, sat)


def _pen(hue: npt.NDArray[np.float32], sat: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    green = (hue >= 70) & (hue <= 190) & (sat > 0.15)
    blue = (hue > 190) & (hue <= 240) & (sat > 0.5)
    return green | blue


def detect_tissue(rgb: npt.NDArray[np.uint8], params: TissueParams | None = None) -> npt.NDArray[np.bool_]:
    """Boolean tissue mask of a low-resolution RGB image.

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` uint8 thumbnail of the slide.
    params
        Thresholds; the defaults keep pale tissue.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` bool, True where there is tissue.
    """
    p = params or TissueParams()
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    hue, raw_sat, val = hsv(rgb)
    # A 3x3 median removes per-pixel noise on glass without growing straight
    # tissue edges (a mean would push them out by a pixel, 32 px at level 0).
    sat = median3x3(raw_sat)
    bright = val > p.min_value
    threshold = otsu_threshold(sat[bright]) if bright.any() else 1.0
    threshold = float(np.clip(threshold, p.min_saturation_threshold, p.max_saturation_threshold))
    # Grow pen and darkness by the filter's reach, or their rims can pass as tissue.
    pen = ndimage.binary_dilation(_pen(hue, raw_sat) | ~bright, iterations=1)
    mask = (sat > threshold) & ~pen
    n = mask.size
    # Fill small holes (lumen, fat cells read as glass) but not large ones.
    labels, count = ndimage.label(~mask)
    if count:
        sizes = np.bincount(labels.ravel())
        small_hole = sizes < max(1, p.max_hole_fraction * n)
        small_hole[0] = False
        mask |= small_hole[labels]
    # Remove isolated specks (dust, debris, JPEG noise).
    labels, count = ndimage.label(mask)
    if count:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(1, p.min_object_fraction * n)
        keep[0] = False
        mask = keep[labels]
    return mask


def chunk_tissue_fraction(
    tissue: npt.NDArray[np.bool_],
    *,
    downsample_yx: tuple[float, float],
    level0_shape_px: tuple[int, int],
    chunk_px: int = 512,
) -> npt.NDArray[np.float32]:
    """Fraction of each level-0 chunk covered by tissue.

    The thumbnail's pixel ``(i, j)`` covers level-0 pixels
    ``[i*dy, (i+1)*dy) x [j*dx, (j+1)*dx)``.  Each chunk's rectangle is mapped
    into thumbnail coordinates (rounded outward, so a chunk touching tissue
    sees it) and its fraction is read from a summed-area table, which handles
    non-integer pyramid downsamples exactly enough and costs O(pixels).

    Returns
    -------
    numpy.ndarray
        ``(ceil(H/chunk_px), ceil(W/chunk_px))`` float32 in [0, 1].
    """
    h0, w0 = level0_shape_px
    dy, dx = downsample_yx
    gh, gw = -(-h0 // chunk_px), -(-w0 // chunk_px)
    th, tw = tissue.shape
    sat = np.zeros((th + 1, tw + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(tissue, axis=0, dtype=np.int64), axis=1)
    ys = np.arange(gh + 1) * chunk_px
    xs = np.arange(gw + 1) * chunk_px
    ys[-1], xs[-1] = h0, w0
    ty0 = np.clip(np.floor(ys[:-1] / dy).astype(np.int64), 0, th - 1)
    ty1 = np.clip(np.ceil(ys[1:] / dy).astype(np.int64), ty0 + 1, th)
    tx0 = np.clip(np.floor(xs[:-1] / dx).astype(np.int64), 0, tw - 1)
    tx1 = np.clip(np.ceil(xs[1:] / dx).astype(np.int64), tx0 + 1, tw)
    total = (
        sat[ty1[:, None], tx1[None, :]]
        - sat[ty0[:, None], tx1[None, :]]
        - sat[ty1[:, None], tx0[None, :]]
        + sat[ty0[:, None], tx0[None, :]]
    )
    area = (ty1 - ty0)[:, None] * (tx1 - tx0)[None, :]
    return (total / area).astype(np.float32)


def grid_to_text(grid: npt.NDArray[np.bool_]) -> list[str]:
    """Rows of ``#`` (tissue) and ``.`` (background): a compact, readable grid for JSON attributes.

    >>> grid_to_text(np.array([[True, False], [False, False]]))
    ['#.', '..']
    """
    return ["".join("#" if v else "." for v in row) for row in grid]


def text_to_grid(rows: list[str]) -> npt.NDArray[np.bool_]:
    """Inverse of :func:`grid_to_text`."""
    if not rows:
        return np.zeros((0, 0), dtype=bool)
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def block_mean_downsample(rgb: npt.NDArray[np.uint8], factor: int) -> npt.NDArray[np.uint8]:
    """Downsample by an integer factor with a box filter; edges that do not fill a box are averaged as they are.

    >>> block_mean_downsample(np.full((5, 4, 3), 10, np.uint8), 2).shape
    (3, 2, 3)
    """
    if factor == 1:
        return rgb
    h, w, c = rgb.shape
    oh, ow = -(-h // factor), -(-w // factor)
    ph, pw = oh * factor - h, ow * factor - w
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
    # Integer box sums, rows then columns, in uint16 while a box's sum fits (factor <= 16): half the
    # memory traffic of uint32.  Rows: one reduction over contiguous runs.  Columns: an add per
    # offset in the box — numpy's reduction over the short middle axis of (oh, ow, factor, c) was
    # 4x slower (9.5 against 2.6 ms for a 2160² window at factor 8; glass_mask went 14.5 -> ~5 ms).
    acc = np.uint16 if factor * factor * 255 <= np.iinfo(np.uint16).max else np.uint32
    rows = rgb.reshape(oh, factor, ow * factor * c).sum(axis=1, dtype=acc).reshape(oh, ow, factor, c)
    sums = rows[:, :, 0].copy()
    for i in range(1, factor):
        sums += rows[:, :, i]
    return mean_round_half_even(sums, factor * factor).astype(np.uint8)


def mean_round_half_even(sums: npt.NDArray[np.unsignedinteger], n: int) -> npt.NDArray[np.unsignedinteger]:
    """``sums / n`` rounded half to even, in integers: what ``np.round`` gives for the float mean.

    >>> mean_round_half_even(np.array([2, 6, 7, 5], np.uint32), 4).tolist()
    [0, 2, 2, 1]
    """
    q, r = np.divmod(sums, n)
    return q + ((2 * r > n) | ((2 * r == n) & (q % 2 == 1)))


def glass_mask(rgb: npt.NDArray[np.uint8], *, block_px: int = 8, grow_blocks: int = 2) -> npt.NDArray[np.bool_]:
    """Full-resolution mask of bare glass in an (H, W, 3) region, True where there is certainly no tissue.

    Computed on ``block_px`` box means (cheap next to a U-Net forward) with
    fixed, permissive thresholds: a block is glass only when it is both
    unsaturated (< :data:`MIN_SATURATION_THRESHOLD`, below pale tissue) and
    bright; tissue is then grown by ``grow_blocks`` blocks so tissue edges are
    never cut.  The inference stage uses it to keep cancer calls off glass,
    which the model never saw in training.
    """
    h, w = rgb.shape[:2]
    small = block_mean_downsample(rgb, block_px)
    sat, val = saturation_value(small)
    tissue_like = ~((sat < MIN_SATURATION_THRESHOLD) & (val > 0.75))
    if grow_blocks:
        tissue_like = ndimage.binary_dilation(tissue_like, iterations=grow_blocks)
    full = np.repeat(np.repeat(~tissue_like, block_px, axis=0), block_px, axis=1)
    return full[:h, :w]
