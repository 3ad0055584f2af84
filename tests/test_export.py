"""GeoJSON, overlay PNG, stats.json and the HTML report (checked in headless Chromium when installed)."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import math
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import dask
import numpy as np
import numpy.typing as npt
import pytest
import zarr
from PIL import Image
from test_stats import known_lesions_mask, write_mask_store

from slidejob import export, summarydb
from slidejob.outline import mask_polygons, signed_area
from slidejob.stats import statistics_graph

CHROMIUM = Path("/usr/bin/chromium")

# --------------------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------------------


def validate_geojson(doc: dict[str, Any], *, width_px: int, height_px: int) -> None:
    """Structural checks from RFC 7946 plus what QuPath reads (classification, measurements)."""
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
    for feature in doc["features"]:
        assert feature["type"] == "Feature"
        props = feature["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"] == "Tumor"
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in props["measurements"].values())
        geom = feature["geometry"]
        assert geom["type"] in ("Polygon", "MultiPolygon")
        polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        assert polygons
        for rings in polygons:
            assert rings
            for k, ring in enumerate(rings):
                assert len(ring) >= 4 and ring[0] == ring[-1]
                assert all(len(p) == 2 and all(isinstance(c, (int, float)) for c in p) for p in ring)
                xy = np.array(ring[:-1])
                assert len(np.unique(xy, axis=0)) == len(xy), "a ring passes a vertex twice"
                assert (xy[:, 0] >= 0).all() and (xy[:, 0] <= width_px).all()
                assert (xy[:, 1] >= 0).all() and (xy[:, 1] <= height_px).all()
                # Right-hand rule: exterior counter-clockwise, holes clockwise.
                assert (signed_area(xy) > 0) == (k == 0)


def rasterize(doc: dict[str, Any], shape: tuple[int, int], scale: float = 1.0) -> npt.NDArray[np.bool_]:
    """Pixels whose centre is inside a feature (even-odd within a feature, union across features)."""
    h, w = shape
    out = np.zeros(shape, bool)
    for feature in doc["features"]:
        geom = feature["geometry"]
        polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        toggles = np.zeros((h, w + 1), np.uint8)
        for rings in polygons:
            for ring in rings:
                xy = np.array(ring, np.float64) / scale
                for (xa, ya), (xb, yb) in itertools.pairwise(xy):
                    if ya == yb:
                        continue
                    rows = np.arange(math.ceil(min(ya, yb) - 0.5), math.ceil(max(ya, yb) - 0.5))
                    rows = rows[(rows >= 0) & (rows < h)]
                    yc = rows + 0.5
                    xc = xa + (yc - ya) * (xb - xa) / (yb - ya)
                    first = np.clip(np.floor(xc - 0.5).astype(np.int64) + 1, 0, w)
                    np.bitwise_xor.at(toggles, (rows, first), 1)
        out |= (np.bitwise_xor.accumulate(toggles, axis=1)[:, :w]).astype(bool)
    return out


def iou(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def test_polygons_rasterize_to_random_masks_exactly() -> None:
    rng = np.random.default_rng(1)
    for _ in range(100):
        h, w = rng.integers(1, 25, 2)
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        doc = {
            "features": [
                {
                    "geometry": {
                        "type": "MultiPolygon",
                        "coordinates": [
                            [np.vstack([r, r[:1]]).tolist() for r in [s, *hs]]
                            for s, hs in mask_polygons(mask)
                        ],
                    }
                }
            ]
        }
        assert (rasterize(doc, mask.shape) == mask).all()


@pytest.fixture(scope="module")
def known_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, npt.NDArray[np.uint8]]:
    mask, _ = known_lesions_mask()
    path = write_mask_store(tmp_path_factory.mktemp("known") / "mask.ome.zarr", mask, mpp_um=0.25)
    return path, mask


def test_geojson_valid_and_rasterizes_back(
    known_store: tuple[Path, npt.NDArray[np.uint8]], tmp_path: Path
) -> None:
    path, mask = known_store
    stats = dask.compute(statistics_graph(path))[0]
    out = tmp_path / "lesions.geojson"
    assert export.write_geojson(path, out, stats=stats) == 8
    doc = json.loads(out.read_text())
    validate_geojson(doc, width_px=1100, height_px=1300)
    assert iou(rasterize(doc, mask.shape), mask > 0) == 1.0  # >= 0.99 required; level 0 is exact
    by_id = {f["properties"]["measurements"]["Lesion ID"]: f for f in doc["features"]}
    for lesion in stats.lesions:
        m = by_id[lesion.lesion_id]["properties"]["measurements"]
        assert m["Area px"] == lesion.area_px and m["Traced at level"] == 0
        assert m["Area µm^2"] == pytest.approx(lesion.area_px * 0.25**2)
    holed = [
        f
        for f in doc["features"]
        if f["geometry"]["type"] == "Polygon" and len(f["geometry"]["coordinates"]) > 1
    ]
    assert len(holed) == 1  # the ring-shaped lesion; its island is a feature of its own
    corner = [f for f in doc["features"] if f["geometry"]["type"] == "MultiPolygon"]
    assert len(corner) == 3  # the three pairs of squares touching only at a corner


def test_geojson_traced_at_a_coarser_level(
    known_store: tuple[Path, npt.NDArray[np.uint8]], tmp_path: Path
) -> None:
    path, _ = known_store
    out = tmp_path / "coarse.geojson"
    export.write_geojson(path, out, max_region_px=0)  # every lesion at the coarsest level (2, 325×275 px)
    doc = json.loads(out.read_text())
    validate_geojson(doc, width_px=1100, height_px=1300)
    assert {f["properties"]["measurements"]["Traced at level"] for f in doc["features"]} == {2}
    level2 = np.asarray(zarr.open_array(path / "2", mode="r")[...]) > 0
    assert iou(rasterize(doc, level2.shape, scale=4), level2) >= 0.99


# --------------------------------------------------------------------------------------------------------
# Overlay, stats.json, and an output directory laid out as `slidejob run` will
# --------------------------------------------------------------------------------------------------------


def thumbnail_for(mask: npt.NDArray[np.uint8], downsample: int) -> npt.NDArray[np.uint8]:
    h, w = -(-mask.shape[0] // downsample), -(-mask.shape[1] // downsample)
    return np.full((h, w, 3), 220, np.uint8)


def test_overlay_png(known_store: tuple[Path, npt.NDArray[np.uint8]], tmp_path: Path) -> None:
    path, mask = known_store
    thumb = thumbnail_for(mask, 8)  # 163 × 138
    tissue = np.zeros((82, 69), bool)  # detection ran coarser than the picture
    tissue[5:75, 5:60] = True
    png = export.write_overlay_png(thumb, (8.0, 8.0), tissue, path, tmp_path / "o.png")
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    scale = 4  # 138 px short side, enlarged to at least 512
    assert img.shape == (163 * scale, 138 * scale, 3)
    red = (img[..., 0] > 150) & (img[..., 1] < 150)
    assert red[150 * scale // 8 + 2, 520 * scale // 8 + 2]  # inside the 100×150 lesion
    assert red[-1, -1]  # the slide's last pixel, a 1-px lesion, still shows
    assert not red[5, 5]
    green = (img[..., 1] > 120) & (img[..., 0] < 60)
    assert green.any() and not green[img.shape[0] // 2, img.shape[1] // 3]


SLIDES = {  # slide id -> cancer square side in px (None: failed); alphabetical order is not cancer order
    "a-small": 30,
    "b-none": 0,
    "c-failed": None,
    "d-big": 200,
}


def make_output_dir(out: Path) -> Path:
    """Per slide what `slidejob run` does after inference, in the documented order."""
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    db = summarydb.db_path_for(out)
    for slide_id, side in SLIDES.items():
        if side is None:
            record = summarydb.slide_record(
                slide_id=slide_id,
                status="failed",
                error="cannot decode tile 3",
                started_at=t0,
                finished_at=t0 + dt.timedelta(seconds=2),
            )
            summarydb.record_slide(db, record, [])
            continue
        mask = np.zeros((700, 600), np.uint8)
        mask[400 : 400 + side, 380 : 380 + side] = 1  # across both chunk borders for side > 132
        slide_dir = out / slide_id
        mask_path = write_mask_store(slide_dir / "mask.ome.zarr", mask, mpp_um=0.5)
        stats = dask.compute(statistics_graph(mask_path))[0]
        export.write_geojson(mask_path, slide_dir / export.GEOJSON_NAME, stats=stats)
        tissue = np.ones((44, 38), bool)
        export.write_overlay_png(
            thumbnail_for(mask, 16), (16.0, 16.0), tissue, mask_path, slide_dir / export.OVERLAY_NAME
        )
        record = summarydb.slide_record(
            slide_id=slide_id,
            status="ok",
            stats=stats,
            slide={"path": f"{slide_id}.svs", "fingerprint": "f"},
            weights_sha256="0" * 64,
            threshold=0.5,
            parameters={"p": 1},
            started_at=t0,
            finished_at=t0 + dt.timedelta(seconds=9),
        )
        export.write_stats_json(slide_dir / export.STATS_NAME, record, stats.lesions)
        summarydb.record_slide(db, record, stats.lesions)
    export.write_report(out)
    return out


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_output_dir(tmp_path_factory.mktemp("out"))


def test_stats_json(out_dir: Path) -> None:
    doc = json.loads((out_dir / "d-big" / export.STATS_NAME).read_text())
    assert doc["slide"]["slide_id"] == "d-big" and doc["slide"]["lesion_count"] == 1
    assert doc["slide"]["cancer_area_px"] == 200 * 200 and doc["slide"]["parameters"] == {"p": 1}
    assert doc["lesions"][0]["area_px"] == 200 * 200 and doc["connectivity"] == 8
    assert doc["slide"]["size_category"] == "itc"  # 283 px × 0.5 µm = 0.14 mm


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_report_is_self_contained(out_dir: Path) -> None:
    page = _Page()
    page.feed((out_dir / export.REPORT_NAME).read_text())
    rows = [a for t, a in page.tags if t == "tr" and a.get("data-slide")]
    assert [a["data-slide"] for a in rows] == list(SLIDES)
    images = [a["src"] or "" for t, a in page.tags if t == "img"]
    assert len(images) == 3 and all(src.startswith("data:image/jpeg;base64,") for src in images)
    links = [a["href"] or "" for t, a in page.tags if t == "a"]
    assert all((out_dir / href).is_file() for href in links)
    for tag, attrs in page.tags:
        for name in ("src", "href"):
            assert "://" not in (attrs.get(name) or ""), (tag, attrs)
    assert any(t == "meta" and a.get("http-equiv") == "Content-Security-Policy" for t, a in page.tags)
    assert "cannot decode tile 3" in (out_dir / export.REPORT_NAME).read_text()


def test_report_thumbnails_are_made_with_the_overlay_and_remade_only_for_older_outputs(
    out_dir: Path, tmp_path: Path
) -> None:
    import base64
    import shutil

    out = tmp_path / "out"
    shutil.copytree(out_dir, out)
    thumbs = {sid: out / sid / export.OVERLAY_THUMB_NAME for sid, side in SLIDES.items() if side is not None}
    for thumb in thumbs.values():  # written beside each overlay, a small JPEG of it
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and max(im.size) == export.REPORT_THUMB_MAX_SIDE_PX
    # The report embeds the file's bytes as they are...
    marked = thumbs["d-big"].read_bytes() + b"slidejob-test"
    thumbs["d-big"].write_bytes(marked)
    # ...and remakes a thumbnail only where an output folder predates them (or the overlay is newer).
    thumbs["a-small"].unlink()
    page = export.write_report(out).read_text()
    assert base64.b64encode(marked).decode("ascii") in page
    assert page.count("data:image/jpeg;base64,") == 3 and not thumbs["a-small"].exists()


# --------------------------------------------------------------------------------------------------------
# The report in a real browser (Chromium over the DevTools protocol on a pipe: no port, no extra package)
# --------------------------------------------------------------------------------------------------------


_LAUNCHER = """
import fcntl, os, sys
high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]]
for target, fd in zip((3, 4), high):
    os.dup2(fd, target)
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (fds 3 and 4, NUL-separated JSON)."""

    def __init__(self, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        # Chromium reads commands on fd 3 and answers on fd 4.  A tiny launcher moves the pipe ends
        # there (through fds >= 10, so that ends already sitting on 3 or 4 are not clobbered).
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(to_browser_r), str(from_browser_w), str(CHROMIUM), *args],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit status {self.proc.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(
        self, method: str, params: dict[str, Any] | None = None, timeout_s: float = 30
    ) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read_message(deadline))

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.events.clear()
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) at the middle of the element."""
        box = self.js(
            f"(function(){{var r=document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            "return [r.x + r.width / 2, r.y + r.height / 2];})()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1},
            )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout_s=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)


@contextlib.contextmanager
def chromium() -> Iterator[Chromium]:
    profile = Path(tempfile.mkdtemp(prefix="slidejob-chromium-"))
    browser = Chromium(profile)
    try:
        yield browser
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (Debian: apt-get install chromium)"
)
def test_report_in_headless_chromium(out_dir: Path) -> None:
    order = "Array.from(document.querySelectorAll('#slides tbody tr')).map(r => r.dataset.slide)"
    with chromium() as browser:
        browser.open((out_dir / export.REPORT_NAME).resolve().as_uri())
        assert browser.js("document.querySelector('h1').textContent") == "slidejob report"
        assert browser.js(order) == list(SLIDES)
        assert browser.js("document.querySelectorAll('#failed tbody tr').length") == 1
        thumbs = browser.js(
            "Array.from(document.images).map(function (i) { return [i.complete, i.naturalWidth]; })"
        )
        assert len(thumbs) == 3 and all(done and width > 0 for done, width in thumbs)
        header = "#slides thead th:nth-child(4)"  # Cancer mm²
        assert browser.js(f"document.querySelector('{header}').textContent") == "Cancer mm²"
        browser.click(header)
        assert browser.js(order) == ["b-none", "a-small", "d-big", "c-failed"]  # NULL (failed) last
        browser.click(header)
        assert browser.js(order) == ["d-big", "a-small", "b-none", "c-failed"]
        assert browser.js(f"document.querySelector('{header}').getAttribute('aria-sort')") == "descending"
        browser.click("#slides thead th:nth-child(1)")
        assert browser.js(order) == list(SLIDES)
