"""Tiling a slide into the 512×512 Zarr chunk store (slidejob.pipeline.tile_slide, slidejob.chunkstore)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from slidejob import chunkstore
from slidejob.errors import CorruptSlide, OutputExists
from slidejob.pipeline import detect_slide_tissue, tile_slide
from slidejob.synthetic import write_slide
from slidejob.wsi import open_slide


def _assert_store_matches_slide(store: Path, slide_path: Path, grid: np.ndarray) -> None:
    """Every tissue chunk holds the slide's pixels exactly; every background chunk is absent."""
    arr = zarr.open_group(store, mode="r")[chunkstore.LEVEL0]
    with open_slide(slide_path) as reader:
        h, w = reader.info.height_px, reader.info.width_px
        assert arr.shape == (h, w, 3) and arr.chunks == (512, 512, 3) and arr.dtype == np.uint8
        expected_present = {(int(y), int(x)) for y, x in zip(*np.nonzero(grid))}
        assert chunkstore.stored_chunks(store) <= expected_present
        for cy in range(grid.shape[0]):
            for cx in range(grid.shape[1]):
                ys, xs = slice(cy * 512, min((cy + 1) * 512, h)), slice(cx * 512, min((cx + 1) * 512, w))
                got = arr[ys, xs]
                if grid[cy, cx]:
                    want = reader.read_region(ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start)
                    np.testing.assert_array_equal(got, want, err_msg=f"chunk {cy},{cx}")
                else:
                    assert (cy, cx) not in chunkstore.stored_chunks(store)
                    assert (got == chunkstore.IMAGE_FILL).all()


@pytest.mark.parametrize(
    ("h", "w"),
    [(1, 700), (700, 1), (300, 200), (512, 512), (1536, 1024), (1500, 1100), (2100, 1700)],
)
@pytest.mark.parametrize(("shards", "block_chunks"), [(True, 4), (True, 2), (False, 4)])
def test_store_equals_slide_pixels_lossless(tmp_path: Path, h: int, w: int, shards: bool, block_chunks: int) -> None:
    boxes = [(0, 0, h, w)] if min(h, w) < 512 else [(0, 0, h // 2, w // 2), (h - h // 3, w - w // 3, h, w)]
    slide = write_slide(tmp_path / "s.tif", h, w, tissue_boxes=boxes, compression="zlib", tile_px=16 if min(h, w) < 64 else 256)
    out = tmp_path / "s.zarr"
    result = tile_slide(slide.path, out, shards=shards, block_chunks=block_chunks)
    expected = slide.chunk_fraction() >= 0.01
    tr = detect_slide_tissue(slide.path)
    np.testing.assert_array_equal(tr.grid, expected)
    assert result.n_tissue_chunks == int(expected.sum())
    _assert_store_matches_slide(out, slide.path, expected)
    level0 = zarr.open_array(out / chunkstore.LEVEL0, mode="r")
    files = {p.name for p in (out / chunkstore.LEVEL0).glob("c.*")}
    if shards:  # one file per block that holds tissue, each a shard of block_chunks² chunks
        assert level0.shards == (512 * block_chunks, 512 * block_chunks, 3)
        assert files == {f"c.{cy // block_chunks}.{cx // block_chunks}.0" for cy, cx in zip(*np.nonzero(expected))}
    else:  # one file per tissue chunk
        assert level0.shards is None
        assert files == {f"c.{cy}.{cx}.0" for cy, cx in zip(*np.nonzero(expected))}


@pytest.mark.parametrize("tile_px", [240, 1024])
def test_store_equals_slide_pixels_with_tiles_across_chunk_borders(tmp_path: Path, tile_px: int) -> None:
    # 240² (Aperio) and 1024² tiles do not divide the 512² chunks: such slides are read a block at a time.
    h, w = 2100, 1700
    slide = write_slide(tmp_path / "s.tif", h, w, tissue_boxes=[(0, 0, h // 2, w // 2), (h - h // 3, w - w // 3, h, w)],
                        compression="zlib", tile_px=tile_px)
    with open_slide(slide.path) as reader:
        assert reader.tile_shape_px(0) == (tile_px, tile_px)
    out = tmp_path / "s.zarr"
    tile_slide(slide.path, out)
    _assert_store_matches_slide(out, slide.path, slide.chunk_fraction() >= 0.01)


@pytest.mark.parametrize(("tile_px", "max_decodes_per_tile"), [(256, 1.0), (240, 1.25)])
def test_tiling_decodes_each_source_tile_about_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tile_px: int, max_decodes_per_tile: float
) -> None:
    # Tiles that divide the chunks are decoded once; others (Aperio's 240²) once per block that
    # touches them, not once per chunk (which was ~2x: the real reader counted, not replaced).
    import collections

    import dask

    from slidejob.wsi import TiffChunkReader

    decodes: collections.Counter = collections.Counter()
    real_chunk = TiffChunkReader._chunk

    def counting(self: TiffChunkReader, index: tuple[int, ...]):
        decodes[(id(self), index)] += 1
        return real_chunk(self, index)

    slide = write_slide(tmp_path / "s.tif", 2100, 1700, tissue_boxes=[(0, 0, 2100, 1700)], compression="zlib",
                        tile_px=tile_px, n_levels=1)
    tissue = detect_slide_tissue(slide.path, all_tissue=True)  # its thumbnail reads are not counted
    monkeypatch.setattr(TiffChunkReader, "_chunk", counting)
    with dask.config.set(scheduler="sync"):
        tile_slide(slide.path, tmp_path / "s.zarr", tissue_result=tissue, all_tissue=True)
    n_tiles = -(-2100 // tile_px) * -(-1700 // tile_px)
    assert len(decodes) == n_tiles
    assert sum(decodes.values()) <= max_decodes_per_tile * n_tiles, sum(decodes.values()) / n_tiles


def test_store_attributes(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "s.tif", 1200, 1300, tissue_boxes=[(0, 0, 600, 600)], mpp_um=0.25)
    out = tmp_path / "s.zarr"
    tile_slide(slide.path, out)
    attrs = chunkstore.read_attributes(out)
    assert attrs["complete"] is True and attrs["kind"] == "tiles"
    assert attrs["slide"]["mpp_um"] == pytest.approx(0.25)
    assert attrs["slide"]["mpp_source"] == "tiff:XResolution(px/cm)"
    assert attrs["slide"]["width_px"] == 1300 and attrs["slide"]["vendor"] == "tiff"
    assert attrs["slide"]["fingerprint"].startswith("sha256:")
    assert attrs["tissue"]["grid"] == ["##.", "##.", "..."]
    assert attrs["tissue"]["n_tissue_chunks"] == 4
    assert 0.2 < attrs["tissue"]["tissue_fraction"] < 0.3
    assert attrs["slidejob_version"]
    frac = zarr.open_group(out, mode="r")[chunkstore.TISSUE_FRACTION][...]
    assert frac.shape == (3, 3) and frac[0, 0] == pytest.approx(1.0)


def test_pale_tissue_is_tiled(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "p.tif", 1024, 2048, tissue_boxes=[(0, 0, 1024, 512)],
                        pale_boxes=[(0, 1536, 1024, 2048)], compression="zlib")
    out = tmp_path / "p.zarr"
    tile_slide(slide.path, out)
    assert chunkstore.stored_chunks(out) == {(0, 0), (1, 0), (0, 3), (1, 3)}


def test_real_slides_tile_losslessly_from_decoded_pixels(real_slides: Path, tmp_path: Path) -> None:
    for name in ("aperio/CMU-1-Small-Region.svs", "aperio/CMU-1-crop-16x16.svs", "ome-tiff/OS-1-detail.ome.tif"):
        out = tmp_path / (Path(name).name + ".zarr")
        tile_slide(real_slides / name, out)
        grid = detect_slide_tissue(real_slides / name).grid
        assert grid.any()
        _assert_store_matches_slide(out, real_slides / name, grid)


def test_existing_output_is_refused_then_replaced(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "s.tif", 600, 600, tissue_boxes=[(0, 0, 600, 600)])
    out = tmp_path / "s.zarr"
    tile_slide(slide.path, out)
    with pytest.raises(OutputExists, match="--overwrite"):
        tile_slide(slide.path, out)
    tile_slide(slide.path, out, overwrite=True)
    assert chunkstore.read_attributes(out)["complete"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif", "s.zarr"]


def test_failure_midway_leaves_nothing_that_looks_like_output(tmp_path: Path) -> None:
    import tifffile

    slide = write_slide(tmp_path / "s.tif", 2048, 2048, tissue_boxes=[(0, 0, 2048, 2048)], compression="zlib",
                        n_levels=3)
    with tifffile.TiffFile(slide.path) as tf:
        page = tf.pages[0]
        offset, count = page.dataoffsets[-1], page.databytecounts[-1]
    data = bytearray(slide.path.read_bytes())
    data[offset : offset + count] = b"\x00" * count  # level 0's last tile no longer decodes
    slide.path.write_bytes(bytes(data))
    out = tmp_path / "s.zarr"
    with pytest.raises(CorruptSlide, match="cannot decode"):
        tile_slide(slide.path, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


def test_failed_rerun_keeps_previous_store(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "s.tif", 600, 600, tissue_boxes=[(0, 0, 600, 600)], compression="zlib")
    out = tmp_path / "s.zarr"
    tile_slide(slide.path, out)
    before = zarr.open_group(out, mode="r")[chunkstore.LEVEL0][...]
    slide.path.write_bytes(slide.path.read_bytes()[:2000])  # the slide is damaged after the first run
    with pytest.raises(CorruptSlide):
        tile_slide(slide.path, out, overwrite=True)
    np.testing.assert_array_equal(zarr.open_group(out, mode="r")[chunkstore.LEVEL0][...], before)


def test_distributed_cluster_gives_the_same_store(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    slide = write_slide(tmp_path / "s.tif", 2000, 1800, tissue_boxes=[(100, 100, 1500, 900), (1200, 1000, 2000, 1800)],
                        compression="zlib")
    tile_slide(slide.path, tmp_path / "threads.zarr")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster):
        tile_slide(slide.path, tmp_path / "dist.zarr")
    a = zarr.open_group(tmp_path / "threads.zarr", mode="r")[chunkstore.LEVEL0][...]
    b = zarr.open_group(tmp_path / "dist.zarr", mode="r")[chunkstore.LEVEL0][...]
    np.testing.assert_array_equal(a, b)
    assert chunkstore.stored_chunks(tmp_path / "threads.zarr") == chunkstore.stored_chunks(tmp_path / "dist.zarr")


def test_flat_tiff_thumbnail_is_reduced_in_blocks(tmp_path: Path) -> None:
    # No pyramid and larger than the thumbnail limit: detection still finds the tissue.
    slide = write_slide(tmp_path / "flat.tif", 3000, 2600, tissue_boxes=[(1000, 1000, 2000, 2000)], n_levels=1)
    tr = detect_slide_tissue(slide.path, max_side_px=500)
    assert max(tr.thumbnail.shape[:2]) <= 500
    np.testing.assert_array_equal(tr.grid, slide.chunk_fraction() >= 0.01)


def test_chunk_writer_reads_what_zarr_reads_and_deletes(tmp_path: Path) -> None:
    # The writer's read/delete bypass zarr's per-chunk bookkeeping; zarr must agree with them.
    root = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    mask = root.create_array("0", shape=(700, 1100), chunks=(512, 512), dtype="uint8", fill_value=0,
                             compressors=[zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")])
    data = np.random.default_rng(0).integers(0, 3, (700, 1100)).astype(np.uint8)
    mask[:, :600] = data[:, :600]
    io = chunkstore.ChunkWriter(tmp_path / "s.zarr" / "0")
    for index in [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (1, 2)]:
        sel = tuple(slice(i * 512, (i + 1) * 512) for i in index)
        got = io.read(index)
        np.testing.assert_array_equal(got, mask[sel])
        got[...] = 7  # a copy: writable, the store untouched
    np.testing.assert_array_equal(mask[:, :600], data[:, :600])
    io.write((1, 1), data[512:, 512:1024])
    io.delete((0, 0))
    np.testing.assert_array_equal(mask[512:, 512:1024], data[512:, 512:1024])
    assert not mask[:512, :512].any() and chunkstore.stored_chunks(tmp_path / "s.zarr", "0") == {(0, 1), (1, 0), (1, 1)}


def test_chunks_that_do_not_compress_are_stored_raw_and_read_back_by_zarr(tmp_path: Path) -> None:
    image = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3).create_array(
        "0", shape=(512, 1100, 3), chunks=(512, 512, 3), dtype="uint8", fill_value=255,
        compressors=chunkstore.image_codecs())
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    noise[::12] = 0  # one row in twelve blank: LZ4 saves ~8 %, like decoded JPEG of busy texture
    smooth = np.repeat(np.linspace(0, 255, 512, dtype=np.uint8)[None, :, None], 512, axis=0).repeat(3, axis=2)
    edge = smooth[:, :76]  # a chunk cut at the array's border
    writer = chunkstore.ChunkWriter(tmp_path / "s.zarr" / "0", skip_incompressible=True)
    for col, data in enumerate((noise, smooth, edge)):
        writer.write((0, col, 0), data)
    sizes = [writer._key_path((0, col, 0)).stat().st_size for col in range(3)]
    raw = noise.nbytes
    assert raw < sizes[0] <= raw + 32  # Blosc's header and a verbatim copy: not worth compressing
    assert sizes[1] < raw / 4 and sizes[2] < raw / 4  # compressible chunks are compressed
    np.testing.assert_array_equal(image[:, :512], noise)  # zarr's own Blosc codec reads both kinds
    np.testing.assert_array_equal(image[:, 512:1024], smooth)
    np.testing.assert_array_equal(image[:, 1024:], edge)
    plain = chunkstore.ChunkWriter(tmp_path / "s.zarr" / "0")  # the default compresses whatever it gets
    plain.write((0, 0, 0), noise)
    assert plain._key_path((0, 0, 0)).stat().st_size < 0.95 * raw
    np.testing.assert_array_equal(image[:, :512], noise)


@pytest.mark.parametrize("codec", ["blosc", "zstd"])  # the writer's own path, and zarr's for any other codec
def test_chunk_writer_read_box_equals_zarr(tmp_path: Path, codec: str) -> None:
    compressors = ([zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")] if codec == "blosc"
                   else [zarr.codecs.ZstdCodec(level=1)])
    image = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3).create_array(
        "0", shape=(1300, 1100, 3), chunks=(512, 512, 3), dtype="uint8", fill_value=255, compressors=compressors,
        config={"write_empty_chunks": False})
    data = np.random.default_rng(1).integers(0, 255, (1300, 1100, 3), dtype=np.uint8)
    image[:1024, :512] = data[:1024, :512]  # two chunks present, the rest absent (white)
    image[1024:, 512:] = data[1024:, 512:]  # edge chunks, cut at the array's border
    io = chunkstore.ChunkWriter(tmp_path / "s.zarr" / "0")
    assert (io._blosc is not None) == (codec == "blosc")
    rng = np.random.default_rng(2)
    for _ in range(20):
        y0, x0 = int(rng.integers(0, 1300)), int(rng.integers(0, 1100))
        box = (slice(y0, y0 + int(rng.integers(1, 900))), slice(x0, x0 + int(rng.integers(1, 900))), slice(None))
        np.testing.assert_array_equal(io.read_box(box), image[box])


def _sharded(tmp_path: Path, shape: tuple[int, ...] = (1300, 2100, 3), compressors: list | None = None) -> zarr.Array:
    # 1024² shards of 512² chunks: an edge shard, shards cut by the array's border, chunks absent inside shards.
    return zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3).create_array(
        "0", shape=shape, chunks=(512, 512, 3), shards=(1024, 1024, 3), dtype="uint8", fill_value=255,
        compressors=compressors or chunkstore.image_codecs(), chunk_key_encoding={"name": "default", "separator": "."})


def test_chunk_writer_reads_shards_zarr_wrote(tmp_path: Path) -> None:
    image = _sharded(tmp_path)
    data = np.random.default_rng(4).integers(0, 255, image.shape, dtype=np.uint8)
    image[:512, :1024] = data[:512, :1024]  # two of shard (0, 0)'s four chunks
    image[1024:, 1024:] = data[1024:, 1024:]  # the bottom-row shards, cut at the border
    io = chunkstore.ChunkWriter(tmp_path / "s.zarr" / "0")
    assert io._blosc is not None and io.chunks == (512, 512, 3) and io.shard_shape == (1024, 1024, 3)
    assert chunkstore.stored_chunks(tmp_path / "s.zarr", "0") == {(0, 0), (0, 1), (2, 2), (2, 3), (2, 4)}
    rng = np.random.default_rng(5)
    for _ in range(20):
        y0, x0 = int(rng.integers(0, 1300)), int(rng.integers(0, 2100))
        box = (slice(y0, y0 + int(rng.integers(1, 1200))), slice(x0, x0 + int(rng.integers(1, 1200))), slice(None))
        np.testing.assert_array_equal(io.read_box(box), image[box])


def test_shards_the_chunk_writer_wrote_are_read_by_zarr(tmp_path: Path) -> None:
    image = _sharded(tmp_path)
    data = np.random.default_rng(6).integers(0, 255, image.shape, dtype=np.uint8)
    data[:, 1024:] = np.linspace(0, 255, 1076, dtype=np.uint8)[None, :, None]  # compresses; the rest does not
    io = chunkstore.ChunkWriter(tmp_path / "s.zarr" / "0", skip_incompressible=True)
    present = {(0, 1), (1, 0), (0, 2), (2, 3), (2, 4)}
    for shard in [(0, 0), (0, 1), (1, 1), (1, 2), (0, 2)]:  # (0, 2) gets no chunk: its shard stays absent
        io.write_shard(
            ((cy, cx, 0), data[cy * 512 : (cy + 1) * 512, cx * 512 : (cx + 1) * 512])  # cut at the border
            for cy in range(shard[0] * 2, shard[0] * 2 + 2) for cx in range(shard[1] * 2, shard[1] * 2 + 2)
            if (cy, cx) in present
        )
    assert not io._key_path((0, 2, 0)).exists()
    assert chunkstore.stored_chunks(tmp_path / "s.zarr", "0") == present
    for cy in range(3):
        for cx in range(5):
            box = (slice(cy * 512, (cy + 1) * 512), slice(cx * 512, (cx + 1) * 512))
            want = data[box] if (cy, cx) in present else 255
            np.testing.assert_array_equal(image[box], np.broadcast_to(want, image[box].shape), err_msg=f"{cy},{cx}")
    # Incompressible chunks are stored raw inside the shard, compressible ones compressed.
    assert io._key_path((0, 0, 0)).stat().st_size == pytest.approx(2 * 512 * 512 * 3, rel=1e-3)
    assert io._key_path((1, 2, 0)).stat().st_size < 512 * 512 * 3 / 4
    # A shard is written whole: rewriting it with fewer chunks leaves the others absent.
    io.write_shard([((0, 1, 0), data[:512, 512:1024])])
    assert chunkstore.stored_chunks(tmp_path / "s.zarr", "0") == present - {(1, 0)}
    assert (image[512:1024, :512] == 255).all()
    # Single chunks go through zarr (a read-modify-write of their shard), and agree with it.
    io.write((1, 1, 0), data[512:1024, 512:1024])
    io.delete((0, 1, 0))
    np.testing.assert_array_equal(io.read_box((slice(0, 1024), slice(0, 1024), slice(None)))[512:, 512:],
                                  data[512:1024, 512:1024])
    assert chunkstore.stored_chunks(tmp_path / "s.zarr", "0") == present - {(1, 0), (0, 1)} | {(1, 1)}
    with pytest.raises(ValueError, match=r"chunk \(0, 2, 0\) is not in shard \(0, 0, 0\)"):
        io.write_shard([((0, 0, 0), data[:512, :512]), ((0, 2, 0), data[:512, 1024:1536])])


def test_shards_of_other_codecs_go_through_zarr(tmp_path: Path) -> None:
    image = _sharded(tmp_path, compressors=[zarr.codecs.ZstdCodec(level=1)])
    data = np.random.default_rng(7).integers(0, 255, image.shape, dtype=np.uint8)
    io = chunkstore.ChunkWriter(tmp_path / "s.zarr" / "0")
    assert io._blosc is None and io.chunks == (512, 512, 3)
    io.write_shard([((2, 4, 0), data[1024:, 2048:])])  # the corner shard, cut by the border both ways
    io.write_shard([((2, 3, 0), data[1024:, 1536:2048])])
    io.write_shard([((0, 1, 0), data[:512, 512:1024])])
    want = np.full(image.shape, 255, np.uint8)
    want[1024:, 1536:] = data[1024:, 1536:]
    want[:512, 512:1024] = data[:512, 512:1024]
    np.testing.assert_array_equal(image[...], want)
    np.testing.assert_array_equal(io.read_box((slice(300, 1300), slice(400, 2100), slice(None))), want[300:, 400:])


def test_a_damaged_shard_index_is_an_error_naming_the_file(tmp_path: Path) -> None:
    image = _sharded(tmp_path, (1024, 1024, 3))
    image[...] = 7
    io = chunkstore.ChunkWriter(tmp_path / "s.zarr" / "0")
    shard = io._key_path((0, 0, 0))
    raw = bytearray(shard.read_bytes())
    raw[-20] ^= 1  # a bit of the last chunk's size
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"c\.0\.0\.0: shard index fails its crc32c check"):
        io.read((0, 0, 0))
    shard.write_bytes(b"short")
    with pytest.raises(ValueError, match="shorter than its index"):
        chunkstore.stored_chunks(tmp_path / "s.zarr", "0")


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(gone.stdout)  # exited: its pid names no process (barring reuse within the test)
    host = chunkstore._HOST
    made = {
        "dead_dir": tmp_path / f".mask.ome.zarr.tmp-{host}-{dead_pid}-0123abcd",
        "dead_old": tmp_path / f".mask.ome.zarr.old-{host}-{dead_pid}-89abcdef",
        "dead_file": tmp_path / f".manifest.json.tmp-{host}-{dead_pid}-00ff00ff",
        "alive": chunkstore.tmp_name(tmp_path / "mask.ome.zarr"),  # this process: still writing
        "other_host": tmp_path / f".mask.ome.zarr.tmp-{host}x-{dead_pid}-0123abcd",  # cannot tell: kept
        "not_ours": tmp_path / ".mask.ome.zarr.tmp-whatever",
        "result": tmp_path / "mask.ome.zarr",
    }
    for name, path in made.items():
        if name == "dead_file":
            path.write_text("{}")
        else:
            (path / "0").mkdir(parents=True)
    assert chunkstore.remove_stale_temporaries(tmp_path, "manifest.json") == [made["dead_file"]]
    removed = set(chunkstore.remove_stale_temporaries(tmp_path))
    assert removed == {made["dead_dir"], made["dead_old"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        made[k].name for k in ("alive", "other_host", "not_ours", "result"))
    # atomic_directory clears its own final name's leftovers before building.
    leftover = tmp_path / f".tiles.zarr.tmp-{host}-{dead_pid}-0123abcd"
    leftover.mkdir()
    with chunkstore.atomic_directory(tmp_path / "tiles.zarr") as tmp:
        assert not leftover.exists() and tmp.name.startswith(f".tiles.zarr.tmp-{host}-{os.getpid()}-")


def test_a_failed_tiling_leaves_no_temporary_behind_its_still_running_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a cluster the first failed task raises while the others still write: removing the
    # temporary then raced them, and a late writer recreated it.  Here one block fails at once and
    # the others write a chunk a second later; nothing may remain once tile_slide has raised.
    from distributed import Client, LocalCluster

    from slidejob import pipeline

    slide = write_slide(tmp_path / "s.tif", 2048, 2048, tissue_boxes=[(0, 0, 2048, 2048)])
    real_tile_block, real_write = pipeline._tile_block, chunkstore.ChunkWriter.write

    def tile_block(path, mpp_um, store, y0, x0, *rest):
        if (y0, x0) == (0, 0):
            raise OSError(28, "No space left on device")
        return real_tile_block(path, mpp_um, store, y0, x0, *rest)

    def slow_write(self, index, data):  # the other blocks' writers are open and write a second later
        time.sleep(1.0)
        return real_write(self, index, data)

    monkeypatch.setattr(pipeline, "_tile_block", tile_block)
    monkeypatch.setattr(chunkstore.ChunkWriter, "write", slow_write)
    with LocalCluster(n_workers=1, threads_per_worker=4, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        with pytest.raises(OSError, match="No space left"):
            tile_slide(slide.path, tmp_path / "out" / "tiles.zarr", block_chunks=2)
        time.sleep(1.5)  # a writer that was still running would have recreated the folder by now
    assert list((tmp_path / "out").iterdir()) == []


def test_write_file_atomic_leaves_no_temporary_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "stats.json").write_text("old")

    def full(self, data):
        Path.write_text(self, "half")  # a partial write, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match="No space left"):
        chunkstore.write_file_atomic(tmp_path / "stats.json", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]
    assert (tmp_path / "stats.json").read_text() == "old"  # what was written before is untouched


def test_temporaries_of_other_hosts_go_once_untouched_and_live_ones_are_touched(tmp_path: Path) -> None:
    # A batch killed on one node and rerun on another: the rerun cannot ask the first node whether
    # the process lives, but a live run touches what it builds every HEARTBEAT_S.
    host, stale_s = chunkstore._HOST, chunkstore.STALE_AFTER_S
    long_ago = time.time() - stale_s - 60
    made = {
        "other_host_old": tmp_path / ".mask.ome.zarr.tmp-node17-4242-0123abcd",
        "other_host_fresh": tmp_path / ".tiles.zarr.tmp-node17-4242-0123abcd",
        "reused_pid_old": tmp_path / f".stats.json.tmp-{host}-1-00ff00ff",  # pid 1 lives: not ours
        "ours_old": chunkstore.tmp_name(tmp_path / "overlay.png"),
    }
    for name, path in made.items():
        path.mkdir()
        if name.endswith("_old"):
            os.utime(path, (long_ago, long_ago))
    removed = set(chunkstore.remove_stale_temporaries(tmp_path))
    assert removed == {made["other_host_old"], made["reused_pid_old"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(made[k].name for k in ("other_host_fresh", "ours_old"))
    # What atomic_directory is building is touched by the heartbeat, and no longer once renamed into place.
    with chunkstore.atomic_directory(tmp_path / "mask.ome.zarr") as building:
        os.utime(building, (long_ago, long_ago))
        chunkstore.touch_live_temporaries()
        assert time.time() - building.stat().st_mtime < 60
    assert building not in chunkstore._LIVE and (tmp_path / "mask.ome.zarr").is_dir()


def test_read_chunked_refuses_what_it_would_get_wrong() -> None:
    from slidejob.chunked import read_chunked

    a = np.arange(30).reshape(5, 6)

    def chunk(i: tuple[int, ...]) -> np.ndarray:
        return a[i[0] * 2 : i[0] * 2 + 2, i[1] * 4 : i[1] * 4 + 4]

    np.testing.assert_array_equal(read_chunked((slice(None), slice(-3, None)), a.shape, (2, 4), chunk,
                                               dtype=a.dtype, fill_value=0), a[:, -3:])
    with pytest.raises(ValueError, match="one entry per axis"):
        read_chunked((slice(0, 2),), a.shape, (2, 4), chunk, dtype=a.dtype, fill_value=0)
    with pytest.raises(IndexError, match="outside"):
        read_chunked((-1, slice(None)), a.shape, (2, 4), chunk, dtype=a.dtype, fill_value=0)
