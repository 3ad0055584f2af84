"""The per-slide mask store: an OME-Zarr (NGFF 0.5, Zarr v3) multiscale label image.

Layout of ``<slide-id>/mask.ome.zarr`` (likewise ``probability.ome.zarr``)::

    mask.ome.zarr/
      zarr.json        attributes: "ome" (NGFF multiscales + image-label) and
                       "slidejob" (slide info, tissue grid, model, threshold, ...)
      0/               level 0, (H, W) uint8, 0 = not cancer, 1 = cancer,
                       chunks 512×512; a chunk is present iff it was inferred
                       (a tissue chunk); background chunks are absent (read 0)
      1/, 2/, ...      each half the previous (max over 2×2: a lesion stays
                       visible when zoomed out), chunks 512×512
      tissue_fraction/ (ceil(H/512), ceil(W/512)) float32, tissue fraction per level-0 chunk

Any OME-Zarr 0.5 reader (ome-zarr-py, napari-ome-zarr) opens it without slidejob.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from slidejob.chunkstore import CHUNK_PX, ChunkWriter
from slidejob.tissue import mean_round_half_even

NGFF_VERSION = "0.5"
MASK_NAME = "mask.ome.zarr"
PROBABILITY_NAME = "probability.ome.zarr"
TISSUE_FRACTION = "tissue_fraction"


def n_levels_for(height_px: int, width_px: int) -> int:
    """Pyramid levels until the largest side fits in one chunk.

    >>> n_levels_for(512, 512), n_levels_for(513, 100), n_levels_for(100000, 60000)
    (1, 2, 9)
    """
    n, side = 1, max(height_px, width_px)
    while side > CHUNK_PX:
        side = -(-side // 2)
        n += 1
    return n


def level_shape(height_px: int, width_px: int, level: int) -> tuple[int, int]:
    """Shape of a pyramid level (ceil-halved, so no level-0 pixel is lost)."""
    h, w = height_px, width_px
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def ngff_attributes(
    *, name: str, n_levels: int, mpp_um: float | None, label: bool
) -> dict[str, Any]:
    """The ``ome`` attributes: multiscales (+ image-label for masks)."""
    unit = {"unit": "micrometer"} if mpp_um else {}
    base = mpp_um if mpp_um else 1.0
    ome: dict[str, Any] = {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
                "datasets": [
                    {
                        "path": str(i),
                        "coordinateTransformations": [{"type": "scale", "scale": [base * 2**i, base * 2**i]}],
                    }
                    for i in range(n_levels)
                ],
                "type": "max" if label else "mean",
                "metadata": {"description": "2x2 max pooling" if label else "2x2 mean"},
            }
        ],
    }
    if label:
        ome["image-label"] = {
            "version": NGFF_VERSION,
            "colors": [{"label-value": 1, "rgba": [255, 0, 0, 160]}],
            "properties": [{"label-value": 1, "class": "cancer"}],
        }
    return ome


def create_mask_store(
    path: Path,
    *,
    height_px: int,
    width_px: int,
    mpp_um: float | None,
    attributes: dict[str, Any],
    tissue_fraction: npt.NDArray[np.float32],
    name: str = "cancer",
    label: bool = True,
) -> zarr.Group:
    """Create an empty mask (label) or probability store with all its pyramid arrays."""
    n_levels = n_levels_for(height_px, width_px)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.attrs.update({"ome": ngff_attributes(name=name, n_levels=n_levels, mpp_um=mpp_um, label=label),
                       "slidejob": attributes})
    for level in range(n_levels):
        root.create_array(
            str(level),
            shape=level_shape(height_px, width_px, level),
            chunks=(CHUNK_PX, CHUNK_PX),
            dtype="uint8",
            fill_value=0,
            compressors=[BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)],
            dimension_names=("y", "x"),
            # Level 0 keeps all-zero tissue chunks: a present chunk means "inferred".
            config={"write_empty_chunks": level == 0},
        )
    tf = root.create_array(TISSUE_FRACTION, shape=tissue_fraction.shape, chunks=tissue_fraction.shape or (1,),
                           dtype="float32")
    tf[...] = tissue_fraction
    return root


def levels_within_blocks(block_chunks: int) -> int:
    """Pyramid levels whose every chunk lies inside one aligned block of ``block_chunks``² level-0 chunks.

    A level-``l`` chunk covers 2**l level-0 chunks per side, so these are the
    levels an inference task can write from its own block.

    >>> [levels_within_blocks(n) for n in (1, 2, 3, 4, 6, 8)]
    [0, 1, 0, 2, 1, 3]
    """
    levels = 0
    while block_chunks % (2 ** (levels + 1)) == 0:
        levels += 1
    return levels


def write_levels(
    path: Path,
    region: npt.NDArray[np.uint8],
    origin_chunk: tuple[int, int],
    levels: int,
    *,
    reducer: str,
    base_level: int = 0,
) -> int:
    """Write the ``levels`` levels above ``base_level`` of a store from a whole region of it, sparsely.

    ``region`` is level ``base_level`` from chunk ``origin_chunk`` (row, col;
    multiples of 2**levels) to the end of a 2**levels-aligned box or the
    level's edge, with absent chunks as zeros: every chunk of the levels above
    under it is made from it alone.  All-zero chunks stay absent.  Returns the
    chunks written.
    """
    reduce = downsample_max if reducer == "max" else downsample_mean
    written = 0
    level = region
    for lv in range(1, levels + 1):
        level = reduce(level)
        writer = ChunkWriter(Path(path) / str(base_level + lv))
        r0, c0 = origin_chunk[0] >> lv, origin_chunk[1] >> lv
        for r in range(-(-level.shape[0] // CHUNK_PX)):
            for c in range(-(-level.shape[1] // CHUNK_PX)):
                part = level[r * CHUNK_PX : (r + 1) * CHUNK_PX, c * CHUNK_PX : (c + 1) * CHUNK_PX]
                if part.any():
                    writer.write((r0 + r, c0 + c), part)
                    written += 1
    return written


def downsample_max(block: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """2×2 max pooling with ceil at odd edges.

    >>> downsample_max(np.array([[0, 1, 0], [0, 0, 0], [2, 0, 0]], np.uint8)).tolist()
    [[1, 0], [2, 0]]
    """
    h, w = block.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        block = np.pad(block, ((0, ph), (0, pw)), mode="constant")
    # The four strided quarters, elementwise: ~30× faster than a reduce over two strided axes.
    return np.maximum(np.maximum(block[0::2, 0::2], block[1::2, 0::2]),
                      np.maximum(block[0::2, 1::2], block[1::2, 1::2]))


def downsample_mean(block: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """2×2 mean (for probability maps), edge-replicated at odd edges, rounded half to even.

    >>> downsample_mean(np.array([[0, 1, 9], [1, 0, 7], [255, 255, 3]], np.uint8)).tolist()
    [[0, 8], [255, 3]]
    """
    h, w = block.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        block = np.pad(block, ((0, ph), (0, pw)), mode="edge")
    # The four strided quarters summed (9.6 against tissue.block_mean_downsample's 10.6 ms for a 2048²
    # block since that got faster; 3× faster than its old reshape sums).
    total = block[0::2, 0::2].astype(np.uint16) + block[1::2, 0::2] + block[0::2, 1::2] + block[1::2, 1::2]
    return mean_round_half_even(total, 4).astype(np.uint8)


def erase_components(
    path: Path, components: Sequence[tuple[tuple[int, int, int, int], tuple[int, int]]], *, levels: int = 0
) -> set[tuple[int, int]]:
    """Set 8-connected components of level 0 to 0, each given by its bounding box and one of its pixels.

    ``components`` holds ``(bbox_px (y0, x0, y1, x1), (row, col))`` pairs, as
    :class:`slidejob.stats.Lesion` has them.  A component lies within its
    bounding box and is connected there, so labelling that crop finds all of it.
    Each chunk concerned is read and rewritten once; components are taken in
    order of their top rows and chunks above the current one are written out as
    the sweep passes them, so memory holds a band of chunks, not the slide.

    Pyramid levels 1..``levels`` (max reducer) follow: a level-0 chunk is a
    whole (512 >> l)-px square of its level-``l`` ancestor, because chunk
    borders fall on multiples of 2**l, so each rewritten chunk's part of every
    level is its own reduction, patched into the ancestor chunk (read and
    written once).  Returns the (row, col) of the level-0 chunks rewritten.
    """
    from scipy import ndimage

    writer = ChunkWriter(Path(path) / "0")
    band: dict[tuple[int, int], npt.NDArray[np.uint8]] = {}
    dirty: set[tuple[int, int]] = set()
    written: set[tuple[int, int]] = set()
    # Per level: ancestor chunk -> [(offset in it, reduced pixels of a rewritten chunk)].
    patches: list[dict[tuple[int, int], list[tuple[tuple[int, int], npt.NDArray[np.uint8]]]]] = [
        {} for _ in range(levels + 1)
    ]

    def patch_ancestors(below_row: int) -> None:
        for lv in range(1, levels + 1):
            done = [key for key in patches[lv] if (key[0] + 1) << lv <= below_row]
            if not done:
                continue
            lv_writer = ChunkWriter(Path(path) / str(lv))
            for r, c in done:
                chunk = lv_writer.read((r, c))
                for (oy, ox), part in patches[lv].pop((r, c)):
                    chunk[oy : oy + part.shape[0], ox : ox + part.shape[1]] = part
                if chunk.any():
                    lv_writer.write((r, c), chunk)
                else:
                    lv_writer.delete((r, c))

    def flush(below_row: int) -> None:
        for key in [key for key in band if key[0] < below_row]:
            chunk = band.pop(key)
            if key not in dirty:
                continue
            writer.write(key, chunk)
            dirty.discard(key)
            written.add(key)
            reduced = chunk
            for lv in range(1, levels + 1):
                reduced = downsample_max(reduced)
                step = 1 << lv
                ancestor = (key[0] >> lv, key[1] >> lv)
                offset = ((key[0] % step) * (CHUNK_PX >> lv), (key[1] % step) * (CHUNK_PX >> lv))
                patches[lv].setdefault(ancestor, []).append((offset, reduced))
        patch_ancestors(below_row)

    def overlaps(
        y0: int, x0: int, y1: int, x1: int
    ) -> Iterator[tuple[tuple[int, int], npt.NDArray[np.uint8], tuple[slice, slice], tuple[slice, slice]]]:
        # Per chunk under the box: its index, its pixels, the box's part of it, that part in the crop.
        for cy in range(y0 // CHUNK_PX, -(-y1 // CHUNK_PX)):
            for cx in range(x0 // CHUNK_PX, -(-x1 // CHUNK_PX)):
                oy, ox = cy * CHUNK_PX, cx * CHUNK_PX
                if (cy, cx) not in band:
                    band[(cy, cx)] = writer.read((cy, cx))
                chunk = band[(cy, cx)]
                sy, sx = max(y0, oy), max(x0, ox)
                ey, ex = min(y1, oy + chunk.shape[0]), min(x1, ox + chunk.shape[1])
                yield ((cy, cx), chunk, (slice(sy - oy, ey - oy), slice(sx - ox, ex - ox)),
                       (slice(sy - y0, ey - y0), slice(sx - x0, ex - x0)))

    for (y0, x0, y1, x1), (fy, fx) in sorted(components, key=lambda c: c[0][0]):
        # Chunk rows wholly above this component are never needed again.
        flush(y0 // CHUNK_PX)
        crop = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for _, chunk, in_chunk, in_crop in overlaps(y0, x0, y1, x1):
            crop[in_crop] = chunk[in_chunk]
        labels, _ = ndimage.label(crop != 0, structure=np.ones((3, 3), bool))  # 8-connectivity, as lesions
        own = labels == labels[fy - y0, fx - x0]
        for key, chunk, in_chunk, in_crop in overlaps(y0, x0, y1, x1):
            part = own[in_crop]
            if part.any():
                chunk[in_chunk][part] = 0
                dirty.add(key)
    flush(1 << 62)
    return written
