"""The demo: a slide made of real annotated H&E tiles, run through the whole job.

The shipped model was trained on EBHI-Seg colon biopsy tiles (400× microscope
captures), so a demo on generated textures would show nothing.  The package
ships a few EBHI-Seg tiles from the model's *validation* groups (never seen in
training; CC BY 4.0, re-encoded as JPEG — see ``demo_data/README.md``); the demo
mosaics them onto glass as two tissue fragments, one adenocarcinoma and one
normal mucosa, writes a pyramidal tiled TIFF, runs ``slidejob run`` on it with
the embedded LocalCluster, and scores the mask against the tiles' own labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile
from PIL import Image

from slidejob.synthetic import GLASS_RGB

logger = logging.getLogger(__name__)

TILE_PX = 224
DEMO_DATA = files("slidejob") / "demo_data"


@dataclass(frozen=True)
class DemoSlide:
    path: Path
    truth: npt.NDArray[np.bool_]


def _load(kind: str) -> list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]]:
    folder = DEMO_DATA / kind
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".jpg"):
            continue
        with entry.open("rb") as fh:
            rgb = np.asarray(Image.open(fh).convert("RGB"))
        label = np.zeros(rgb.shape[:2], bool)
        if kind == "cancer":
            with (folder / entry.name.replace(".jpg", ".png")).open("rb") as fh:
                label = np.asarray(Image.open(fh).convert("L")) >= 128
        out.append((rgb, label))
    return out


def build_demo_slide(path: Path, *, columns: int = 4) -> DemoSlide:
    """Write the demo mosaic as a pyramidal tiled JPEG TIFF and return its level-0 truth mask."""
    cancer, normal = _load("cancer"), _load("normal")
    margin = 256
    rows_c = -(-len(cancer) // columns)
    rows_n = -(-len(normal) // columns)
    height = margin * 3 + (rows_c + rows_n) * TILE_PX
    width = margin * 2 + columns * TILE_PX
    image = np.empty((height, width, 3), np.uint8)
    image[...] = GLASS_RGB
    truth = np.zeros((height, width), bool)
    for block, (y_origin, tiles) in enumerate(((margin, cancer), (margin * 2 + rows_c * TILE_PX, normal))):
        for i, (rgb, label) in enumerate(tiles):
            y = y_origin + (i // columns) * TILE_PX
            x = margin + (i % columns) * TILE_PX
            image[y : y + TILE_PX, x : x + TILE_PX] = rgb
            truth[y : y + TILE_PX, x : x + TILE_PX] = label
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tw:
        kwargs: dict[str, Any] = {
            "tile": (256, 256), "photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 92}
        }
        tw.write(image, subifds=1, **kwargs)
        half = image[: height // 2 * 2, : width // 2 * 2].reshape(height // 2, 2, width // 2, 2, 3).mean(axis=(1, 3))
        tw.write(half.astype(np.uint8), subfiletype=1, **kwargs)
    return DemoSlide(path=path, truth=truth)


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty).

    >>> dice(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool))
    0.6666666666666666
    """
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` did: the batch outcome, where results are, and the mask's Dice against the labels."""

    outcome: Any
    results: Path
    dice: float | None


def run_demo(out_dir: Path, *, weights: Path | None = None, n_workers: int | None = None) -> DemoResult:
    """Build the demo slide under ``out_dir/slides``, run the job into ``out_dir/results``, score the mask.

    Returns the batch outcome, the Dice of the mask against the tiles' labels,
    and where the outputs are.
    """
    import zarr

    from slidejob.maskstore import MASK_NAME
    from slidejob.pipeline import dask_client, run_batch

    out_dir = Path(out_dir)
    slide = build_demo_slide(out_dir / "slides" / "ebhi-demo-mosaic.tif")
    results = out_dir / "results"
    with dask_client(n_workers=n_workers):
        batch = run_batch([slide.path], results, weights=weights)
    outcome = batch.outcomes[0]
    if outcome.status == "failed":
        return DemoResult(outcome=outcome, results=results, dice=None)
    mask = np.asarray(zarr.open_array(outcome.out_dir / MASK_NAME / "0", mode="r")[...]).astype(bool)  # demo-sized
    return DemoResult(outcome=outcome, results=results, dice=dice(mask, slide.truth))
