"""Whole-slide image reader: Aperio SVS, Hamamatsu NDPI, OME-TIFF, generic tiled TIFF.

Everything goes through tifffile's Zarr view (``TiffPageSeries.aszarr``), so a
region read decodes only the tiles (or NDPI strips) that overlap it and a level
is never read whole by accident.  The reader is the only place that knows about
vendors; downstream code sees :class:`SlideInfo` and RGB ``uint8`` arrays.

Microns per pixel are reported with their source and never invented: a slide
without trustworthy resolution metadata has ``mpp_um=None`` unless the caller
passes an explicit override.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import tifffile
import zarr
from zarr.buffer import default_buffer_prototype

from slidejob.chunked import read_chunked
from slidejob.errors import CorruptSlide, SlideNotFound, UnsupportedSlide

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11; requires-python is 3.10

logger = logging.getLogger(__name__)

#: File name endings slidejob treats as slides when given a directory.
SLIDE_SUFFIXES: tuple[str, ...] = (".svs", ".ndpi", ".tif", ".tiff", ".btf", ".scn", ".bif")

#: No scanner produces more than this many pixels a side; a header that claims
#: more is corrupt or hostile (and would make size arithmetic overflow).
MAX_SIDE_PX = 1_000_000
#: The most one stored tile or strip of any level may hold, decoded.  A region read decodes whole
#: segments, so a slide saved as one strip (or with a corrupt tile size) would be decoded whole by
#: every task thread that reads it: a 50,000² single-strip RGB image is 7.5 GB.  Scanners write
#: tiles of 240-1024 px (under 3.2 MB); an 8192² single-strip TIFF (201 MB) still reads.
MAX_SEGMENT_BYTES = 256 * 2**20

#: µm/px outside this range is not a microscope scan (a 72 dpi "screen" default
#: is 352.8 µm/px); such a value is reported as unknown rather than trusted.
PLAUSIBLE_MPP_UM = (0.05, 50.0)

_FINGERPRINT_BLOCK_BYTES = 1 << 16
_FINGERPRINT_SAMPLES = 16


@dataclass(frozen=True)
class LevelInfo:
    """One resolution level of the slide pyramid."""

    index: int
    height_px: int
    width_px: int
    downsample: float


@dataclass(frozen=True)
class SlideInfo:
    """What slidejob knows about a slide; JSON-friendly via :meth:`to_dict`."""

    path: str
    vendor: str
    height_px: int
    width_px: int
    levels: tuple[LevelInfo, ...]
    mpp_um: float | None
    mpp_source: str
    objective_power: float | None
    file_size_bytes: int
    fingerprint: str
    source_samples: int
    conversion: str
    fluorescence: bool

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["levels"] = [dataclasses.asdict(lv) for lv in self.levels]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlideInfo:
        d = dict(d)
        d["levels"] = tuple(LevelInfo(**lv) for lv in d["levels"])
        return cls(**d)


def fingerprint_file(path: Path) -> str:
    """Sampled content fingerprint of a file, fast whatever its size.

    sha256 over the size and 16 evenly spaced 64 KiB blocks (first and last
    included).  Slides are tens of GB, so hashing every byte on every resume
    check would cost minutes; any re-scan, re-export or truncation changes the
    size or the sampled blocks.  Not a security hash of the whole file.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> _ = p.write_bytes(b"slide")
    >>> fingerprint_file(p)[:7]
    'sha256:'
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= _FINGERPRINT_BLOCK_BYTES * _FINGERPRINT_SAMPLES:
            h.update(fh.read())
        else:
            last = size - _FINGERPRINT_BLOCK_BYTES
            for i in range(_FINGERPRINT_SAMPLES):
                fh.seek(last * i // (_FINGERPRINT_SAMPLES - 1))
                h.update(fh.read(_FINGERPRINT_BLOCK_BYTES))
    return "sha256:" + h.hexdigest()[:32]


def _aperio_fields(description: str) -> dict[str, str]:
    """``key = value`` pairs of an Aperio ImageDescription (``|``-separated)."""
    fields = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


_OME_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}


def _ome_mpp(xml: str) -> tuple[float | None, str]:
    m = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if not m:
        return None, "unknown"
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(0)))
    if "PhysicalSizeX" not in attrs:
        return None, "unknown"
    unit = attrs.get("PhysicalSizeXUnit", "µm")
    if unit not in _OME_UNIT_TO_UM:
        return None, f"unknown (OME PhysicalSizeXUnit {unit!r} not understood)"
    return float(attrs["PhysicalSizeX"]) * _OME_UNIT_TO_UM[unit], "ome:PhysicalSizeX"


#: Channel names that are dyes or fluorescent proteins, not colours of a brightfield camera.
_FLUOROPHORE = re.compile(
    r"(?<![a-z0-9])(dapi|hoechst|fitc|tritc|texas ?red|cy[2357](\.5)?|e?[gycr]fp|mcherry|tdtomato|"
    r"alexa|af[ _-]?\d{3}|cf\d{3}|bv\d{3}|draq[57]|opal|atto|dylight|sytox|propidium)(?![a-z])|fluor",
    re.IGNORECASE,
)
#: A channel that says it is brightfield is, whatever wavelengths a converter copied onto it.
_BRIGHTFIELD = {("IlluminationType", "Transmitted"), ("ContrastMethod", "Brightfield"),
                ("ContrastMethod", "Phase"), ("ContrastMethod", "DIC")}


def _ome_fluorescence(xml: str) -> str | None:
    """Why an OME-XML describes a fluorescence image (its channels' light path or names), or None.

    A brightfield RGB scan has one channel of 3 samples (or red, green, blue);
    fluorescence has excitation and emission wavelengths, a fluor, an
    epifluorescence light path, or channels named after dyes.  Three such
    channels would otherwise read as an RGB slide.

    >>> _ome_fluorescence('<Channel ID="Channel:0" SamplesPerPixel="3"/>') is None
    True
    >>> _ome_fluorescence('<Channel ID="c0" Name="DAPI" SamplesPerPixel="1"/>')
    "channel 'DAPI'"
    >>> _ome_fluorescence("<ome:Channel ID='c0' EmissionWavelength='461'/>")
    'channel EmissionWavelength'
    >>> _ome_fluorescence('<Channel IlluminationType="Transmitted" EmissionWavelength="550" SamplesPerPixel="3"/>')
    >>> _ome_fluorescence('<Channel Name="AlexaFluor488"/>'), _ome_fluorescence('<Channel Name="Red"/>')
    ("channel 'AlexaFluor488'", None)
    """
    for tag in re.findall(r"<(?:\w+:)?Channel\b[^>]*>", xml):
        attrs = {k: v1 or v2 for k, v1, v2 in re.findall(r"""(\w+)=(?:"([^"]*)"|'([^']*)')""", tag)}
        if _BRIGHTFIELD & set(attrs.items()):
            continue
        if attrs.get("IlluminationType") == "Epifluorescence" or attrs.get("ContrastMethod") == "Fluorescence":
            return f"channel {'IlluminationType' if 'IlluminationType' in attrs else 'ContrastMethod'}"
        for key in ("EmissionWavelength", "ExcitationWavelength", "Fluor"):
            if key in attrs:
                return f"channel {key}"
        if _FLUOROPHORE.search(attrs.get("Name", "")):
            return f"channel {attrs['Name']!r}"
    return None


def _tiff_resolution_mpp(page: tifffile.TiffPage) -> tuple[float | None, str]:
    tags = page.tags
    if "XResolution" not in tags:
        return None, "unknown"
    num, den = tags["XResolution"].value
    if not num or not den:
        return None, "unknown"
    px_per_unit = num / den
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if unit == 3:
        return 1e4 / px_per_unit, "tiff:XResolution(px/cm)"
    if unit == 2:
        return 25400.0 / px_per_unit, "tiff:XResolution(px/inch)"
    return None, "unknown (TIFF ResolutionUnit is NONE)"


def _plausible(mpp: float | None, source: str) -> tuple[float | None, str]:
    if mpp is None:
        return None, source
    lo, hi = PLAUSIBLE_MPP_UM
    if not lo <= mpp <= hi:
        return None, f"unknown ({source} gives {mpp:.4g} µm/px, not a microscope scan resolution)"
    return mpp, source


def _check_dims(path: Path, height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise UnsupportedSlide(f"{path}: image has no pixels ({width}×{height} px)")
    if height > MAX_SIDE_PX or width > MAX_SIDE_PX:
        raise UnsupportedSlide(
            f"{path}: header claims {width}×{height} px, more than the {MAX_SIDE_PX} px a side of any scanner; "
            "the file is corrupt"
        )


def _check_segments(path: Path, series: tifffile.TiffPageSeries) -> None:
    """Refuse a slide whose tiles or strips are too large to decode one at a time (:data:`MAX_SEGMENT_BYTES`)."""
    for i, level in enumerate(series.levels):
        page = level.keyframe
        segment = tuple(int(n) for n in page.chunks)
        nbytes = int(np.prod(segment)) * np.dtype(page.dtype or np.uint8).itemsize
        if nbytes > MAX_SEGMENT_BYTES:
            kind = "tiles" if page.is_tiled else "strips"
            raise UnsupportedSlide(
                f"{path}: level {i} is stored in {kind} of {segment[1]}×{segment[0]} px "
                f"({nbytes / 2**20:.0f} MiB each decoded, over the {MAX_SEGMENT_BYTES // 2**20} MiB slidejob "
                "decodes at once); re-save it with small tiles, e.g. vips tiffsave IN OUT.tif --tile --pyramid"
            )


def _check_not_truncated(path: Path, page: tifffile.TiffPage, file_size: int) -> None:
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.size == 0:
        raise CorruptSlide(f"{path}: level 0 has no image data")
    end = int((offsets + counts).max())
    if end > file_size:
        raise CorruptSlide(
            f"{path}: truncated: level-0 image data runs to byte {end} but the file has {file_size} bytes; "
            "re-copy the file"
        )


def _completed(coro: Coroutine[Any, Any, Any]) -> Any:
    """The result of a coroutine that finishes without suspending, run in this thread.

    Raises :class:`_Suspended` if it suspends, or if it needs an event loop
    (``asyncio.to_thread`` and friends raise "no running event loop" here).
    """
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    except RuntimeError as exc:
        if "event loop" not in str(exc):
            raise
        raise _Suspended from None
    coro.close()
    raise _Suspended


class _Suspended(Exception):
    pass


class TiffChunkReader:
    """Reads boxes of one tifffile Zarr store (``aszarr``) chunk by chunk, in the calling thread.

    tifffile's store finds each tile's bytes, JPEG tables and padding, and
    decodes it; this class only asks it for the chunk keys a box covers and
    copies their overlap into the result.  Reading through ``zarr.Array``
    instead sends every chunk through zarr's single event-loop thread: on two
    cores that capped tiling at ~110 MP/s whatever the number of Dask threads,
    while the same tiles asked of the store from each thread decode in
    parallel at the rate of tifffile's own decoder.  A store made with
    ``maxworkers=1`` decodes inside ``get`` without awaiting anything, so the
    coroutine is run to completion here; a store that does await (one made
    with more workers, or a future tifffile) has that chunk go through zarr's
    event loop instead.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        array = zarr.open_array(store, mode="r")
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.chunks: tuple[int, ...] = tuple(array.chunks)
        self.dtype = np.dtype(array.dtype)
        self._fill = array.metadata.fill_value
        self._encode_key = array.metadata.encode_chunk_key
        self._prototype = default_buffer_prototype()

    def _chunk(self, index: tuple[int, ...]) -> npt.NDArray[Any] | None:
        key = self._encode_key(index)
        try:
            buffer = _completed(self._store.get(key, self._prototype))
        except _Suspended:
            from zarr.core.sync import sync  # zarr's own blocking bridge to its event loop

            buffer = sync(self._store.get(key, self._prototype))
        if buffer is None:
            return None
        return buffer.as_numpy_array().view(self.dtype).reshape(self.chunks)

    def read(self, box: tuple[int | slice, ...]) -> npt.NDArray[Any]:
        """The box ``box`` (an int or a step-1 slice per axis; ints drop their axis), like ``array[box]``."""
        return read_chunked(box, self.shape, self.chunks, self._chunk, dtype=self.dtype, fill_value=self._fill)


class SlideReader:
    """An open slide.  Not picklable on purpose: open one per process/thread.

    Parameters
    ----------
    path
        The slide file.
    mpp_um
        Explicit µm/px; overrides whatever the file says (source ``override``).
    """

    def __init__(self, path: str | os.PathLike[str], *, mpp_um: float | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideNotFound(f"{self.path}: no such file")
        file_size = self.path.stat().st_size
        if file_size == 0:
            raise UnsupportedSlide(f"{self.path}: file is empty (0 bytes)")
        try:
            self._tif = tifffile.TiffFile(self.path)
        except tifffile.TiffFileError as exc:
            raise UnsupportedSlide(f"{self.path}: not a TIFF-family slide ({exc})") from None
        except (OSError, ValueError, struct.error, IndexError, KeyError) as exc:
            raise CorruptSlide(f"{self.path}: cannot parse TIFF structure ({type(exc).__name__}: {exc})") from None
        try:
            self._init(file_size, mpp_um)
        except BaseException:
            self._tif.close()
            raise

    def _init(self, file_size: int, mpp_override: float | None) -> None:
        tif = self._tif
        if not tif.series:
            raise UnsupportedSlide(f"{self.path}: TIFF contains no image series")
        series = tif.series[0]
        self._series = series
        axes = series.axes
        shape = series.shape
        # Leading singleton dimensions (OME T/Z/C=1) are indexed away; anything
        # else that is not Y, X and samples is a stack we do not treat as a slide.
        squeeze = tuple(0 for a, n in zip(axes, shape) if a not in "YXSC" and n == 1)
        core_axes = "".join(a for a, n in zip(axes, shape) if not (a not in "YXSC" and n == 1))
        if core_axes not in ("YX", "YXS", "SYX", "CYX", "YXC"):
            raise UnsupportedSlide(
                f"{self.path}: image axes {axes} {shape} are not a 2-D RGB slide "
                "(z-stacks and time series are not supported)"
            )
        self._prefix = squeeze
        self._channels_first = core_axes in ("SYX", "CYX")
        ny = shape[axes.index("Y")]
        nx = shape[axes.index("X")]
        _check_dims(self.path, ny, nx)
        samples = 1 if core_axes == "YX" else shape[axes.index(core_axes[0] if self._channels_first else core_axes[2])]
        dtype = np.dtype(series.dtype)
        page0 = series.keyframe
        # Why this is a fluorescence scan, if it is one.
        fluorescence_why = None
        if tif.is_ndpi and "Fluorescence" in (page0.ndpi_tags or {}):
            fluorescence_why = "NDPI Fluorescence tag"
        elif tif.is_ome:
            fluorescence_why = _ome_fluorescence(tif.ome_metadata or "")
        fluorescence = fluorescence_why is not None
        if dtype != np.uint8:
            raise UnsupportedSlide(
                f"{self.path}: pixel type {dtype} with {samples} channel(s); slidejob segments 8-bit RGB "
                "brightfield (H&E) slides — convert to 8-bit RGB first"
            )
        if samples == 3:
            conversion = "none"
        elif samples == 4 and "C" not in core_axes:  # separate OME channels ("C") are never alpha
            conversion = "rgba->rgb (alpha dropped)"
        elif samples == 1:
            raise UnsupportedSlide(
                f"{self.path}: grayscale image (1 channel); slidejob segments RGB brightfield (H&E) slides"
            )
        else:
            raise UnsupportedSlide(
                f"{self.path}: {samples}-channel image (multiplexed fluorescence?); slidejob segments "
                "3-channel RGB brightfield (H&E) slides"
            )
        _check_not_truncated(self.path, page0, file_size)
        _check_segments(self.path, series)

        levels = []
        for i, lv in enumerate(series.levels):
            h = lv.shape[axes.index("Y")]
            w = lv.shape[axes.index("X")]
            levels.append(LevelInfo(index=i, height_px=int(h), width_px=int(w), downsample=float(nx / w)))

        vendor, mpp, mpp_source, objective = self._metadata(page0)
        mpp, mpp_source = _plausible(mpp, mpp_source)
        if mpp_override is not None:
            if not mpp_override > 0:
                raise ValueError(f"mpp_um override must be > 0, got {mpp_override}")
            mpp, mpp_source = float(mpp_override), "override"
        if fluorescence:
            logger.warning("%s: fluorescence scan (%s); the H&E model's answers on it are meaningless",
                           self.path, fluorescence_why)
        self.info = SlideInfo(
            path=str(self.path.resolve()),
            vendor=vendor,
            height_px=int(ny),
            width_px=int(nx),
            levels=tuple(levels),
            mpp_um=mpp,
            mpp_source=mpp_source,
            objective_power=objective,
            file_size_bytes=file_size,
            fingerprint=fingerprint_file(self.path),
            source_samples=int(samples),
            conversion=conversion,
            fluorescence=fluorescence,
        )
        self._stores: dict[int, TiffChunkReader] = {}

    def _metadata(self, page0: tifffile.TiffPage) -> tuple[str, float | None, str, float | None]:
        tif = self._tif
        if tif.is_svs:
            fields = _aperio_fields(page0.description or "")
            objective = float(fields["AppMag"]) if "AppMag" in fields else None
            if "MPP" in fields:
                return "aperio", float(fields["MPP"]), "aperio:MPP", objective
            return "aperio", None, "unknown (Aperio description has no MPP)", objective
        if tif.is_ndpi:
            mpp, source = _tiff_resolution_mpp(page0)
            mag = (page0.ndpi_tags or {}).get("Magnification")
            return "hamamatsu", mpp, source.replace("tiff:", "ndpi:"), float(mag) if mag else None
        if tif.is_ome:
            xml = tif.ome_metadata or ""
            mpp, source = _ome_mpp(xml)
            m = re.search(r'NominalMagnification="([0-9.]+)"', xml)
            return "ome", mpp, source, float(m.group(1)) if m else None
        mpp, source = _tiff_resolution_mpp(page0)
        return "tiff", mpp, source, None

    # -- pixels -------------------------------------------------------------------------------------------

    def level_store(self, level: int = 0) -> TiffChunkReader:
        """Chunk-wise reader of one level's tifffile Zarr view, in the file's own axis order."""
        if level not in self._stores:
            self._stores[level] = TiffChunkReader(self._series.aszarr(level=level, maxworkers=1))
        return self._stores[level]

    def tile_shape_px(self, level: int = 0) -> tuple[int, int]:
        """Height and width of a level's stored tiles (a strip-organised level: rows per strip, full width)."""
        chunks = self.level_store(level).chunks
        return (chunks[-2], chunks[-1]) if self._channels_first else (chunks[-3], chunks[-2])

    def read_region(self, y0: int, x0: int, height: int, width: int, *, level: int = 0) -> npt.NDArray[np.uint8]:
        """Read an RGB region ``(height, width, 3)`` of a level, clipped to the level's bounds.

        Only the tiles overlapping the region are decoded, in the calling thread.
        """
        lv = self.info.levels[level]
        y1 = min(y0 + height, lv.height_px)
        x1 = min(x0 + width, lv.width_px)
        if y0 < 0 or x0 < 0 or y1 <= y0 or x1 <= x0:
            raise ValueError(f"region y={y0}:{y0 + height} x={x0}:{x0 + width} is outside level {level}")
        store = self.level_store(level)
        try:
            if self._channels_first:
                box = self._prefix + (slice(None), slice(y0, y1), slice(x0, x1))
                data = np.moveaxis(store.read(box), 0, -1)
            else:
                data = store.read(self._prefix + (slice(y0, y1), slice(x0, x1), slice(None)))
        except Exception as exc:  # noqa: BLE001 - decoder errors come in many types (imagecodecs, zlib, OSError)
            raise CorruptSlide(
                f"{self.path}: cannot decode level {level} region y={y0}:{y1} x={x0}:{x1} "
                f"({type(exc).__name__}: {exc})"
            ) from None
        if data.shape[-1] != 3:
            data = data[..., :3]
        return np.ascontiguousarray(data)

    def close(self) -> None:
        self._stores.clear()
        self._tif.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_slide(path: str | os.PathLike[str], *, mpp_um: float | None = None) -> SlideReader:
    """Open a slide for reading (see :class:`SlideReader`)."""
    return SlideReader(path, mpp_um=mpp_um)


_local = threading.local()
_CACHE_SIZE = 4


def cached_reader(path: str, mpp_um: float | None = None) -> SlideReader:
    """A reader kept open for reuse by tasks on this thread.

    Dask tasks cannot carry an open file, and re-parsing a slide's IFDs for
    every block would cost more than decoding it; tifffile file handles are
    not safe to share between threads, so each thread keeps its own few.
    """
    cache: OrderedDict[tuple[str, float | None, int, int], SlideReader] = getattr(_local, "cache", None) or OrderedDict()
    _local.cache = cache
    st = os.stat(path)
    key = (path, mpp_um, st.st_size, st.st_mtime_ns)
    reader = cache.get(key)
    if reader is None:
        reader = SlideReader(path, mpp_um=mpp_um)
        cache[key] = reader
        while len(cache) > _CACHE_SIZE:
            _, old = cache.popitem(last=False)
            old.close()
    cache.move_to_end(key)
    return reader


def _slide_files_under(directory: Path) -> Iterator[Path]:
    """Slide files under ``directory``, following symlinked folders (each real folder walked once)."""
    seen: set[str] = set()

    def unreadable(exc: OSError) -> None:  # os.walk would skip the folder without a word
        logger.warning("%s: cannot list this folder (%s); slides in it are not processed", exc.filename, exc.strerror)

    for root, dirs, files in os.walk(directory, followlinks=True, onerror=unreadable):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        for name in files:
            if name.lower().endswith(SLIDE_SUFFIXES) and os.path.isfile(os.path.join(root, name)):
                yield Path(root) / name


def find_slides(inputs: list[Path]) -> list[Path]:
    """Expand files and directories (recursively, by :data:`SLIDE_SUFFIXES`) into a sorted list of slides.

    A file is taken as given (a missing one fails as its slide, the others go on).  A directory
    without slide files is logged.  When no input exists or holds a slide file the inputs were
    wrong (a mistyped or empty folder), and a :class:`SlideNotFound` says so, rather than a batch
    of nothing that looks like success or of one "slide" that is a typo.
    """
    found: list[Path] = []
    empty: list[Path] = []
    for p in inputs:
        if p.is_dir():
            inside = sorted(_slide_files_under(p))
            if not inside:
                empty.append(p)
                logger.warning("%s: no slide files in this directory (%s, recursively)", p, " ".join(SLIDE_SUFFIXES))
            found.extend(inside)
        else:
            found.append(p)
    if inputs and not any(p.exists() for p in found):
        # What was found is then only given files, none of which exists.
        reasons = [f"{', '.join(map(str, found))}: no such file or directory"] if found else []
        if empty:
            reasons.append(f"{', '.join(map(str, empty))}: no slide files found "
                           f"(looked for {' '.join(SLIDE_SUFFIXES)}, recursively)")
        raise SlideNotFound("; ".join(reasons))
    seen: set[Path] = set()
    unique = []
    for p in found:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(p)
    return unique
