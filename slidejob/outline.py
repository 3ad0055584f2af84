"""Pixel-edge polygons of masks, and their GeoJSON geometry (pure: arrays in, polygons and text out).

Polygons follow the pixel edges of a mask, with (x, y) at pixel corners and
(0, 0) the top-left corner of the top-left pixel, so they rasterize back to
the mask exactly.  Components are 8-connected (as lesions are everywhere in
slidejob): shells are counter-clockwise and holes clockwise in (x, y)
numbers, rings are simple, and a shell and its hole or two shells may touch
at a corner.  :func:`interior_outlines` is what an inference task calls on
its block (:mod:`slidejob.infer`); :mod:`slidejob.export` traces the rest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from slidejob.stats import calls_box, label_components, on_border

Ring = npt.NDArray[np.int64]  # (k, 2) vertices (x, y), not repeated at the end


# --------------------------------------------------------------------------------------------------------
# Pixel-edge polygons (pure)
# --------------------------------------------------------------------------------------------------------


def _boundary_loops(fg: npt.NDArray[np.bool_]) -> list[Ring]:
    """Closed loops of unit pixel edges around ``fg``, each a simple ring (no repeated vertex).

    Every edge has foreground on its left in (x, y) numbers, so outer
    boundaries come out counter-clockwise (positive shoelace area) and holes
    clockwise, the RFC 7946 orientation.  Where two foreground pixels touch
    only at a corner, the walk turns to stay around the same pixel, and a
    walk that comes back to a vertex is cut there into separate loops: rings
    stay simple, as GeoJSON readers (JTS in QuPath) want.
    """
    w = fg.shape[1]
    p = np.pad(fg, 1)
    starts, ends = [], []
    for missing, (sx, sy, ex, ey) in (
        (~p[:-2, 1:-1], (0, 0, 1, 0)),  # top edge, +x
        (~p[1:-1, 2:], (1, 0, 1, 1)),  # right edge, +y
        (~p[2:, 1:-1], (1, 1, 0, 1)),  # bottom edge, -x
        (~p[1:-1, :-2], (0, 1, 0, 0)),  # left edge, -y
    ):
        r, c = np.nonzero(fg & missing)
        starts.append(np.stack([c + sx, r + sy], 1))
        ends.append(np.stack([c + ex, r + ey], 1))
    start = np.concatenate(starts).astype(np.int64)
    end = np.concatenate(ends).astype(np.int64)
    if not len(start):
        return []
    direction = end - start
    vid_start = start[:, 1] * (w + 1) + start[:, 0]
    vid_end = end[:, 1] * (w + 1) + end[:, 0]
    order = np.argsort(vid_start, kind="stable")
    sorted_ids = vid_start[order]
    lo = np.searchsorted(sorted_ids, vid_end, "left")
    hi = np.searchsorted(sorted_ids, vid_end, "right")
    nxt = order[lo]
    pinch = np.flatnonzero(hi - lo == 2)
    if len(pinch):
        # Two ways on: take the left turn (cross > 0), the one around the same pixel.
        a, b = order[lo[pinch]], order[lo[pinch] + 1]
        din = direction[pinch]
        cross_a = din[:, 0] * direction[a, 1] - din[:, 1] * direction[a, 0]
        nxt[pinch] = np.where(cross_a > 0, a, b)

    order, bounds = _cycles(nxt)
    vertices, ids = start[order], vid_start[order]
    # Most loops pass each vertex once; only those through a pinch need cutting.
    cycle_of = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    by_vertex = np.lexsort((ids, cycle_of))
    repeat = (ids[by_vertex][1:] == ids[by_vertex][:-1]) & (cycle_of[by_vertex][1:] == cycle_of[by_vertex][:-1])
    pinched = set(cycle_of[by_vertex][1:][repeat].tolist())
    loops: list[Ring] = []
    for k, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        if k in pinched:
            loops.extend(_split_at_repeats(vertices[a:b], ids[a:b]))
        else:
            loops.append(vertices[a:b])
    return loops


def _cycles(nxt: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The cycles of a permutation, each in walk order from its smallest element: (order, cycle bounds).

    Vectorised pointer doubling (O(n log L) for cycles up to L long) instead
    of a Python walk over every boundary edge of a mask.

    >>> order, bounds = _cycles(np.array([2, 0, 1, 4, 3]))
    >>> order.tolist(), bounds.tolist()
    ([0, 2, 1, 3, 4], [0, 3, 5])
    """
    n = len(nxt)
    # rep[e]: the smallest element of e's cycle (a window of 2^k steps doubles each round).
    rep = np.arange(n)
    jump = nxt.copy()
    while True:
        new = np.minimum(rep, rep[jump])
        if np.array_equal(new, rep):
            break
        rep, jump = new, jump[jump]
    # to_rep[e]: steps from e forward to its cycle's smallest element (list ranking).
    is_rep = rep == np.arange(n)
    to_rep = np.where(is_rep, 0, 1)
    succ = np.where(is_rep, np.arange(n), nxt)
    while True:
        done = is_rep[succ]
        if done.all():
            break
        to_rep = np.where(done, to_rep, to_rep + to_rep[succ])
        succ = np.where(done, succ, succ[succ])
    length = np.bincount(rep, minlength=n)[rep]
    position = (length - to_rep) % length
    order = np.lexsort((position, rep))
    starts = np.flatnonzero(np.r_[True, rep[order][1:] != rep[order][:-1]])
    return order, np.r_[starts, n].astype(np.int64)


def _split_at_repeats(vertices: Ring, ids: npt.NDArray[np.int64]) -> list[Ring]:
    """Cut a closed walk that passes a vertex more than once into simple loops."""
    if len(np.unique(ids)) == len(ids):
        return [vertices]
    loops: list[Ring] = []
    stack: list[int] = []
    where: dict[int, int] = {}
    for i, v in enumerate(ids.tolist()):
        if v in where:
            k = where[v]
            loops.append(vertices[stack[k:]])
            for j in stack[k + 1 :]:
                del where[int(ids[j])]
            del stack[k + 1 :]
        else:
            where[v] = len(stack)
            stack.append(i)
    if len(stack) > 1:
        loops.append(vertices[stack])
    return loops


def _drop_collinear(ring: Ring) -> Ring:
    """Keep only the corners of a rectilinear ring."""
    # Slices, not np.roll: this runs once per ring, tens of thousands of times per slide.
    after = np.empty_like(ring)
    after[:-1] = ring[1:] - ring[:-1]
    after[-1] = ring[0] - ring[-1]
    before = np.empty_like(ring)
    before[1:] = after[:-1]
    before[0] = after[-1]
    return ring[(before != after).any(axis=1)]


def signed_area(ring: Ring) -> float:
    """Shoelace area of a ring of (x, y) vertices; positive when counter-clockwise in (x, y) numbers.

    >>> signed_area(np.array([[0, 0], [1, 0], [1, 1], [0, 1]]))
    1.0
    """
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    twice = float(x[:-1] @ y[1:] - x[1:] @ y[:-1]) + float(x[-1] * y[0] - x[0] * y[-1])
    return twice / 2


def _inside(x: float, y: float, ring: Ring) -> bool:
    """Even-odd point-in-polygon (the point is never on the ring here)."""
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(crosses & (xs > x)) % 2)


def _assemble(loops: Iterable[Ring]) -> list[tuple[Ring, list[Ring]]]:
    """Group boundary loops of one region into (shell, holes) polygons, collinear vertices dropped."""
    shells: list[Ring] = []
    shell_areas: list[float] = []
    holes: list[Ring] = []
    for loop in loops:
        area = signed_area(loop)
        if area > 0:
            shells.append(loop)
            shell_areas.append(area)
        else:
            holes.append(loop)
    polygons: list[tuple[Ring, list[Ring]]] = [(s, []) for s in shells]
    for hole in holes:
        # The midpoint of one unit edge of the hole lies on no other ring; the
        # innermost shell around it is the hole's.
        x, y = (hole[0] + hole[1]) / 2.0
        around = [i for i, s in enumerate(shells) if len(shells) == 1 or _inside(x, y, s)]
        if not around:
            raise AssertionError("a hole outside every shell: the boundary walk is broken")
        polygons[min(around, key=lambda i: shell_areas[i])][1].append(hole)
    return [(_drop_collinear(s), [_drop_collinear(h) for h in hs]) for s, hs in polygons]


def mask_polygons(fg: npt.NDArray[np.bool_]) -> list[tuple[Ring, list[Ring]]]:
    """Polygons (shell, holes) whose union is exactly ``fg``, following pixel edges.

    Coordinates are (x, y) pixel-corner positions in ``fg``'s frame.  Shells
    are counter-clockwise and holes clockwise in (x, y) numbers; rings are
    simple, a shell and its hole or two shells may touch at a corner.
    """
    return _assemble(_boundary_loops(np.asarray(fg, bool)))


def labeled_polygons(labels: npt.NDArray[np.integer]) -> dict[int, list[tuple[Ring, list[Ring]]]]:
    """:func:`mask_polygons` of every 8-connected component of a label image, traced in one walk.

    Two components never share a pixel edge or corner, so every boundary loop
    of ``labels > 0`` belongs to one component: the one owning the pixel on the
    left of the loop's first edge.  Tracing a region once instead of once per
    lesion is what keeps GeoJSON export linear in the mask's boundary length.
    """
    by_label: dict[int, list[Ring]] = {}
    for loop in _boundary_loops(np.asarray(labels) > 0):
        (x0, y0), (x1, y1) = loop[0], loop[1]
        dx, dy = x1 - x0, y1 - y0
        # The first edge is a unit edge; its left side is (-dy, dx) in (x, y) numbers.
        px = (2 * x0 + dx - dy) // 2
        py = (2 * y0 + dy + dx) // 2
        by_label.setdefault(int(labels[py, px]), []).append(loop)
    return {label: _assemble(loops) for label, loops in by_label.items()}


def geojson_geometry(polygons: list[tuple[Ring, list[Ring]]], *, origin_xy: tuple[int, int], level: int,
              height_px: int, width_px: int) -> dict[str, Any]:
    """GeoJSON geometry of one lesion's polygons traced in a crop at ``origin_xy`` of ``level``."""
    f = 2**level
    out = []
    for shell, holes in polygons:
        rings = []
        for ring in [shell, *holes]:
            xy = (ring + np.array(origin_xy)) * f
            # A coarse level's last row/column may reach past the slide (ceil-halving); cut it at the edge.
            xy[:, 0] = np.minimum(xy[:, 0], width_px)
            xy[:, 1] = np.minimum(xy[:, 1], height_px)
            rings.append(np.vstack([xy, xy[:1]]).tolist())
        out.append(rings)
    if len(out) == 1:
        return {"type": "Polygon", "coordinates": out[0]}
    return {"type": "MultiPolygon", "coordinates": out}


def interior_outlines(
    mask: npt.NDArray[np.uint8],
    y0: int,
    x0: int,
    *,
    height_px: int,
    width_px: int,
    labelled: tuple[npt.NDArray[np.integer], int] | None = None,
    removed: npt.NDArray[np.bool_] | None = None,
) -> dict[int, str]:
    """GeoJSON geometry text of every lesion of a mask block that touches none of the block's borders.

    Such a lesion is whole (nothing outside the block joins it), so it can be
    traced while the block is in memory, on a worker (see
    :func:`slidejob.infer.infer_blocks`).  Keys are the raster index
    ``row * width_px + col`` of the lesion's first pixel in level-0 px, which
    is also how :func:`write_geojson` finds it (``Lesion.first_pixel_yx``).

    ``labelled`` may give the block's 8-connected labels as they were before
    the components flagged in ``removed`` were zeroed in ``mask``
    (:func:`slidejob.stats.remove_small_interior`): a task labels its block once.
    """
    labels, n = labelled if labelled is not None else label_components(np.asarray(mask))
    if n == 0:
        return {}
    keep = ~on_border(labels, n)
    keep[0] = False
    if removed is not None:
        keep &= ~removed
    if not keep.any():  # every lesion removed or on a border: no pass over the block's labels (~5 ms)
        return {}
    kept = keep[labels]
    around = calls_box(kept)
    if around is None:
        return {}
    # Trace only the box around the kept lesions, with the one pixel of background every
    # interior lesion has around it (it touches no border of the block).
    r0, r1, c0, c1 = around[0].start - 1, around[0].stop + 1, around[1].start - 1, around[1].stop + 1
    box = np.where(kept[r0:r1, c0:c1], labels[r0:r1, c0:c1], 0)
    oy, ox = y0 + int(r0), x0 + int(c0)
    out: dict[int, str] = {}
    for polygons in labeled_polygons(box).values():
        # The first pixel in raster order has its top-left corner at the smallest (y, x) shell vertex.
        corners = np.concatenate([shell for shell, _ in polygons])
        fy, fx = min(zip(corners[:, 1].tolist(), corners[:, 0].tolist()))
        geometry = geojson_geometry(polygons, origin_xy=(ox, oy), level=0, height_px=height_px, width_px=width_px)
        out[(fy + oy) * width_px + fx + ox] = json.dumps(geometry, separators=(",", ":"))
    return out
