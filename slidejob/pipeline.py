"""Orchestration: the one module that builds Dask graphs and owns the Dask client.

Stages are plain functions that take explicit keywords and return small
result objects.  Graphs are computed with :func:`dask.compute`, which runs on
the active ``distributed`` client when there is one (a LocalCluster, a
scheduler address, SLURM workers) and on the local threaded scheduler
otherwise; the caller decides where work runs.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import numpy.typing as npt
import zarr

from slidejob import __version__, chunkstore, config, tissue
from slidejob.chunkstore import CHUNK_PX
from slidejob.errors import OutputExists
from slidejob.wsi import SlideInfo, cached_reader, open_slide

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Thumbnail and tissue grid
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueResult:
    """Tissue detection of one slide, on the level-0 grid of 512-px chunks."""

    info: SlideInfo
    thumbnail: npt.NDArray[np.uint8]
    thumbnail_downsample_yx: tuple[float, float]
    tissue_mask: npt.NDArray[np.bool_]
    fraction: npt.NDArray[np.float32]
    grid: npt.NDArray[np.bool_]
    min_tissue_fraction: float

    @property
    def n_tissue_chunks(self) -> int:
        return int(self.grid.sum())

    def attributes(self) -> dict[str, Any]:
        return {
            "chunk_px": CHUNK_PX,
            "grid_shape": list(self.grid.shape),
            "grid": tissue.grid_to_text(self.grid),
            "n_chunks": int(self.grid.size),
            "n_tissue_chunks": self.n_tissue_chunks,
            "min_tissue_fraction": self.min_tissue_fraction,
            "tissue_fraction": float(self.tissue_mask.mean()) if self.tissue_mask.size else 0.0,
            "thumbnail_downsample_yx": list(self.thumbnail_downsample_yx),
        }


def _thumbnail_block(path: str, mpp_um: float | None, level: int, y0: int, x0: int, size: int, factor: int):
    reader = cached_reader(path, mpp_um)
    return tissue.block_mean_downsample(reader.read_region(y0, x0, size, size, level=level), factor)


def compute_thumbnail(
    path: Path,
    *,
    mpp_um: float | None = None,
    downsample: float | None = None,
    max_side_px: int | None = None,
) -> tuple[npt.NDArray[np.uint8], tuple[float, float], SlideInfo]:
    """A low-resolution RGB image of the whole slide, with its downsample relative to level 0.

    Aims at ``downsample`` (default 32: a 512-px chunk becomes 16×16 px, about
    what tissue detection in CLAM and WSInfer works at), coarser when needed to
    keep the longest side within ``max_side_px``.  Reads the coarsest pyramid
    level that is at least that detailed and reduces it by a power of two,
    block by block in parallel, so memory stays bounded by the thumbnail's size
    whatever the slide's (a flat TIFF without pyramid included).
    """
    max_side_px = int(config.get("tile.thumbnail-max-side-px", max_side_px))
    target = float(config.get("tile.thumbnail-downsample", downsample))
    with open_slide(path, mpp_um=mpp_um) as reader:
        info = reader.info
        # Small slides keep at least ~64 px on their short side for the detector to work with.
        target = min(target, min(info.height_px, info.width_px) / 64)
        target = max(target, max(info.height_px, info.width_px) / max_side_px, 1.0)
        candidates = [lv for lv in info.levels if lv.downsample <= target * 1.01]
        lv = max(candidates, key=lambda v: v.downsample) if candidates else info.levels[0]
        factor = 1
        while lv.downsample * factor * 2 <= target * 1.01 or max(lv.height_px, lv.width_px) / factor > max_side_px:
            factor *= 2
        if factor == 1:
            thumb = reader.read_region(0, 0, lv.height_px, lv.width_px, level=lv.index)
    if factor > 1:
        # Blocks are a multiple of the factor so block means line up with the thumbnail grid.
        block = factor * max(1, 2048 // factor)
        rows = [
            [
                dask.delayed(_thumbnail_block)(str(path), mpp_um, lv.index, y0, x0, block, factor)
                for x0 in range(0, lv.width_px, block)
            ]
            for y0 in range(0, lv.height_px, block)
        ]
        parts = dask.compute(rows)[0]
        thumb = np.concatenate([np.concatenate(r, axis=1) for r in parts], axis=0)
    dy = info.height_px / lv.height_px * factor
    dx = info.width_px / lv.width_px * factor
    return thumb, (dy, dx), info


def detect_slide_tissue(
    path: Path,
    *,
    mpp_um: float | None = None,
    min_tissue_fraction: float | None = None,
    all_tissue: bool = False,
    params: tissue.TissueParams | None = None,
    downsample: float | None = None,
    max_side_px: int | None = None,
) -> TissueResult:
    """Tissue mask of the slide's thumbnail and the level-0 chunk grid it implies.

    ``all_tissue`` marks every chunk as tissue (no background skipping).
    """
    min_tissue_fraction = float(config.get("tile.min-tissue-fraction", min_tissue_fraction))
    thumb, ds, info = compute_thumbnail(path, mpp_um=mpp_um, downsample=downsample, max_side_px=max_side_px)
    mask = np.ones(thumb.shape[:2], bool) if all_tissue else tissue.detect_tissue(thumb, params)
    fraction = tissue.chunk_tissue_fraction(
        mask, downsample_yx=ds, level0_shape_px=(info.height_px, info.width_px), chunk_px=CHUNK_PX
    )
    grid = fraction >= min_tissue_fraction if min_tissue_fraction > 0 else np.ones_like(fraction, bool)
    return TissueResult(
        info=info,
        thumbnail=thumb,
        thumbnail_downsample_yx=ds,
        tissue_mask=mask,
        fraction=fraction,
        grid=grid,
        min_tissue_fraction=min_tissue_fraction,
    )


# --------------------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------------------


@dataclass
class TileResult:
    """What :func:`tile_slide` produced."""

    store: Path
    info: SlideInfo
    n_chunks: int
    n_tissue_chunks: int
    seconds: float
    megapixels_per_s: float
    timings: dict[str, float] = field(default_factory=dict)


def _tile_block(
    slide_path: str, mpp_um: float | None, store: str, y0: int, x0: int, height: int, width: int, background
) -> int:
    reader = cached_reader(slide_path, mpp_um)
    block = reader.read_region(y0, x0, height, width)
    return chunkstore.write_block(Path(store), y0, x0, block, background)


def block_slices(grid: npt.NDArray[np.bool_], block_chunks: int) -> list[tuple[int, int, npt.NDArray[np.bool_]]]:
    """Blocks of ``block_chunks``² chunks that hold any tissue: (chunk row, chunk col, tissue sub-grid)."""
    out = []
    gh, gw = grid.shape
    for by in range(0, gh, block_chunks):
        for bx in range(0, gw, block_chunks):
            sub = grid[by : by + block_chunks, bx : bx + block_chunks]
            if sub.any():
                out.append((by, bx, sub))
    return out


def tile_slide(
    path: Path,
    out: Path,
    *,
    mpp_um: float | None = None,
    min_tissue_fraction: float | None = None,
    all_tissue: bool = False,
    block_chunks: int | None = None,
    overwrite: bool = False,
    tissue_result: TissueResult | None = None,
) -> TileResult:
    """Tile a slide's level 0 into a 512×512-chunked Zarr v3 store, tissue chunks only.

    Parameters
    ----------
    path
        The slide file.
    out
        The store to create (``*.zarr``); built under a temporary name and
        renamed into place when complete.
    mpp_um
        Explicit µm/px, overriding the file's metadata.
    min_tissue_fraction
        A chunk is written when at least this fraction of it is tissue.
    all_tissue
        Write every chunk, tissue or not.
    block_chunks
        Chunks per side of one Dask task's block.
    overwrite
        Replace an existing store.
    tissue_result
        A tissue detection already done for this slide (skips redoing it).
    """
    t0 = time.perf_counter()
    block_chunks = int(config.get("tile.block-chunks", block_chunks))
    path = Path(path)
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExists(f"{out}: already exists; pass --overwrite to replace it")
    tr = tissue_result or detect_slide_tissue(
        path, mpp_um=mpp_um, min_tissue_fraction=min_tissue_fraction, all_tissue=all_tissue
    )
    info = tr.info
    t_tissue = time.perf_counter()
    attrs: dict[str, Any] = {
        "kind": "tiles",
        "complete": False,
        "slidejob_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source_path": info.path,
        "slide": info.to_dict(),
        "tissue": tr.attributes(),
        "parameters": {"block_chunks": block_chunks, "all_tissue": all_tissue},
    }
    with chunkstore.atomic_directory(out, overwrite=overwrite) as tmp:
        chunkstore.create_image_store(
            tmp, height_px=info.height_px, width_px=info.width_px, attributes=attrs, tissue_fraction=tr.fraction
        )
        tasks = []
        for by, bx, sub in block_slices(tr.grid, block_chunks):
            y0, x0 = by * CHUNK_PX, bx * CHUNK_PX
            height = min(sub.shape[0] * CHUNK_PX, info.height_px - y0)
            width = min(sub.shape[1] * CHUNK_PX, info.width_px - x0)
            tasks.append(
                dask.delayed(_tile_block, pure=False)(str(path), mpp_um, str(tmp), y0, x0, height, width, ~sub)
            )
        logger.info("%s: tiling %d tissue chunks in %d tasks", path.name, tr.n_tissue_chunks, len(tasks))
        dask.compute(*tasks)
        attrs["complete"] = True
        t_done = time.perf_counter()
        attrs["timings_s"] = {"tissue": round(t_tissue - t0, 3), "tile": round(t_done - t_tissue, 3)}
        zarr.open_group(tmp, mode="r+").attrs["slidejob"] = attrs
    seconds = time.perf_counter() - t0
    mp = tr.n_tissue_chunks * CHUNK_PX * CHUNK_PX / 1e6
    return TileResult(
        store=out,
        info=info,
        n_chunks=int(tr.grid.size),
        n_tissue_chunks=tr.n_tissue_chunks,
        seconds=seconds,
        megapixels_per_s=mp / max(t_done - t_tissue, 1e-9),
        timings=attrs["timings_s"],
    )
