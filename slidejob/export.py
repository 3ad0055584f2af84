"""What a person looks at: lesion GeoJSON for QuPath, overlay PNGs, ``stats.json`` and the batch report.

Per slide, beside ``mask.ome.zarr`` in ``<out>/<slide-id>/``:

- ``lesions.geojson``: a FeatureCollection with one feature per lesion
  (8-connected component of the level-0 mask), in level-0 pixel coordinates
  with (0, 0) the top-left corner of the top-left pixel, as QuPath expects
  ("File > Import objects"); each is an annotation classified "Tumor" with
  its measurements (area, diameter, centroid) from :mod:`slidejob.stats`.
- ``overlay.png``: the slide's thumbnail with the tissue outline (green) and
  the cancer mask (red, semi-transparent, outlined).
- ``stats.json``: the slide's summary-database row and its lesions.

and ``<out>/report.html`` for the whole batch (:func:`write_report`).

Polygons follow the pixel edges of the mask, so they rasterize back to it
exactly at the level they were traced at.  A lesion whose bounding box fits in
``max_region_px`` level-0 pixels (default 4096², about 1 mm² at 0.25 µm/px) is
traced at level 0; a larger one at the finest pyramid level where its box
fits, its outline then following that level's 2×2-max-pooled pixels (it
covers the lesion, up to 2^level px generously).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr
from PIL import Image
from scipy import ndimage

from slidejob import __version__, chunkstore
from slidejob.outline import geojson_geometry, labeled_polygons
from slidejob.render import save_png
from slidejob.stats import CONNECTIVITY_8, Lesion, SlideStats, mask_mpp_um, statistics_graph
from slidejob.summarydb import SUMMARY_COLUMNS, db_path_for, format_value, query

logger = logging.getLogger(__name__)

GEOJSON_NAME = "lesions.geojson"
OVERLAY_NAME = "overlay.png"
#: The overlay's small JPEG for report.html, made once with the overlay: the
#: report is rewritten after every batch over the whole output folder, and
#: re-encoding each slide's thumbnail there cost ~13 ms a slide (a minute per 5000).
OVERLAY_THUMB_NAME = "overlay-thumb.jpg"
REPORT_THUMB_MAX_SIDE_PX = 240
STATS_NAME = "stats.json"
REPORT_NAME = "report.html"

#: Lesions whose bounding box holds more level-0 pixels than this are traced at a coarser level.
MAX_REGION_PX = 4096 * 4096

TUMOR_RGB = (200, 0, 0)
TISSUE_OUTLINE_RGB = (0, 150, 0)
CANCER_ALPHA = 0.45


# --------------------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------------------


class _LevelReader:
    """Regions of one pyramid level, from an LRU cache of decoded chunks (many small lesions share chunks)."""

    def __init__(self, array: zarr.Array, cache_chunks: int = 64) -> None:
        self.array = array
        self.chunk_px = int(array.chunks[0])
        self.cache: OrderedDict[tuple[int, int], npt.NDArray[np.uint8]] = OrderedDict()
        self.cache_chunks = cache_chunks

    def _chunk(self, cy: int, cx: int) -> npt.NDArray[np.uint8]:
        key = (cy, cx)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        c = self.chunk_px
        block = np.asarray(self.array[cy * c : (cy + 1) * c, cx * c : (cx + 1) * c])
        self.cache[key] = block
        if len(self.cache) > self.cache_chunks:
            self.cache.popitem(last=False)
        return block

    def region(self, y0: int, x0: int, y1: int, x1: int) -> npt.NDArray[np.uint8]:
        """Pixels [y0, y1) × [x0, x1), zero outside the array."""
        h, w = self.array.shape
        out = np.zeros((y1 - y0, x1 - x0), np.uint8)
        c = self.chunk_px
        for cy in range(max(y0, 0) // c, (min(y1, h) - 1) // c + 1):
            for cx in range(max(x0, 0) // c, (min(x1, w) - 1) // c + 1):
                block = self._chunk(cy, cx)
                by0, bx0 = cy * c, cx * c
                ty0, tx0 = max(y0, by0), max(x0, bx0)
                ty1, tx1 = min(y1, by0 + block.shape[0]), min(x1, bx0 + block.shape[1])
                if ty1 > ty0 and tx1 > tx0:
                    out[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0] = block[
                        ty0 - by0 : ty1 - by0, tx0 - bx0 : tx1 - bx0
                    ]
        return out


def _trace_level(bbox_px: tuple[int, int, int, int], max_region_px: int, n_levels: int) -> int:
    y0, x0, y1, x1 = bbox_px
    level = 0
    while level + 1 < n_levels and (y1 - y0) * (x1 - x0) > max_region_px * 4**level:
        level += 1
    return level


def lesion_geometries(
    reader: _LevelReader, lesions: Sequence[Lesion], *, level: int, height_px: int, width_px: int
) -> list[dict[str, Any]]:
    """Geometries of several lesions traced at ``level`` from one crop around all of them.

    The crop is labelled and traced once (:func:`labeled_polygons`); each
    lesion takes the component under its first pixel.  Callers group lesions
    that lie close together, so the crop stays small.
    """
    # One pixel of margin so the crop's border is background around every lesion.
    cy0 = min(les.bbox_px[0] for les in lesions) >> level
    cx0 = min(les.bbox_px[1] for les in lesions) >> level
    cy1 = ((max(les.bbox_px[2] for les in lesions) - 1) >> level) + 2
    cx1 = ((max(les.bbox_px[3] for les in lesions) - 1) >> level) + 2
    cy0, cx0 = cy0 - 1, cx0 - 1
    labels, _ = ndimage.label(reader.region(cy0, cx0, cy1, cx1) != 0, structure=CONNECTIVITY_8)
    polygons = labeled_polygons(labels)
    out = []
    for les in lesions:
        sy, sx = les.first_pixel_yx
        own = int(labels[(sy >> level) - cy0, (sx >> level) - cx0])
        out.append(
            geojson_geometry(polygons[own], origin_xy=(cx0, cy0), level=level, height_px=height_px, width_px=width_px)
        )
    return out


#: Lesions with both bounding-box sides up to this many level-0 px are traced
#: together, one crop per 512-px block of their top-left corners.
_GROUP_MAX_SIDE_PX = 512


def _trace_groups(lesions: Sequence[Lesion], max_region_px: int, n_levels: int) -> list[tuple[int, list[Lesion]]]:
    """(level, lesions) to trace together: small lesions by block, every other lesion alone."""
    groups: dict[tuple[int, int], list[Lesion]] = {}
    alone: list[tuple[int, list[Lesion]]] = []
    for les in lesions:
        level = _trace_level(les.bbox_px, max_region_px, n_levels)
        y0, x0, y1, x1 = les.bbox_px
        if level == 0 and max(y1 - y0, x1 - x0) <= _GROUP_MAX_SIDE_PX:
            groups.setdefault((y0 // _GROUP_MAX_SIDE_PX, x0 // _GROUP_MAX_SIDE_PX), []).append(les)
        else:
            alone.append((level, [les]))
    return [(0, g) for g in groups.values()] + alone


def _measurements(lesion: Lesion, mpp_um: float | None, level: int) -> dict[str, float]:
    m: dict[str, float] = {
        "Lesion ID": lesion.lesion_id,
        "Area px": lesion.area_px,
        "Max diameter px": lesion.diameter_px,
        "Centroid X px": lesion.centroid_yx_px[1],
        "Centroid Y px": lesion.centroid_yx_px[0],
        "Traced at level": level,
    }
    if mpp_um is not None:
        m["Area µm^2"] = lesion.area_px * mpp_um**2
        m["Max diameter µm"] = lesion.diameter_px * mpp_um
    return m


def write_geojson(
    mask_path: Path,
    out_path: Path,
    *,
    stats: SlideStats | None = None,
    max_region_px: int = MAX_REGION_PX,
    outlines: Mapping[int, str] | None = None,
) -> int:
    """Write the lesions of a mask store as a QuPath-importable GeoJSON FeatureCollection.

    Parameters
    ----------
    mask_path
        ``<out>/<slide-id>/mask.ome.zarr``.
    out_path
        The ``.geojson`` file to write (atomically).
    stats
        The slide's statistics from :func:`slidejob.stats.statistics_graph`;
        computed here (on the active Dask scheduler) when not given.
    max_region_px
        Lesions with a larger bounding box (level-0 px) are traced at the
        finest pyramid level where it fits (see the module docs).
    outlines
        Geometry text already traced for some lesions (:func:`interior_outlines`),
        keyed by the raster index of their first pixel; the rest are traced here.

    Returns
    -------
    int
        The number of features (lesions) written.
    """
    mask_path = Path(mask_path)
    if stats is None:
        import dask

        stats = dask.compute(statistics_graph(mask_path))[0]
    root = zarr.open_group(mask_path, mode="r")
    levels = sorted((k for k in root.array_keys() if k.isdigit()), key=int)
    readers = {
        level: _LevelReader(zarr.open_array(mask_path / key, mode="r")) for level, key in enumerate(levels)
    }
    mpp_um = mask_mpp_um(dict(root.attrs))
    outlines = outlines or {}
    done: dict[int, tuple[int, str]] = {}
    todo = []
    for lesion in stats.lesions:
        fy, fx = lesion.first_pixel_yx
        text = outlines.get(fy * stats.width_px + fx)
        if text is None:
            todo.append(lesion)
        else:
            done[lesion.lesion_id] = (0, text)
    for level, group in _trace_groups(todo, max_region_px, len(levels)):
        traced = lesion_geometries(readers[level], group, level=level, height_px=stats.height_px,
                                   width_px=stats.width_px)
        done.update((les.lesion_id, (level, json.dumps(g, separators=(",", ":")))) for les, g in zip(group, traced))
    # The features are joined as text: geometry traced on workers arrives as JSON already.
    features = []
    for lesion in stats.lesions:
        level, geometry_text = done[lesion.lesion_id]
        properties = {
            "objectType": "annotation",
            "name": f"Lesion {lesion.lesion_id}",
            "classification": {"name": "Tumor", "color": list(TUMOR_RGB)},
            "isLocked": False,
            "measurements": _measurements(lesion, mpp_um, level),
        }
        features.append(
            f'{{"type":"Feature","id":"lesion-{lesion.lesion_id}","geometry":{geometry_text},'
            f'"properties":{json.dumps(properties, separators=(",", ":"), ensure_ascii=False)}}}'
        )
    collection = {
        "type": "FeatureCollection",
        # A foreign member (RFC 7946 §6.1): readers that do not know it ignore it.
        "slidejob": {
            "version": __version__,
            "mask": str(mask_path),
            "coordinates": "level-0 pixels, origin at the top-left corner of the top-left pixel",
            "connectivity": 8,
            "width_px": stats.width_px,
            "height_px": stats.height_px,
            "mpp_um": mpp_um,
        },
    }
    head = json.dumps(collection, separators=(",", ":"), ensure_ascii=False)[:-1]
    chunkstore.write_file_atomic(Path(out_path), head + ',"features":[' + ",".join(features) + "]}")
    return len(features)


# --------------------------------------------------------------------------------------------------------
# Overlay PNG
# --------------------------------------------------------------------------------------------------------


def _max_resample(
    level_img: npt.NDArray[np.uint8], factor_yx: tuple[float, float], shape: tuple[int, int]
) -> npt.NDArray[np.uint8]:
    """Resample to ``shape`` taking the max over each output pixel's footprint (factor >= 1).

    Every input pixel lands in exactly one output pixel, so no lesion vanishes.
    """
    out = level_img
    for axis, (factor, n_out) in enumerate(zip(factor_yx, shape)):
        n_in = out.shape[axis]
        starts = np.floor(np.arange(n_out) * factor).astype(np.int64)
        valid = starts < n_in
        reduced = np.zeros(out.shape[:axis] + (n_out,) + out.shape[axis + 1 :], np.uint8)
        if valid.any() and n_in:
            part = np.maximum.reduceat(out, starts[valid], axis=axis)
            index: list[Any] = [slice(None)] * out.ndim
            index[axis] = np.flatnonzero(valid)
            reduced[tuple(index)] = part
        out = reduced
    return out


def _outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)


def cancer_at_thumbnail(
    mask_path: Path, downsample_yx: tuple[float, float], shape: tuple[int, int]
) -> npt.NDArray[np.bool_]:
    """The cancer mask on a thumbnail's grid, from the coarsest pyramid level at least as fine.

    Max over each thumbnail pixel's footprint: a one-pixel lesion still shows.
    """
    root = zarr.open_group(Path(mask_path), mode="r")
    levels = sorted((k for k in root.array_keys() if k.isdigit()), key=int)
    level = 0
    while level + 1 < len(levels) and 2 ** (level + 1) <= min(downsample_yx) * (1 + 1e-9):
        level += 1
    img = np.asarray(zarr.open_array(Path(mask_path) / levels[level], mode="r")[...])
    f = 2**level
    return _max_resample(img, (downsample_yx[0] / f, downsample_yx[1] / f), shape) > 0


def write_overlay_png(
    thumbnail_rgb: npt.NDArray[np.uint8],
    thumbnail_downsample_yx: tuple[float, float],
    tissue_mask_bool: npt.NDArray[np.bool_],
    mask_path: Path,
    out_png: Path,
    *,
    min_side_px: int = 512,
) -> Path:
    """Write the thumbnail with the tissue outline and the cancer mask overlaid.

    Parameters
    ----------
    thumbnail_rgb
        (h, w, 3) uint8 thumbnail of the slide.
    thumbnail_downsample_yx
        Level-0 pixels per thumbnail pixel, (y, x).
    tissue_mask_bool
        The detected tissue; may be coarser than the thumbnail (scaled by nearest neighbour).
    mask_path
        The mask store; read at the coarsest pyramid level at least as fine as the thumbnail.
    out_png
        The PNG to write (atomically).
    min_side_px
        Small thumbnails are enlarged (nearest neighbour) to at least this short side.
    """
    thumb = np.asarray(thumbnail_rgb, np.uint8)[..., :3]
    shape = thumb.shape[:2]
    tissue = np.asarray(tissue_mask_bool, bool)
    if tissue.shape != shape:
        tissue = (
            np.asarray(
                Image.fromarray(tissue.astype(np.uint8) * 255).resize(
                    (shape[1], shape[0]), Image.Resampling.NEAREST
                )
            )
            > 127
        )
    cancer = cancer_at_thumbnail(mask_path, thumbnail_downsample_yx, shape)
    scale = max(1, math.ceil(min_side_px / max(1, min(shape))))
    if scale > 1:
        thumb = thumb.repeat(scale, 0).repeat(scale, 1)
        tissue = tissue.repeat(scale, 0).repeat(scale, 1)
        cancer = cancer.repeat(scale, 0).repeat(scale, 1)
    img = thumb.astype(np.float32)
    img[cancer] = (1 - CANCER_ALPHA) * img[cancer] + CANCER_ALPHA * np.array(TUMOR_RGB, np.float32)
    img[_outline(tissue)] = TISSUE_OUTLINE_RGB
    img[_outline(cancer)] = TUMOR_RGB
    out_png = Path(out_png)
    image = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    save_png(image, out_png)
    chunkstore.write_file_atomic(out_png.with_name(OVERLAY_THUMB_NAME), _report_thumbnail(image))
    return out_png


# --------------------------------------------------------------------------------------------------------
# stats.json
# --------------------------------------------------------------------------------------------------------


def write_stats_json(
    out_path: Path, record: Mapping[str, Any], lesions: Iterable[Lesion | Mapping[str, Any]]
) -> Path:
    """Write a slide's ``stats.json``: its summary row (as recorded in the database) and its lesions.

    ``record`` is the dict from :func:`slidejob.summarydb.slide_record`.
    """
    doc: dict[str, Any] = {
        "slide": dict(record),
        "lesions": [les.to_dict() if isinstance(les, Lesion) else dict(les) for les in lesions],
        "connectivity": 8,
    }
    if isinstance(doc["slide"].get("parameters"), str):
        doc["slide"]["parameters"] = json.loads(doc["slide"]["parameters"])
    out_path = Path(out_path)
    chunkstore.write_file_atomic(out_path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return out_path


# --------------------------------------------------------------------------------------------------------
# report.html
# --------------------------------------------------------------------------------------------------------

_REPORT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (summary column, header, type)
    ("slide", "Slide", "text"),
    ("status", "Status", "text"),
    ("tissue_mm2", "Tissue mm²", "number"),
    ("cancer_mm2", "Cancer mm²", "number"),
    ("fraction", "Cancer % of tissue", "number"),
    ("lesions", "Lesions", "number"),
    ("largest_mm", "Largest lesion mm", "number"),
    ("category", "Category", "text"),
)

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.2em;margin-top:1.5em}
.meta{color:#666}
table{border-collapse:collapse}
th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
td.num{text-align:right;font-variant-numeric:tabular-nums}
#slides th[data-type]{cursor:pointer;user-select:none;background:#f3f3f3}
#slides th[aria-sort=ascending]::after{content:" ▲"}#slides th[aria-sort=descending]::after{content:" ▼"}
tr.failed td{color:#a00}img.thumb{max-height:120px;max-width:200px;display:block}
"""

# Sorts by each cell's data-sort value; empty (NULL) cells always last.
_SCRIPT = """
document.querySelectorAll('#slides th[data-type]').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var tbody = th.closest('table').tBodies[0];
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    th.parentNode.querySelectorAll('th').forEach(function (o) { o.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var num = th.dataset.type === 'number';
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.sort, y = b.cells[col].dataset.sort;
      if (x === '' || y === '') { return (x === '') - (y === ''); }
      var c = num ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  });
});
"""


def _report_thumbnail(image: Image.Image) -> bytes:
    small = image.convert("RGB")
    small.thumbnail((REPORT_THUMB_MAX_SIDE_PX, REPORT_THUMB_MAX_SIDE_PX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _thumbnail_data_uri(png: Path) -> str | None:
    """The overlay's report thumbnail as a data URI: the one made with it, else made now (older outputs)."""
    cached = png.with_name(OVERLAY_THUMB_NAME)
    try:
        if cached.is_file() and cached.stat().st_mtime >= png.stat().st_mtime:
            data = cached.read_bytes()
        else:
            with Image.open(png) as im:
                data = _report_thumbnail(im)
    except (OSError, ValueError) as exc:
        logger.warning("%s: cannot read overlay for the report: %s", png, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def _shown(column: str, value: Any) -> str:
    if value is None:
        return "–"
    if column == "fraction":
        return f"{100 * value:.3g}"
    return format_value(value)


def _rows_html(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> list[str]:
    esc = html.escape
    lines = []
    for r in rows:
        cells = []
        for col, _, kind in _REPORT_COLUMNS:
            v = r.get(col)
            sort = "" if v is None else (repr(float(v)) if kind == "number" else str(v))
            cls = ' class="num"' if kind == "number" else ""
            cells.append(f'<td{cls} data-sort="{esc(sort)}">{esc(_shown(col, v))}</td>')
        sid = str(r["slide"])
        overlay = out_dir / sid / OVERLAY_NAME
        uri = _thumbnail_data_uri(overlay) if overlay.is_file() else None
        if uri:
            href = esc(f"{sid}/{OVERLAY_NAME}", quote=True)
            cells.append(
                f'<td><a href="{href}"><img class="thumb" src="{uri}" alt="{esc(sid)} overlay"></a></td>'
            )
        else:
            cells.append("<td>–</td>")
        cls = ' class="failed"' if r.get("status") == "failed" else ""
        lines.append(f'<tr{cls} data-slide="{esc(sid)}">{"".join(cells)}</tr>')
    return lines


def write_report(out_dir: Path) -> Path:
    """Write ``<out_dir>/report.html`` from the output directory's summary database.

    One self-contained page that needs no network: the summary table (click a
    header to sort), each slide's overlay thumbnail inlined as a data URI
    (linking to the full PNG beside it), and the failed slides with their
    reasons.  A Content-Security-Policy forbids the page any request.

    Returns
    -------
    Path
        The report's path.
    """
    out_dir = Path(out_dir)
    db = db_path_for(out_dir)
    fields = ", ".join(f"{expr} AS {name}" for name, expr in SUMMARY_COLUMNS)
    rows = query(db, f"SELECT {fields}, finished_at FROM slides ORDER BY slide_id").records()
    failed = [r for r in rows if r["status"] == "failed"]
    with_cancer = sum(1 for r in rows if r["lesions"])
    esc = html.escape
    head = (
        "".join(f'<th data-type="{kind}" scope="col">{esc(title)}</th>' for _, title, kind in _REPORT_COLUMNS)
        + '<th scope="col">Overlay</th>'
    )
    if failed:
        failed_html = (
            '<table id="failed"><thead><tr><th scope="col">Slide</th><th scope="col">Reason</th>'
            '<th scope="col">Finished</th></tr></thead><tbody>'
            + "".join(
                f"<tr><td>{esc(str(r['slide']))}</td><td>{esc(r['error'] or 'unknown')}</td>"
                f"<td>{esc(r['finished_at'] or '')}</td></tr>"
                for r in failed
            )
            + "</tbody></table>"
        )
    else:
        failed_html = '<p id="failed">None.</p>'
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>slidejob report: {esc(out_dir.resolve().name)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>slidejob report</h1>
<p class="meta">{len(rows)} slides: {len(rows) - len(failed)} ok, {len(failed)} failed,
{with_cancer} with lesions.
Lesions are 8-connected regions of the cancer mask; category from the largest lesion diameter
(ITC &lt; 0.2 mm, micrometastasis 0.2–2 mm, macrometastasis &gt; 2 mm).
Generated {esc(generated)} by slidejob {esc(__version__)} from {esc(str(db.name))}.</p>
<h2>Slides</h2>
<table id="slides"><thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(_rows_html(rows, out_dir))}
</tbody></table>
<h2>Failed slides</h2>
{failed_html}
<script>{_SCRIPT}</script>
</body>
</html>
"""
    path = out_dir / REPORT_NAME
    chunkstore.write_file_atomic(path, page)
    return path
