"""Per-slide cancer statistics from the level-0 mask, computed chunk by chunk.

Lesions are the connected components of the level-0 mask with **8-connectivity**:
pixels that touch at an edge or only at a corner belong to the same lesion
(``scipy.ndimage.label`` with a 3×3 structure of ones), across chunk borders
as well as within a chunk.

The work follows dask-image's ``find_objects``: each present 512×512 chunk is
reduced to a small :class:`ChunkPartial` (its components' areas, bounding
boxes, centroid sums, convex hulls and the labels on its four edges) by
:func:`partial_from_array`; :func:`merge_partials` joins components whose edge
pixels touch a neighbouring chunk's (sideways, up/down and diagonally at chunk
corners) and reduces them to one :class:`SlideStats`.  The mask is never
loaded whole, and the result is exact: it equals labelling the whole level-0
mask at once.

Geometry is in level-0 pixel coordinates with pixel ``(row, col)`` covering
the unit square ``[col, col + 1] × [row, row + 1]`` (the frame QuPath and the
GeoJSON export use), so a pixel's centre is at ``(row + 0.5, col + 0.5)``:

- bounding box ``(y0, x0, y1, x1)``, ends exclusive;
- centroid: the mean of the lesion's pixel centres;
- largest diameter: the largest distance between two points of the lesion
  taken as a union of pixel squares (its maximum Feret diameter), so a single
  pixel measures √2 px.  It is exact: the farthest pair of points lies on
  pixel corners of the lesion's convex hull.

Areas and lengths in mm are ``None`` when µm/px is unknown; nothing is guessed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dask
import numpy as np
import numpy.typing as npt
import zarr
from dask.delayed import Delayed
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from slidejob.chunkstore import stored_chunks
from slidejob.maskstore import TISSUE_FRACTION

#: The 8-connectivity structure used for lesions everywhere in slidejob.
CONNECTIVITY_8 = np.ones((3, 3), dtype=bool)

#: Size categories from the largest lesion's largest diameter (lymph-node
#: metastasis thresholds): isolated tumour cells below 0.2 mm, micrometastasis
#: from 0.2 mm to 2 mm inclusive, macrometastasis above 2 mm.
ITC_BELOW_MM = 0.2
MACRO_ABOVE_MM = 2.0
SIZE_CATEGORIES = ("none", "itc", "micrometastasis", "macrometastasis")

LEVEL0 = "0"

IntArray = npt.NDArray[np.int64]

#: Components with at most this many row-extreme corners (64 rows) skip the
#: hull: all their corner pairs are compared in vectorised steps, by size bucket.
_PAIRWISE_BUCKETS = (4, 8, 16, 32, 64, 128, 256)
_PAIRWISE_CORNERS = _PAIRWISE_BUCKETS[-1]
#: Corner pairs per vectorised step (bounds its temporary arrays to ~50 MB).
_PAIRWISE_BLOCK = 1 << 21


# --------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion:
    """One lesion (8-connected component of the level-0 mask).

    ``lesion_id`` numbers lesions 1, 2, … in raster order of their first pixel,
    the order ``scipy.ndimage.label`` gives on the whole mask.
    """

    lesion_id: int
    area_px: int
    area_mm2: float | None
    bbox_px: tuple[int, int, int, int]
    centroid_yx_px: tuple[float, float]
    diameter_px: float
    diameter_mm: float | None
    first_pixel_yx: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON/SQL-friendly record."""
        y0, x0, y1, x1 = self.bbox_px
        return {
            "lesion_id": self.lesion_id,
            "area_px": self.area_px,
            "area_mm2": self.area_mm2,
            "bbox_y0_px": y0,
            "bbox_x0_px": x0,
            "bbox_y1_px": y1,
            "bbox_x1_px": x1,
            "centroid_y_px": self.centroid_yx_px[0],
            "centroid_x_px": self.centroid_yx_px[1],
            "diameter_px": self.diameter_px,
            "diameter_mm": self.diameter_mm,
        }


@dataclass(frozen=True)
class SlideStats:
    """Cancer statistics of one slide.

    ``cancer_area_px`` is the total lesion area.  ``cancer_fraction`` is
    cancer area over tissue area (users compare with tissue, not with the
    whole image); tissue area comes from the thumbnail-based tissue fraction
    of each chunk, so the fraction is an estimate and may exceed 1 only if the
    model marks glass as cancer.  ``size_category`` is ``"none"`` without
    lesions, else from the largest lesion diameter (see :func:`size_category`),
    and ``None`` when µm/px is unknown.
    """

    height_px: int
    width_px: int
    mpp_um: float | None
    tissue_area_px: int
    tissue_area_mm2: float | None
    cancer_area_px: int
    cancer_area_mm2: float | None
    cancer_fraction: float | None
    lesion_count: int
    largest_lesion_area_px: int
    largest_lesion_area_mm2: float | None
    largest_diameter_px: float
    largest_diameter_mm: float | None
    size_category: str | None
    lesions: tuple[Lesion, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The per-slide figures as a flat record (without the lesion list)."""
        return {
            "height_px": self.height_px,
            "width_px": self.width_px,
            "mpp_um": self.mpp_um,
            "tissue_area_px": self.tissue_area_px,
            "tissue_area_mm2": self.tissue_area_mm2,
            "cancer_area_px": self.cancer_area_px,
            "cancer_area_mm2": self.cancer_area_mm2,
            "cancer_fraction": self.cancer_fraction,
            "lesion_count": self.lesion_count,
            "largest_lesion_area_px": self.largest_lesion_area_px,
            "largest_lesion_area_mm2": self.largest_lesion_area_mm2,
            "largest_diameter_px": self.largest_diameter_px,
            "largest_diameter_mm": self.largest_diameter_mm,
            "size_category": self.size_category,
        }


@dataclass(frozen=True)
class ChunkPartial:
    """What one chunk contributes: its components (local labels 1..n) and its edges.

    Coordinates are global level-0 pixels.  Per component ``i`` (local label
    ``i + 1``): ``area_px``; ``bbox_px`` (y0, x0, y1, x1, ends exclusive);
    ``sum_y_px``/``sum_x_px``, the sums of its pixels' row/column indices;
    ``first_px``, the (row, col) of its first pixel in raster order;
    ``diameter_sq_px``, its squared largest diameter within this chunk; and,
    only for components touching the chunk's edge (the only ones a merge can
    extend), points whose convex hull is that of its pixel squares,
    ``hull_yx[hull_start[i]:hull_start[i + 1]]``.  ``top``, ``bottom``,
    ``left`` and ``right`` are the local labels along the chunk's four edges
    (0 = no lesion), in the narrowest unsigned type that holds them; all four
    are empty when the chunk has no component.
    """

    y0: int
    x0: int
    height_px: int
    width_px: int
    area_px: IntArray
    bbox_px: IntArray
    sum_y_px: IntArray
    sum_x_px: IntArray
    first_px: IntArray
    diameter_sq_px: IntArray
    hull_yx: IntArray
    hull_start: IntArray
    top: npt.NDArray[np.unsignedinteger]
    bottom: npt.NDArray[np.unsignedinteger]
    left: npt.NDArray[np.unsignedinteger]
    right: npt.NDArray[np.unsignedinteger]

    @property
    def n_components(self) -> int:
        return int(self.area_px.shape[0])

    def hull(self, i: int) -> IntArray:
        return self.hull_yx[self.hull_start[i] : self.hull_start[i + 1]]


# --------------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------------


def convex_hull(points_yx: IntArray) -> IntArray:
    """Vertices of the convex hull of integer points (Andrew's monotone chain).

    >>> convex_hull(np.array([[0, 0], [0, 1], [1, 0], [1, 1], [0, 0]])).tolist()
    [[0, 0], [1, 0], [1, 1], [0, 1]]
    """
    pts = np.unique(np.asarray(points_yx, dtype=np.int64), axis=0)
    if len(pts) <= 2:
        return pts
    p = pts.tolist()

    def half(seq: Iterable[list[int]]) -> list[list[int]]:
        out: list[list[int]] = []
        for q in seq:
            while len(out) >= 2:
                (ay, ax), (by, bx) = out[-2], out[-1]
                if (by - ay) * (q[1] - ax) - (bx - ax) * (q[0] - ay) > 0:
                    break
                out.pop()
            out.append(q)
        return out

    lower, upper = half(p), half(reversed(p))
    return np.array(lower[:-1] + upper[:-1], dtype=np.int64)


def max_distance_sq(points_yx: IntArray, block: int = 1024) -> int:
    """Largest squared distance between two of the points (0 for fewer than two).

    >>> max_distance_sq(np.array([[0, 0], [3, 4], [1, 1]]))
    25
    """
    pts = np.asarray(points_yx, dtype=np.int64)
    best = 0
    for i in range(0, len(pts), block):
        d = pts[i : i + block, None, :] - pts[None, :, :]
        best = max(best, int((d * d).sum(axis=-1).max(initial=0)))
    return best


def size_category(largest_diameter_mm: float | None, lesion_count: int) -> str | None:
    """Category of a slide from its largest lesion diameter.

    ``"none"`` without lesions (whatever µm/px); ``None`` with lesions but
    unknown µm/px; else ``"itc"`` (< 0.2 mm), ``"micrometastasis"``
    (0.2 mm to 2 mm) or ``"macrometastasis"`` (> 2 mm).

    >>> size_category(0.1, 1), size_category(0.2, 1), size_category(2.0, 1), size_category(2.01, 3)
    ('itc', 'micrometastasis', 'micrometastasis', 'macrometastasis')
    >>> size_category(None, 0), size_category(None, 2)
    ('none', None)
    """
    if lesion_count == 0:
        return "none"
    if largest_diameter_mm is None:
        return None
    if largest_diameter_mm < ITC_BELOW_MM:
        return "itc"
    if largest_diameter_mm <= MACRO_ABOVE_MM:
        return "micrometastasis"
    return "macrometastasis"


def _mm(px: float, mpp_um: float | None) -> float | None:
    return None if mpp_um is None else px * mpp_um / 1000.0


def _mm2(px: float, mpp_um: float | None) -> float | None:
    return None if mpp_um is None else px * (mpp_um / 1000.0) ** 2


# --------------------------------------------------------------------------------------------------------
# Pure core
# --------------------------------------------------------------------------------------------------------


_NO_EDGE = np.zeros(0, np.uint8)


def on_border(labels: npt.NDArray[np.integer], n: int) -> npt.NDArray[np.bool_]:
    """For labels 0..n of a label image, whether the label appears on the image's outer rows or columns.

    Entry 0 (background) is True when background touches the border.

    >>> on_border(np.array([[1, 0, 0], [0, 2, 0], [0, 0, 0]]), 2).tolist()
    [True, True, False]
    """
    return _on_edges(_edges(labels), n)


def _edges(image: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], ...]:
    """An image's outer rows and columns: top, bottom, left, right."""
    return image[0, :], image[-1, :], image[:, 0], image[:, -1]


def _on_edges(edges: Sequence[npt.NDArray[np.integer]], n: int) -> npt.NDArray[np.bool_]:
    """For labels 0..n, whether the label appears in any of ``edges``."""
    border = np.zeros(n + 1, bool)
    for edge in edges:
        border[edge] = True
    return border


def calls_box(mask: npt.NDArray[Any]) -> tuple[slice, slice] | None:
    """The smallest box (rows, cols) holding every non-zero pixel of a 2-D mask; None where there is none.

    Two passes along the axes (~0.15 ms each on a 2048² uint8 block) against a labelling pass over
    the whole block (~8.5 ms): labelling and run-finding then look at the box only.

    >>> m = np.zeros((5, 6), np.uint8); m[1, 2] = m[3, 4] = 1
    >>> calls_box(m), calls_box(np.zeros((2, 2)))
    ((slice(1, 4, None), slice(2, 5, None)), None)
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _empty_partial(y0: int, x0: int, shape: tuple[int, int]) -> ChunkPartial:
    z1 = np.zeros(0, np.int64)
    return ChunkPartial(
        y0=y0,
        x0=x0,
        height_px=shape[0],
        width_px=shape[1],
        area_px=z1,
        bbox_px=np.zeros((0, 4), np.int64),
        sum_y_px=z1,
        sum_x_px=z1,
        first_px=np.zeros((0, 2), np.int64),
        diameter_sq_px=z1,
        hull_yx=np.zeros((0, 2), np.int64),
        hull_start=np.zeros(1, np.int64),
        # No component touches an edge: nothing to keep (a slide's partials all sit in the client at once).
        top=_NO_EDGE,
        bottom=_NO_EDGE,
        left=_NO_EDGE,
        right=_NO_EDGE,
    )


def partial_from_array(
    mask_chunk: npt.NDArray[np.uint8],
    y0: int,
    x0: int,
    *,
    block_labels: npt.NDArray[np.int32] | None = None,
    removed: npt.NDArray[np.bool_] | None = None,
) -> ChunkPartial:
    """Reduce one chunk of the level-0 mask to its :class:`ChunkPartial`.

    Parameters
    ----------
    mask_chunk
        The chunk's pixels (any non-zero value is cancer), at most one Zarr
        chunk; smaller at the slide's right and bottom edges.
    y0, x0
        The chunk's global offset in level-0 pixels.
    block_labels, removed
        The chunk's cut of a labelling of a larger mask it lies in (an
        inference block's :func:`label_components`, made before
        :func:`remove_small_interior` zeroed the labels ``removed`` flags), to
        spare the chunk a labelling of its own (~0.5 ms of ~1.2 for a lesion's
        chunk).  A component of the larger mask may fall into several pieces in
        the chunk; they keep its one label, as the merge would have joined them
        anyway (a piece touching no edge of the chunk is a whole component).
        ``mask_chunk`` is then only asked whether it holds any call.

    Returns
    -------
    ChunkPartial
        Components labelled with 8-connectivity, and everything
        :func:`merge_partials` needs to join them across chunk borders.
    """
    if block_labels is None:
        mask = np.asarray(mask_chunk) != 0
        if mask.ndim != 2 or 0 in mask.shape:
            raise ValueError(f"expected a non-empty 2-D mask chunk, got shape {mask.shape}")
        if not mask.any():  # the common chunk: no call in it
            return _empty_partial(y0, x0, mask.shape)
        labels, n = ndimage.label(mask, structure=CONNECTIVITY_8, output=np.int32)
        if n == 0:
            return _empty_partial(y0, x0, mask.shape)
        h, w = mask.shape
        run_lab, run_row, run_c0, run_c1 = _runs(labels)
        edges = _edges(labels)
    else:
        if block_labels.ndim != 2 or 0 in block_labels.shape:
            raise ValueError(f"expected a non-empty 2-D label chunk, got shape {block_labels.shape}")
        h, w = block_labels.shape
        box = calls_box(np.asarray(mask_chunk))  # from the uint8 mask: 4x fewer bytes than the labels
        if box is None:  # the common chunk: no call in it
            return _empty_partial(y0, x0, (h, w))
        # Runs only in the box around the calls: a chunk with a few specks costs a fraction of a full pass.
        run_val, run_row, run_c0, run_c1 = _runs(block_labels[box])
        run_row += box[0].start
        run_c0 += box[1].start
        run_c1 += box[1].start
        if removed is not None and len(run_val):
            keep = ~removed[run_val + 1]
            run_val, run_row, run_c0, run_c1 = run_val[keep], run_row[keep], run_c0[keep], run_c1[keep]
        if not len(run_val):
            return _empty_partial(y0, x0, (h, w))
        # The block's labels present here, renumbered 1..n in their order.
        present, run_lab = np.unique(run_val, return_inverse=True)
        n = len(present)

        def renumber(edge: npt.NDArray[np.int32]) -> npt.NDArray[np.int64]:
            label = edge.astype(np.int64)
            if removed is not None:
                label[removed[label]] = 0
            return np.where(label > 0, np.searchsorted(present, label - 1) + 1, 0)

        edges = tuple(renumber(edge) for edge in _edges(block_labels))
    run_len = run_c1 - run_c0
    area = np.bincount(run_lab, weights=run_len, minlength=n).astype(np.int64)
    sum_y = np.bincount(run_lab, weights=run_row * run_len, minlength=n).astype(np.int64) + area * y0
    # Σ of c0 .. c1-1 per run, an exact integer since one of len, c0 + c1 - 1 is even.
    col_sum = (run_c0 + run_c1 - 1) * run_len // 2
    sum_x = np.bincount(run_lab, weights=col_sum, minlength=n).astype(np.int64) + area * x0

    # Leftmost and rightmost pixel of each component on each row: the corners
    # of those pixels span the convex hull of the component's pixel squares.
    key = run_lab * h + run_row
    order = np.argsort(key, kind="stable")
    key_s = key[order]
    first = np.flatnonzero(np.r_[True, key_s[1:] != key_s[:-1]])
    row_lab = run_lab[order][first]
    row_y = run_row[order][first]
    row_c0 = np.minimum.reduceat(run_c0[order], first)
    row_c1 = np.maximum.reduceat(run_c1[order], first)

    lab_start = np.flatnonzero(np.r_[True, row_lab[1:] != row_lab[:-1]])
    lab_end = np.r_[lab_start[1:], len(row_lab)]
    bbox = np.stack(
        [
            row_y[lab_start] + y0,
            np.minimum.reduceat(row_c0, lab_start) + x0,
            row_y[lab_end - 1] + 1 + y0,
            np.maximum.reduceat(row_c1, lab_start) + x0,
        ],
        axis=1,
    )
    first_px = np.stack([row_y[lab_start] + y0, row_c0[lab_start] + x0], axis=1)

    on_edge = _on_edges(edges, n)[1:]

    # Corners grouped by component, rows ascending (row_* are sorted by component then row), only
    # those that can be vertices of the component's hull (:func:`_hull_rows`): the diameter and the
    # merge need no others, and a speck of 16 rows keeps ~12 of its 64 corners.
    keep_left = _hull_rows(row_c0, lab_start, lab_end, left=True)
    keep_right = _hull_rows(row_c1, lab_start, lab_end, left=False)
    corners = np.stack(
        [
            np.stack([row_y, row_c0], 1),
            np.stack([row_y + 1, row_c0], 1),
            np.stack([row_y, row_c1], 1),
            np.stack([row_y + 1, row_c1], 1),
        ],
        axis=1,
    )[np.stack([keep_left, keep_left, keep_right, keep_right], axis=1)] + np.array([y0, x0], np.int64)
    per_row = 2 * keep_left.astype(np.int64) + 2 * keep_right
    bounds = np.r_[0, np.cumsum(per_row)][np.r_[lab_start, len(row_lab)]]
    n_corners = np.diff(bounds)

    diameter_sq = np.zeros(n, np.int64)
    # Components of up to _PAIRWISE_CORNERS corners (nearly all of a noisy mask) all at
    # once: every pair of their corners, bucketed by size (padding repeats the last
    # corner) and blocked to bound memory.  Only larger ones take the (Python) hull.
    # In the chunk's own coordinates (0..512), int32: squared distances stay below 2^20,
    # and the pairs' arrays, most of this function's time on a noisy mask, halve (int64
    # for an array over 16384 a side, where 2 x side^2 could pass 2^31).
    local = (corners - np.array([y0, x0], np.int64)).astype(np.int32 if max(h, w) <= 16384 else np.int64)
    lower = 0
    for size in _PAIRWISE_BUCKETS:
        bucket = np.flatnonzero((n_corners > lower) & (n_corners <= size))
        lower = size
        step = max(1, _PAIRWISE_BLOCK // (size * size))
        for b in range(0, len(bucket), step):
            sel = bucket[b : b + step]
            pts = local[bounds[sel, None] + np.minimum(np.arange(size), n_corners[sel, None] - 1)]
            dy = pts[:, :, None, 0] - pts[:, None, :, 0]
            dx = pts[:, :, None, 1] - pts[:, None, :, 1]
            diameter_sq[sel] = (dy * dy + dx * dx).max(axis=(1, 2))
    edge_dtype = np.min_scalar_type(n)
    hulls: list[IntArray] = []
    hull_len = np.zeros(n, np.int64)
    for i in np.flatnonzero(on_edge | (n_corners > _PAIRWISE_CORNERS)):
        pts = corners[bounds[i] : bounds[i + 1]]
        if n_corners[i] > _PAIRWISE_CORNERS:
            pts = convex_hull(pts)
            diameter_sq[i] = max_distance_sq(pts)
        if on_edge[i]:
            # Any superset of the hull's vertices serves the merge, which takes the hull of the union.
            hulls.append(pts)
            hull_len[i] = len(pts)
    return ChunkPartial(
        y0=y0,
        x0=x0,
        height_px=h,
        width_px=w,
        area_px=area,
        bbox_px=bbox,
        sum_y_px=sum_y,
        sum_x_px=sum_x,
        first_px=first_px,
        diameter_sq_px=diameter_sq,
        hull_yx=np.concatenate(hulls) if hulls else np.zeros((0, 2), np.int64),
        hull_start=np.r_[0, np.cumsum(hull_len)].astype(np.int64),
        # The narrowest type holding the labels: edges are most of a partial's bytes.
        top=edges[0].astype(edge_dtype),
        bottom=edges[1].astype(edge_dtype),
        left=edges[2].astype(edge_dtype),
        right=edges[3].astype(edge_dtype),
    )


def _hull_rows(edge: IntArray, starts: IntArray, ends: IntArray, *, left: bool) -> npt.NDArray[np.bool_]:
    """Which rows' ``edge`` corners (a component's leftmost ``c0`` or rightmost ``c1`` per row) can be hull vertices.

    Rows are grouped by component (``starts[k]:ends[k]``), top to bottom.  A row
    whose edge has a row above it at least as far out and a row below it at
    least as far out lies on or inside the segment between those two rows'
    corners, so neither of its corners is a vertex of the component's convex
    hull: the hull, and the largest distance (attained at hull vertices), are
    the same without them.

    >>> c0 = np.array([0, 3, 1, 5, 0, 2])  # one component of six rows
    >>> _hull_rows(c0, np.array([0]), np.array([6]), left=True).tolist()
    [True, False, False, False, True, True]
    >>> _hull_rows(np.array([4, 1, 2, 9, 0]), np.array([0, 3]), np.array([3, 5]), left=False).tolist()
    [True, False, True, True, True]
    """
    n_rows = len(edge)
    if n_rows == 0:
        return np.zeros(0, bool)
    out = -edge if left else edge  # "further out" is larger in both cases
    group = np.repeat(np.arange(len(starts)), ends - starts)
    # Running max within each component, from the top and from the bottom: shifting each component's
    # values up by a stride larger than any edge restarts the running max at every component.
    stride = int(np.abs(out).max()) * 2 + 2
    from_top = np.maximum.accumulate(out + group * stride) - group * stride
    from_bottom = (np.maximum.accumulate((out - group * stride)[::-1]) + group[::-1] * stride)[::-1]
    # Best strictly above and strictly below (none: -inf at a component's first or last row).
    above = np.r_[np.iinfo(np.int64).min, from_top[:-1]]
    below = np.r_[from_bottom[1:], np.iinfo(np.int64).min]
    above[starts] = np.iinfo(np.int64).min
    below[ends - 1] = np.iinfo(np.int64).min
    return ~((above >= out) & (below >= out))


def _runs(labels: npt.NDArray[np.int32]) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """Horizontal runs of equal non-zero labels: (label - 1, row, first col, end col exclusive)."""
    h, w = labels.shape
    padded = np.zeros((h, w + 2), np.int32)
    padded[:, 1:-1] = labels
    # A boundary at (r, c): pixel c of row r starts a new value (c == w: the row's end).
    r, c = np.nonzero(padded[:, 1:] != padded[:, :-1])
    value = padded[r, c + 1]
    keep = np.flatnonzero(value > 0)
    # A run of a non-zero value always ends at the next boundary of the same row.
    return (
        value[keep].astype(np.int64) - 1,
        r[keep].astype(np.int64),
        c[keep].astype(np.int64),
        c[keep + 1].astype(np.int64),
    )


def _touching(a: npt.NDArray[np.unsignedinteger], b: npt.NDArray[np.unsignedinteger]) -> tuple[IntArray, IntArray]:
    """Pairs of labels (a[i], b[j]) with |i - j| <= 1 and both non-zero: 8-neighbours across a border."""
    if a.shape != b.shape:
        raise ValueError(
            f"neighbouring chunk edges differ in length ({a.shape[0]} and {b.shape[0]}): not one grid"
        )
    us, vs = [], []
    n = a.shape[0]
    for shift in (-1, 0, 1):
        ai = a[max(0, -shift) : n - max(0, shift)]
        bj = b[max(0, shift) : n - max(0, -shift)]
        hit = (ai > 0) & (bj > 0)
        us.append(ai[hit])
        vs.append(bj[hit])
    return np.concatenate(us).astype(np.int64), np.concatenate(vs).astype(np.int64)


def merge_partials(
    partials: Sequence[ChunkPartial],
    *,
    height_px: int,
    width_px: int,
    mpp_um: float | None,
    tissue_area_px: float,
) -> SlideStats:
    """Join chunk partials across chunk borders into the slide's statistics.

    Components of neighbouring chunks are one lesion when a pixel of one is an
    8-neighbour of a pixel of the other: along a shared edge (offsets -1, 0,
    +1) or, for diagonal chunks, the two pixels meeting at the chunk corner.
    The joining is a union-find over those contacts (connected components of
    the contact graph).  Absent chunks contribute nothing (they read as 0).

    Parameters
    ----------
    partials
        One :class:`ChunkPartial` per present chunk of one regular chunk grid.
    height_px, width_px
        Level-0 size of the slide.
    mpp_um
        µm per level-0 pixel, or ``None`` when unknown (mm figures are then ``None``).
    tissue_area_px
        Tissue area in level-0 pixels.

    Returns
    -------
    SlideStats
        Exact statistics of the level-0 mask, lesions numbered in raster order.
    """
    # Chunks without components add no lesion and touch none (a contact needs cancer on both sides).
    parts = sorted((p for p in partials if p.n_components), key=lambda p: (p.y0, p.x0))
    counts = np.array([p.n_components for p in parts], np.int64)
    offset = np.r_[0, np.cumsum(counts)].astype(np.int64)
    n_nodes = int(offset[-1])
    tissue_px = round(tissue_area_px)
    if n_nodes == 0:
        return _summarise([], height_px=height_px, width_px=width_px, mpp_um=mpp_um, tissue_px=tissue_px)

    by_top_left = {(p.y0, p.x0): i for i, p in enumerate(parts)}
    by_top_right = {(p.y0, p.x0 + p.width_px): i for i, p in enumerate(parts)}
    src: list[IntArray] = []
    dst: list[IntArray] = []

    def link(i: int, j: int, u: IntArray, v: IntArray) -> None:
        # Local labels start at 1; node ids at the partial's offset.
        src.append(u - 1 + offset[i])
        dst.append(v - 1 + offset[j])

    for i, p in enumerate(parts):
        below = (p.y0 + p.height_px, p.x0)
        if (j := by_top_left.get((p.y0, p.x0 + p.width_px))) is not None:
            link(i, j, *_touching(p.right, parts[j].left))
        if (j := by_top_left.get(below)) is not None:
            link(i, j, *_touching(p.bottom, parts[j].top))
        if (j := by_top_left.get((p.y0 + p.height_px, p.x0 + p.width_px))) is not None:
            a, b = p.bottom[-1], parts[j].top[0]
            if a and b:
                link(i, j, np.array([a], np.int64), np.array([b], np.int64))
        if (j := by_top_right.get(below)) is not None:
            a, b = p.bottom[0], parts[j].top[-1]
            if a and b:
                link(i, j, np.array([a], np.int64), np.array([b], np.int64))

    u = np.concatenate(src) if src else np.zeros(0, np.int64)
    v = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(u), np.int8), (u, v)), shape=(n_nodes, n_nodes))
    _, comp = connected_components(graph, directed=False)

    area = np.concatenate([p.area_px for p in parts])
    bbox = np.concatenate([p.bbox_px for p in parts])
    sum_y = np.concatenate([p.sum_y_px for p in parts])
    sum_x = np.concatenate([p.sum_x_px for p in parts])
    first_px = np.concatenate([p.first_px for p in parts])
    diameter_sq = np.concatenate([p.diameter_sq_px for p in parts])

    order = np.argsort(comp, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(comp[order]) != 0])
    l_area = np.add.reduceat(area[order], starts)
    l_sum_y = np.add.reduceat(sum_y[order], starts)
    l_sum_x = np.add.reduceat(sum_x[order], starts)
    l_bbox = np.stack(
        [
            np.minimum.reduceat(bbox[order, 0], starts),
            np.minimum.reduceat(bbox[order, 1], starts),
            np.maximum.reduceat(bbox[order, 2], starts),
            np.maximum.reduceat(bbox[order, 3], starts),
        ],
        axis=1,
    )
    raster_key = first_px[:, 0] * width_px + first_px[:, 1]
    l_first = np.minimum.reduceat(raster_key[order], starts)
    l_diameter_sq = np.maximum.reduceat(diameter_sq[order], starts)
    n_parts = np.diff(np.r_[starts, len(order)])

    # A lesion made of several chunk components: its hull is the hull of theirs.
    node_part = np.repeat(np.arange(len(parts)), counts)
    node_local = np.arange(n_nodes) - offset[node_part]
    for k in np.flatnonzero(n_parts > 1):
        nodes = order[starts[k] : starts[k] + n_parts[k]]
        hull = convex_hull(np.concatenate([parts[node_part[m]].hull(int(node_local[m])) for m in nodes]))
        l_diameter_sq[k] = max_distance_sq(hull)

    lesions = []
    for rank, k in enumerate(np.argsort(l_first, kind="stable"), start=1):
        a = int(l_area[k])
        d_px = math.sqrt(int(l_diameter_sq[k]))
        lesions.append(
            Lesion(
                lesion_id=rank,
                area_px=a,
                area_mm2=_mm2(a, mpp_um),
                bbox_px=tuple(int(c) for c in l_bbox[k]),  # type: ignore[arg-type]
                centroid_yx_px=(int(l_sum_y[k]) / a + 0.5, int(l_sum_x[k]) / a + 0.5),
                diameter_px=d_px,
                diameter_mm=_mm(d_px, mpp_um),
                first_pixel_yx=(int(l_first[k] // width_px), int(l_first[k] % width_px)),
            )
        )
    return _summarise(lesions, height_px=height_px, width_px=width_px, mpp_um=mpp_um, tissue_px=tissue_px)


def _summarise(
    lesions: Sequence[Lesion], *, height_px: int, width_px: int, mpp_um: float | None, tissue_px: int
) -> SlideStats:
    """The slide's figures from its lesions (numbered 1, 2, … in raster order)."""
    cancer_px = sum(les.area_px for les in lesions)
    largest_area = max((les.area_px for les in lesions), default=0)
    largest_d_px = max((les.diameter_px for les in lesions), default=0.0)
    largest_d_mm = _mm(largest_d_px, mpp_um)
    return SlideStats(
        height_px=height_px,
        width_px=width_px,
        mpp_um=mpp_um,
        tissue_area_px=tissue_px,
        tissue_area_mm2=_mm2(tissue_px, mpp_um),
        cancer_area_px=cancer_px,
        cancer_area_mm2=_mm2(cancer_px, mpp_um),
        cancer_fraction=cancer_px / tissue_px if tissue_px > 0 else None,
        lesion_count=len(lesions),
        largest_lesion_area_px=largest_area,
        largest_lesion_area_mm2=_mm2(largest_area, mpp_um),
        largest_diameter_px=largest_d_px,
        largest_diameter_mm=largest_d_mm,
        size_category=size_category(largest_d_mm, len(lesions)),
        lesions=tuple(lesions),
    )


# --------------------------------------------------------------------------------------------------------
# Small lesions
# --------------------------------------------------------------------------------------------------------


def min_area_px(min_area_um2: float, mpp_um: float | None) -> int:
    """Lesions of fewer level-0 pixels than this are below ``min_area_um2``; 0 (keep all) when µm/px is unknown.

    >>> min_area_px(200, 0.5), min_area_px(200, 0.25), min_area_px(200, None), min_area_px(0, 0.5)
    (800, 3200, 0, 0)
    """
    if mpp_um is None or min_area_um2 <= 0:
        return 0
    # area_px · mpp² < min_area_um2  ⇔  area_px < min_area_um2 / mpp²  ⇔  area_px < ceil(that), area_px integer.
    return math.ceil(min_area_um2 / (mpp_um * mpp_um) - 1e-9)


def label_components(mask: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int32], int]:
    """8-connected components of a mask's non-zero pixels: ``(labels, n)``, labels 1..n, 0 for background.

    Only the box around the calls is labelled (the same labels: ndimage numbers components in
    raster order of their first pixel, which a shift does not change): a 2048² block took ~8.5 ms
    whatever it held, and the box costs two ~0.15-ms passes to find.
    """
    box = calls_box(mask)
    if box is None:  # most blocks of a slide hold no call at all: no labelling pass over them
        return np.zeros(mask.shape, np.int32), 0
    box_px = (box[0].stop - box[0].start) * (box[1].stop - box[1].start)
    if box_px > mask.size // 2:  # the box is most of the block: copying its labels back would cost more
        labels, n = ndimage.label(mask != 0, structure=CONNECTIVITY_8, output=np.int32)
        return labels, int(n)
    labels = np.zeros(mask.shape, np.int32)
    labels[box], n = ndimage.label(mask[box] != 0, structure=CONNECTIVITY_8, output=np.int32)
    return labels, int(n)


def remove_small_interior(
    mask: npt.NDArray[np.uint8],
    min_area_px: int,
    *,
    labelled: tuple[npt.NDArray[np.integer], int] | None = None,
) -> npt.NDArray[np.bool_]:
    """Zero, in place, the components of ``mask`` below ``min_area_px`` that touch none of its borders.

    Such a component is whole, whatever lies outside ``mask``; one that
    touches a border may be part of a larger lesion and is left for
    :func:`drop_small_lesions` once the slide's lesions are merged.
    ``labelled`` is ``mask``'s :func:`label_components`, when the caller has
    it (an inference task passes the same labels on to the outlines).
    Returns, for each label 0..n, whether it was removed.

    >>> m = np.zeros((6, 6), np.uint8); m[1, 1] = m[0, 4] = 1; m[3:5, 3:5] = 1
    >>> remove_small_interior(m, 2).tolist(), int(m.sum())
    ([False, False, True, False], 5)
    """
    labels, n = labelled if labelled is not None else label_components(mask)
    removed = np.zeros(n + 1, bool)
    if min_area_px <= 1 or n == 0:
        return removed
    # Over the called pixels only (a few % of a block): counting and clearing over the whole
    # label image took ~30 ms of a 2048² block's ~50.  A 0/1 uint8 mask is searched as bool (2.6x
    # faster: 3.0 against 7.8 ms on a 2048² block with 13 % called) and cleared by flat index
    # (unravelling the indices first took 12 of the 15 ms of clearing 3,337 specks).
    flat = mask.reshape(-1)  # a view of a C-contiguous mask, else a copy
    called = np.flatnonzero(flat.view(np.bool_) if flat.dtype == np.uint8 and flat.max() <= 1 else flat)
    lab = labels.reshape(-1)[called]
    removed[:] = np.bincount(lab, minlength=n + 1) < min_area_px
    removed &= ~on_border(labels, n)
    removed[0] = False
    if removed.any():
        if mask.flags.c_contiguous:
            flat[called[removed[lab]]] = 0
        else:
            mask[np.unravel_index(called[removed[lab]], mask.shape)] = 0
    return removed


def drop_small_lesions(slide_stats: SlideStats, min_area_px: int) -> tuple[SlideStats, list[Lesion]]:
    """The statistics without lesions below ``min_area_px``, renumbered; and the lesions dropped.

    The caller erases the dropped lesions from the mask
    (:func:`slidejob.maskstore.erase_components`) so that mask and
    statistics agree.
    """
    small = [les for les in slide_stats.lesions if les.area_px < min_area_px]
    if not small:
        return slide_stats, []
    kept = [
        replace(les, lesion_id=rank)
        for rank, les in enumerate((les for les in slide_stats.lesions if les.area_px >= min_area_px), start=1)
    ]
    s = slide_stats
    return (
        _summarise(kept, height_px=s.height_px, width_px=s.width_px, mpp_um=s.mpp_um, tissue_px=s.tissue_area_px),
        small,
    )


def tissue_area_from_fraction(
    tissue_fraction: npt.NDArray[np.floating[Any]], *, height_px: int, width_px: int, chunk_px: int
) -> float:
    """Tissue area in level-0 px: Σ fraction × chunk pixel area, clipped at the slide's edge.

    >>> tissue_area_from_fraction(np.array([[1.0, 0.5]]), height_px=8, width_px=12, chunk_px=8)
    80.0
    """
    gh, gw = tissue_fraction.shape
    rows = np.minimum(chunk_px, height_px - chunk_px * np.arange(gh))
    cols = np.minimum(chunk_px, width_px - chunk_px * np.arange(gw))
    return float((np.asarray(tissue_fraction, np.float64) * np.outer(rows, cols)).sum())


# --------------------------------------------------------------------------------------------------------
# I/O edge and graph
# --------------------------------------------------------------------------------------------------------


def present_chunks(mask_path: Path, array: str = LEVEL0) -> list[tuple[int, int]]:
    """(row, col) of the chunks present in a 2-D array of the mask store, in raster order.

    :func:`slidejob.chunkstore.stored_chunks` reads the keys, whichever separator the array uses.
    """
    return sorted(stored_chunks(mask_path, array))


def mask_mpp_um(attrs: dict[str, Any]) -> float | None:
    """µm/px of a mask store: the slide's ``mpp_um`` from the ``slidejob`` attributes.

    Falls back to the NGFF level-0 scale when its axes are in micrometres;
    ``None`` when neither says (never a guess).
    """
    slide = (attrs.get("slidejob") or {}).get("slide") or {}
    if slide.get("mpp_um"):
        return float(slide["mpp_um"])
    try:
        ms = attrs["ome"]["multiscales"][0]
        if all(ax.get("unit") == "micrometer" for ax in ms["axes"]):
            return float(ms["datasets"][0]["coordinateTransformations"][0]["scale"][-1])
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    return None


def chunk_partial(mask_path: str, cy: int, cx: int) -> ChunkPartial:
    """Read level-0 chunk ``(cy, cx)`` of a mask store and reduce it (a Dask task)."""
    arr = zarr.open_array(Path(mask_path) / LEVEL0, mode="r")
    ch, cw = arr.chunks
    y0, x0 = cy * ch, cx * cw
    return partial_from_array(np.asarray(arr[y0 : y0 + ch, x0 : x0 + cw]), y0, x0)


def statistics_graph(mask_path: Path) -> Delayed:
    """Build (not compute) the statistics of a mask store as one Dask graph.

    One :func:`chunk_partial` task per present level-0 chunk, then one
    :func:`merge_partials`.  µm/px and the tissue area come from the store.
    Compute it with ``dask.compute(graph)[0]`` on whichever scheduler is active.

    Parameters
    ----------
    mask_path
        ``<out>/<slide-id>/mask.ome.zarr``.

    Returns
    -------
    dask.delayed.Delayed
        Computes to a :class:`SlideStats`.
    """
    facts = _store_facts(mask_path)
    partials = [
        dask.delayed(chunk_partial, pure=False)(str(mask_path), cy, cx)
        for cy, cx in present_chunks(mask_path)
    ]
    return dask.delayed(merge_partials, pure=False)(partials, **facts)


def statistics_from_partials(mask_path: Path, partials: Sequence[ChunkPartial]) -> SlideStats:
    """The statistics of a mask store from partials made where its chunks were made.

    :func:`slidejob.infer.infer_blocks` reduces each mask chunk while it is
    in memory; this merges them with the store's size, µm/px and tissue area,
    giving what :func:`statistics_graph` would compute by reading the store.
    """
    return merge_partials(partials, **_store_facts(Path(mask_path)))


def _store_facts(mask_path: Path) -> dict[str, Any]:
    """Size, µm/px and tissue area of a mask store: the keywords of :func:`merge_partials`."""
    mask_path = Path(mask_path)
    try:
        root = zarr.open_group(mask_path, mode="r")
        level0 = zarr.open_array(mask_path / LEVEL0, mode="r")
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{mask_path}: not a mask store (expected an OME-Zarr group with array '0')"
        ) from exc
    height_px, width_px = level0.shape
    chunk_px = int(level0.chunks[0])
    tissue = (
        np.asarray(zarr.open_array(mask_path / TISSUE_FRACTION, mode="r")[...])
        if (mask_path / TISSUE_FRACTION).is_dir()
        else np.zeros((0, 0), np.float32)
    )
    return {
        "height_px": int(height_px),
        "width_px": int(width_px),
        "mpp_um": mask_mpp_um(dict(root.attrs)),
        "tissue_area_px": tissue_area_from_fraction(tissue, height_px=height_px, width_px=width_px, chunk_px=chunk_px),
    }
