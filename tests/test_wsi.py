from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from zarr.buffer import default_buffer_prototype

from slidejob.errors import CorruptSlide, SlideNotFound, UnsupportedSlide
from slidejob.synthetic import write_slide
from slidejob.wsi import TiffChunkReader, _completed, _Suspended, find_slides, fingerprint_file, open_slide

# name: (vendor, width, height, n_levels, mpp_um, mpp_source, objective)
REAL = {
    "aperio/CMU-1-Small-Region.svs": ("aperio", 2220, 2967, 1, 0.499, "aperio:MPP", 20.0),
    "aperio/CMU-1-crop-16x16.svs": ("aperio", 16, 16, 1, 0.499, "aperio:MPP", 20.0),
    "ndpi/test3-DAPI-2-387.ndpi": ("hamamatsu", 3968, 4864, 4, 1e4 / 43826, "ndpi:XResolution(px/cm)", 40.0),
    "ome-tiff/OS-1-detail.ome.tif": ("ome", 1101, 1101, 1, 0.2270972430394695, "ome:PhysicalSizeX", None),
    "ome-tiff/OS-2-ndpi.ome.tif": ("ome", 2202, 2202, 1, 0.2270972430394695, "ome:PhysicalSizeX", None),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_slide_metadata(real_slides: Path, name: str) -> None:
    vendor, w, h, n_levels, mpp, source, objective = REAL[name]
    with open_slide(real_slides / name) as reader:
        info = reader.info
        assert (info.vendor, info.width_px, info.height_px, len(info.levels)) == (vendor, w, h, n_levels)
        assert info.mpp_um == pytest.approx(mpp, rel=1e-9)
        assert info.mpp_source == source
        assert info.objective_power == objective
        region = reader.read_region(0, 0, min(h, 300), min(w, 200))
        assert region.shape == (min(h, 300), min(w, 200), 3) and region.dtype == np.uint8
        assert region.std() > 0  # real content, not a fill value
        assert info.fluorescence == name.startswith("ndpi/")  # the DAPI scan; the OME files are brightfield


def test_ndpi_pyramid_levels_agree(real_slides: Path) -> None:
    with open_slide(real_slides / "ndpi/test3-DAPI-2-387.ndpi") as reader:
        assert [lv.downsample for lv in reader.info.levels] == [1.0, 2.0, 4.0, 8.0]
        assert reader.info.fluorescence
        full = reader.read_region(0, 0, 1024, 1024).astype(np.float32)
        half = reader.read_region(0, 0, 512, 512, level=1).astype(np.float32)
        # The scanner's level 1 is a 2x reduction of level 0: compare with a box filter.
        box = full.reshape(512, 2, 512, 2, 3).mean(axis=(1, 3))
        assert np.abs(box - half).mean() < 6


def test_tile_larger_than_image(real_slides: Path) -> None:
    with open_slide(real_slides / "aperio/CMU-1-crop-16x16.svs") as reader:
        assert reader.read_region(0, 0, 512, 512).shape == (16, 16, 3)  # clipped to the image


def test_region_reads_only_the_tiles_it_needs(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "s.tif", 1024, 1024, tissue_boxes=[(0, 0, 1024, 1024)], compression="zlib",
                        n_levels=1)
    with tifffile.TiffFile(slide.path) as tf:
        page = tf.pages[0]
        offset, count = page.dataoffsets[-1], page.databytecounts[-1]  # the bottom-right tile
    data = bytearray(slide.path.read_bytes())
    data[offset : offset + count] = b"\x00" * count  # not a valid deflate stream any more
    slide.path.write_bytes(bytes(data))
    with open_slide(slide.path) as reader:
        assert reader.read_region(0, 0, 512, 512).shape == (512, 512, 3)  # never touches the broken tile
        with pytest.raises(CorruptSlide, match="cannot decode"):
            reader.read_region(900, 900, 100, 100)


def _zarr_region(path: Path, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The same region read the plain way, through ``zarr.Array`` on tifffile's store."""
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        arr = zarr.open_array(series.aszarr(level=level), mode="r")
        axes = series.axes
        box = tuple(slice(y0, y0 + h) if a == "Y" else slice(x0, x0 + w) if a == "X" else
                    (slice(None) if a in "SC" and n > 1 else 0) for a, n in zip(axes, series.levels[level].shape))
        data = np.asarray(arr[box])
        kept = [a for a, sel in zip(axes, box) if isinstance(sel, slice)]
        if kept[0] in "SC":
            data = np.moveaxis(data, 0, -1)
        return data[..., :3]


@pytest.mark.parametrize("name", sorted(REAL))
def test_chunkwise_reads_equal_zarr_reads(real_slides: Path, name: str) -> None:
    rng = np.random.default_rng(7)
    with open_slide(real_slides / name) as reader:
        for lv in reader.info.levels:
            for _ in range(6):
                h, w = (int(v) for v in rng.integers(1, 700, 2))
                y0 = int(rng.integers(0, lv.height_px))
                x0 = int(rng.integers(0, lv.width_px))
                got = reader.read_region(y0, x0, h, w, level=lv.index)
                np.testing.assert_array_equal(got, _zarr_region(reader.path, lv.index, y0, x0, h, w))


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({"photometric": "rgb", "planarconfig": "separate"}, (3, 70, 90)),  # channels first
        ({"photometric": "rgb", "extrasamples": ["unassalpha"]}, (70, 90, 4)),
    ],
)
def test_chunkwise_reads_other_layouts(tmp_path: Path, kwargs: dict, shape: tuple[int, ...]) -> None:
    p = tmp_path / "s.tif"
    img = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    tifffile.imwrite(p, img, tile=(32, 48), compression="zlib", **kwargs)
    with open_slide(p) as reader:
        for y0, x0, h, w in [(0, 0, 70, 90), (31, 47, 2, 2), (33, 0, 37, 49), (69, 89, 5, 5)]:
            np.testing.assert_array_equal(reader.read_region(y0, x0, h, w), _zarr_region(p, 0, y0, x0, h, w))


def test_chunkwise_reads_absent_tiles_and_suspending_stores(tmp_path: Path) -> None:
    p = tmp_path / "sparse.tif"

    def tiles():
        for i in range(6):
            yield None if i in (1, 4) else np.full((16, 32, 3), 10 * i + 1, np.uint8)

    tifffile.imwrite(p, tiles(), shape=(48, 64, 3), dtype=np.uint8, tile=(16, 32), photometric="rgb",
                     compression="zlib")
    with tifffile.TiffFile(p) as tf:
        assert 0 in tf.pages[0].databytecounts  # the tiles really are absent from the file
        expected = _zarr_region(p, 0, 0, 0, 48, 64)
        assert (expected[:16, 32:] == 0).all()  # tifffile's fill value
        np.testing.assert_array_equal(TiffChunkReader(tf.series[0].aszarr(maxworkers=1)).read(
            (slice(None), slice(None), slice(None))), expected)
        # A store that decodes in a thread awaits inside get(); those chunks go through zarr's loop.
        with pytest.raises(_Suspended):
            _completed(asyncio.sleep(0))
        threaded = tf.series[0].aszarr(maxworkers=2)
        with pytest.raises(_Suspended):
            _completed(threaded.get("0.0.0", default_buffer_prototype()))
        np.testing.assert_array_equal(TiffChunkReader(threaded).read((slice(5, 40), slice(3, 60), 1)),
                                      expected[5:40, 3:60, 1])


@pytest.mark.parametrize(
    ("resolution", "unit", "expected", "source"),
    [
        ((20000, 20000), "CENTIMETER", 0.5, "tiff:XResolution(px/cm)"),
        ((101600, 101600), "INCH", 0.25, "tiff:XResolution(px/inch)"),
        ((72, 72), "INCH", None, "unknown (tiff:XResolution(px/inch) gives 352.8 µm/px"),
        ((1, 1), "NONE", None, "unknown (TIFF ResolutionUnit is NONE)"),
    ],
)
def test_generic_tiff_mpp(tmp_path: Path, resolution, unit, expected, source) -> None:
    p = tmp_path / "r.tif"
    tifffile.imwrite(p, np.zeros((32, 32, 3), np.uint8), tile=(16, 16), resolution=resolution, resolutionunit=unit)
    with open_slide(p) as reader:
        assert reader.info.mpp_um == (pytest.approx(expected) if expected else None)
        assert reader.info.mpp_source.startswith(source)


def test_missing_mpp_is_unknown_and_override_wins(tmp_path: Path) -> None:
    p = tmp_path / "n.tif"
    tifffile.imwrite(p, np.zeros((32, 32, 3), np.uint8), tile=(16, 16))
    with open_slide(p) as reader:
        assert reader.info.mpp_um is None
    with open_slide(p, mpp_um=0.25) as reader:
        assert (reader.info.mpp_um, reader.info.mpp_source) == (0.25, "override")


def test_aperio_without_mpp(tmp_path: Path) -> None:
    p = tmp_path / "a.svs"
    desc = "Aperio Image Library v12.0.15 \r\n64x64 [0,0 64x64] (16x16) JPEG/RGB Q=70|AppMag = 40|Filename = a"
    tifffile.imwrite(p, np.zeros((64, 64, 3), np.uint8), tile=(16, 16), description=desc, photometric="rgb")
    with open_slide(p) as reader:
        assert reader.info.vendor == "aperio"
        assert reader.info.mpp_um is None and reader.info.mpp_source.startswith("unknown")
        assert reader.info.objective_power == 40.0


@pytest.mark.parametrize(("value", "unit", "expected"), [(250.0, "nm", 0.25), (0.5, "µm", 0.5)])
def test_ome_physical_size_units(tmp_path: Path, value: float, unit: str, expected: float) -> None:
    p = tmp_path / "o.ome.tif"
    tifffile.imwrite(
        p, np.zeros((64, 64, 3), np.uint8), tile=(16, 16), photometric="rgb", ome=True,
        metadata={"axes": "YXS", "PhysicalSizeX": value, "PhysicalSizeXUnit": unit,
                  "PhysicalSizeY": value, "PhysicalSizeYUnit": unit},
    )
    with open_slide(p) as reader:
        assert reader.info.vendor == "ome"
        assert reader.info.mpp_um == pytest.approx(expected)
        assert reader.info.mpp_source == "ome:PhysicalSizeX"


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    p = tmp_path / "rgba.tif"
    img = np.random.default_rng(0).integers(0, 255, (40, 40, 4), dtype=np.uint8)
    tifffile.imwrite(p, img, tile=(16, 16), photometric="rgb", extrasamples=["unassalpha"])
    with open_slide(p) as reader:
        assert reader.info.conversion.startswith("rgba->rgb")
        np.testing.assert_array_equal(reader.read_region(0, 0, 40, 40), img[..., :3])


def test_planar_rgb_is_interleaved(tmp_path: Path) -> None:
    p = tmp_path / "planar.tif"
    img = np.random.default_rng(0).integers(0, 255, (3, 40, 48), dtype=np.uint8)
    tifffile.imwrite(p, img, tile=(16, 16), photometric="rgb", planarconfig="separate")
    with open_slide(p) as reader:
        assert (reader.info.height_px, reader.info.width_px) == (40, 48)
        np.testing.assert_array_equal(reader.read_region(0, 0, 40, 48), np.moveaxis(img, 0, -1))


@pytest.mark.parametrize(
    ("channel", "fluorescence"),
    [
        ({"Name": ["DAPI", "FITC", "TRITC"]}, True),
        ({"Name": ["AF488", "Cy5", "mCherry"]}, True),
        ({"EmissionWavelength": [461.0, 519.0, 576.0]}, True),
        ({"Name": ["Red", "Green", "Blue"]}, False),
        ({}, False),
        # A channel that says it is transmitted light is brightfield, whatever wavelengths it carries.
        ({"IlluminationType": ["Transmitted"] * 3, "EmissionWavelength": [450.0, 550.0, 650.0]}, False),
    ],
)
def test_ome_three_channel_fluorescence_is_told_from_planar_rgb(
    tmp_path: Path, channel: dict, fluorescence: bool
) -> None:
    # Three fluorescence channels stored as planes read exactly like planar RGB; only the OME
    # channels' light path or dye names tell them apart, and `run` refuses fluorescence.
    p = tmp_path / "three.ome.tif"
    img = np.random.default_rng(0).integers(0, 255, (3, 64, 80), dtype=np.uint8)
    tifffile.imwrite(p, img, ome=True, tile=(32, 32), metadata={"axes": "CYX", "Channel": channel})
    with open_slide(p) as reader:
        assert reader.info.fluorescence == fluorescence
        np.testing.assert_array_equal(reader.read_region(0, 0, 64, 80), np.moveaxis(img, 0, -1))


def test_segments_too_large_to_decode_one_at_a_time_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A region read decodes whole tiles or strips: a single-strip or huge-tile file would be decoded
    # whole by every reading thread.  The bound is lowered here so that small files show it.
    from slidejob import wsi

    monkeypatch.setattr(wsi, "MAX_SEGMENT_BYTES", 2**20)
    img = np.zeros((1024, 1024, 3), np.uint8)
    tifffile.imwrite(tmp_path / "strip.tif", img, photometric="rgb", rowsperstrip=1024, compression="zlib")
    tifffile.imwrite(tmp_path / "tiled.tif", img, photometric="rgb", tile=(256, 256), compression="zlib")
    tifffile.imwrite(tmp_path / "rows.tif", img, photometric="rgb", rowsperstrip=64, compression="zlib")
    with pytest.raises(UnsupportedSlide, match=r"strip\.tif: level 0 is stored in strips of 1024×1024 px \(3 MiB"):
        open_slide(tmp_path / "strip.tif")
    for ok in ("tiled.tif", "rows.tif"):
        with open_slide(tmp_path / ok) as reader:
            assert reader.info.width_px == 1024


def test_ome_four_separate_channels_are_not_rgba(tmp_path: Path) -> None:
    p = tmp_path / "four.ome.tif"
    img = np.zeros((4, 64, 80), np.uint8)
    tifffile.imwrite(p, img, ome=True, tile=(32, 32), metadata={"axes": "CYX"})
    with pytest.raises(UnsupportedSlide, match="4-channel image"):
        open_slide(p)


@pytest.mark.parametrize(
    ("shape", "dtype", "kwargs", "match"),
    [
        ((32, 32), np.uint8, {"photometric": "minisblack"}, "grayscale"),
        ((32, 32, 3), np.uint16, {"photometric": "rgb"}, "pixel type uint16"),
        ((5, 32, 32), np.uint8, {"photometric": "minisblack", "planarconfig": "separate"}, "5-channel"),
        ((4, 3, 32, 32), np.uint8, {"photometric": "rgb", "planarconfig": "separate"}, "not a 2-D RGB slide"),
    ],
)
def test_unsupported_pixel_types(tmp_path: Path, shape, dtype, kwargs, match) -> None:
    p = tmp_path / "bad.tif"
    tifffile.imwrite(p, np.zeros(shape, dtype), tile=(16, 16), **kwargs)
    with pytest.raises(UnsupportedSlide, match=match) as err:
        open_slide(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, type, str]]:
    good = write_slide(tmp_path / "good.tif", 1024, 1024, tissue_boxes=[(0, 0, 1024, 1024)], n_levels=1).path
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    text = tmp_path / "notes.tif"
    text.write_text("this is not a slide\n")
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    absurd = tmp_path / "absurd.tif"
    tifffile.imwrite(absurd, np.zeros((16, 16, 3), np.uint8), tile=(16, 16), photometric="rgb")
    with tifffile.TiffFile(absurd) as tf:
        tag = tf.pages[0].tags["ImageWidth"]
        offset, fmt = tag.valueoffset, "<I" if tag.dtype == 4 else "<H"
    data = bytearray(absurd.read_bytes())
    data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, 4_000_000 if fmt == "<I" else 65535)
    absurd.write_bytes(bytes(data))
    return {
        "missing": (tmp_path / "nope.svs", SlideNotFound, "no such file"),
        "empty": (empty, UnsupportedSlide, "empty"),
        "not-tiff": (text, UnsupportedSlide, "not a TIFF"),
        "truncated": (truncated, CorruptSlide, "truncated"),
        "absurd": (absurd, UnsupportedSlide, "header claims 4000000"),
    }


@pytest.mark.parametrize("kind", ["missing", "empty", "not-tiff", "truncated", "absurd"])
def test_bad_input_one_line_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    path, exc_type, match = _bad_inputs(tmp_path)[kind]
    with pytest.raises(exc_type, match=match) as err:
        open_slide(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_fingerprint_sees_changes_in_large_files(tmp_path: Path) -> None:
    p = tmp_path / "big.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 255, 3_000_000, dtype=np.uint8).tobytes())
    p.write_bytes(bytes(data))
    before = fingerprint_file(p)
    assert fingerprint_file(p) == before
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    assert fingerprint_file(p) != before


def test_find_slides_says_which_folders_it_cannot_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "locked").mkdir()
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "a.svs").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path):  # what listing a folder without read permission does (root would not see it)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert [p.name for p in find_slides([tmp_path])] == ["a.svs"]
    assert "locked: cannot list this folder (Permission denied)" in caplog.text


def test_find_slides_recurses_and_dedupes(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.svs", "a/b/y.ndpi", "a/b/z.ome.tif", "a/readme.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = find_slides([tmp_path, tmp_path / "a" / "x.svs"])
    assert [p.name for p in found] == ["y.ndpi", "z.ome.tif", "x.svs"]
    # A directory without slides: fine beside others, an error on its own (a mistyped path
    # must not look like a finished batch).
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_bytes(b"x")
    assert [p.name for p in find_slides([tmp_path / "empty", tmp_path / "a" / "x.svs"])] == ["x.svs"]
    with pytest.raises(SlideNotFound, match=r"empty: no slide files found \(looked for \.svs"):
        find_slides([tmp_path / "empty"])
    # A mistyped path on its own is bad input too; beside a real slide it fails as its own slide.
    with pytest.raises(SlideNotFound, match=r"scnas: no such file or directory; .*empty: no slide files found"):
        find_slides([tmp_path / "scnas", tmp_path / "empty"])
    assert [p.name for p in find_slides([tmp_path / "gone.svs", tmp_path / "a" / "x.svs"])] == ["gone.svs", "x.svs"]
    # Symlinked folders are followed (a scan share linked in), each real folder once (a loop ends).
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "to-a").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "a" / "b" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    assert sorted(p.name for p in find_slides([tmp_path / "linked"])) == ["x.svs", "y.ndpi", "z.ome.tif"]
