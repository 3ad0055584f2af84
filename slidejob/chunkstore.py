"""The 512×512 Zarr v3 chunk store of a slide, and atomic output directories.

Layout of ``OUT.zarr`` (a Zarr v3 group)::

    OUT.zarr/
      zarr.json            group attributes under "slidejob": slide metadata,
                           tissue grid, parameters, "complete": true
      0/                   level 0, (H, W, 3) uint8, chunks (512, 512, 3), by default
                           in shards of one tiling task's block (4 × 4 chunks, one file);
                           background chunks are absent (read as fill 255, glass)
      tissue_fraction/     (ceil(H/512), ceil(W/512)) float32 per-chunk tissue fraction

Every store is built under a hidden temporary name beside its destination and
renamed into place only when complete, so an interrupted run never leaves
something that looks finished.  Chunk writes are idempotent: a task writes
only its own chunks (its own shard), so a retried task rewrites the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import numpy.typing as npt
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from slidejob.chunked import read_chunked
from slidejob.errors import OutputExists

logger = logging.getLogger(__name__)

CHUNK_PX = 512
LEVEL0 = "0"
TISSUE_FRACTION = "tissue_fraction"
#: Absent chunks read as white, i.e. glass, so a viewer shows background as a slide would.
IMAGE_FILL = 255
#: The sharding index's offset and size of an absent chunk.
_ABSENT = 2**64 - 1


def image_codecs() -> list[Any]:
    """Compression for RGB tiles.

    Blosc-LZ4 compresses at several GB/s, so writing stays well ahead of JPEG
    decoding (the tiling stage's real cost); zstd shrinks H&E further but
    costs more CPU than decode itself.  Shuffle is useless on interleaved uint8.
    Level 1, because Blosc picks smaller blocks for it, which stay in cache:
    on 512² chunks of real H&E (CMU-1) it encodes in 0.17 ms against level 5's
    0.30 and decodes in 0.15 against 0.18, at the same size (1.74× against
    1.76×); on noise-like texture both take ~0.8 ms.
    """
    return [BloscCodec(cname="lz4", clevel=1, shuffle=BloscShuffle.noshuffle)]


#: This host's name as it goes into temporary names (no path separators).
_HOST = socket.gethostname().replace(os.sep, "_") or "localhost"
#: ``.<final name>.tmp-<host>-<pid>-<8 hex>`` (being built) or ``.<final name>.old-<host>-<pid>-<8 hex>``
#: (replaced, being removed): see :func:`tmp_name` and :func:`remove_stale_temporaries`.
_TEMPORARY = re.compile(r"^\.(?P<final>.+)\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def tmp_name(final: Path, kind: str = "tmp") -> Path:
    """A hidden name beside ``final`` to build it under (``kind`` "tmp") or move it aside to ("old").

    It names this host and process, so that a later run can tell what a killed
    run left behind (:func:`remove_stale_temporaries`) from what a live one is
    still writing.
    """
    return final.with_name(f".{final.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_file_atomic(path: Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to ``path`` under :func:`tmp_name`, then rename into place.

    Every output file goes through here (manifest, exports, PNGs), so that a
    reader sees the old file or the new one, never half of one, and a killed
    run's leftovers carry the names :func:`remove_stale_temporaries` knows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: no half-written temporary left beside the output
        raise


#: A run touches each temporary directory it is building this often, so that a run on another host
#: (which cannot ask whether the process is alive) can tell a live build from a killed one's leftovers.
HEARTBEAT_S = 60.0
#: Another host's temporary untouched for this long is a killed run's (15 heartbeats: room for clock
#: skew and a shared file system's attribute caching).
STALE_AFTER_S = 15 * 60.0
_LIVE: set[Path] = set()
_LIVE_LOCK = threading.Lock()
_HEARTBEAT: threading.Thread | None = None


def _keep_alive(path: Path) -> None:
    """Touch ``path`` every :data:`HEARTBEAT_S` until :func:`_let_go` (a daemon thread does it)."""
    global _HEARTBEAT
    with _LIVE_LOCK:
        _LIVE.add(path)
        if _HEARTBEAT is None or not _HEARTBEAT.is_alive():
            _HEARTBEAT = threading.Thread(target=_heartbeat_loop, name="slidejob-temporaries", daemon=True)
            _HEARTBEAT.start()


def _let_go(path: Path) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(path)


def touch_live_temporaries() -> None:
    """Set the modification time of every temporary this process is building to now."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for path in live:
        with contextlib.suppress(OSError):  # renamed into place or removed meanwhile
            os.utime(path)


def _heartbeat_loop() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        touch_live_temporaries()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(directory: Path, final_name: str | None = None) -> list[Path]:
    """Remove the temporaries in ``directory`` (those of ``final_name`` only, if given) whose process is gone.

    A run killed mid-write (``kill -9``, a node lost) leaves its half-built
    outputs under hidden temporary names; nothing mistakes them for results,
    but they hold disk (a slide's tile store: gigabytes).  On this host, those
    of a process that no longer exists are removed.  Another host's cannot be
    asked about: they are removed when untouched for :data:`STALE_AFTER_S`,
    since a live run touches what it builds every :data:`HEARTBEAT_S` (a batch
    killed on one SLURM node and rerun on another).  A live process on this
    host with a leftover that old holds a reused pid: removed too.  This
    process's own are never removed.  Returns what was removed.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if not m or (final_name is not None and m["final"] != final_name):
            continue
        pid, here = int(m["pid"]), m["host"] == _HOST
        if here and pid == os.getpid():
            continue
        known_dead = here and not _process_alive(pid)
        if not known_dead:  # another host's, or a pid that lives (reused?): judged by its heartbeat
            try:
                untouched_s = time.time() - entry.lstat().st_mtime
            except FileNotFoundError:
                continue
            if untouched_s < STALE_AFTER_S:
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        logger.info("removed %s, left by a run that is gone", entry)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_directory(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` when the block exits cleanly.

    On error the temporary directory is removed and ``final`` is untouched.
    With ``overwrite`` an existing ``final`` is replaced (moved aside, then
    removed after the new one is in place).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputExists(f"{final}: already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    tmp = tmp_name(final)
    tmp.mkdir()
    _keep_alive(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _let_go(tmp)
    old = None
    if final.exists():
        old = tmp_name(final, "old")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def create_image_store(
    path: Path,
    *,
    height_px: int,
    width_px: int,
    attributes: dict[str, Any],
    tissue_fraction: npt.NDArray[np.float32],
    shard_chunks: int = 1,
) -> zarr.Group:
    """Create the group, the empty level-0 array and the tissue-fraction array.

    With ``shard_chunks`` > 1 level 0 is sharded: each file holds a shard of
    ``shard_chunks``² chunks (zarr's ``sharding_indexed`` codec), which stay
    512×512×3 and separately compressed, so a reader still fetches one chunk
    at a time.  One file per tiling task instead of one per chunk: a 100k²
    slide's store is ~2,400 files instead of ~38,000 (a parallel file system
    pays per file), and creating one file for 16 chunks costs the kernel far
    less than 16 (bench/bench_tile.py: tiling ran 1.5× faster on this VM).
    """
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.attrs["slidejob"] = attributes
    root.create_array(
        LEVEL0,
        shape=(height_px, width_px, 3),
        chunks=(CHUNK_PX, CHUNK_PX, 3),
        shards=(shard_chunks * CHUNK_PX, shard_chunks * CHUNK_PX, 3) if shard_chunks > 1 else None,
        dtype="uint8",
        fill_value=IMAGE_FILL,
        compressors=image_codecs(),
        dimension_names=("y", "x", "c"),
        config={"write_empty_chunks": False},
        # Keys "c.row.col.0" side by side: with "/" every chunk of an (H, W, 3) array gets a
        # directory of its own ("c/row/col/0"), an mkdir per chunk when written and an rmdir
        # when the store goes (a parallel file system's slowest operations).
        chunk_key_encoding={"name": "default", "separator": "."},
    )
    tf = root.create_array(
        TISSUE_FRACTION, shape=tissue_fraction.shape, chunks=tissue_fraction.shape or (1,), dtype="float32"
    )
    tf[...] = tissue_fraction
    return root


def _key_separator(meta: dict[str, Any]) -> str:
    """The separator of an array's zarr v3 "default" chunk keys ("/" unless its zarr.json says ".")."""
    return str(meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/"))


class ChunkWriter:
    """Writes (and reads back) whole 512×512 chunks of one array, each chunk's bytes encoded by the array's own codecs.

    ``zarr.Array.__setitem__`` costs ~2 ms of bookkeeping per chunk, as much
    as decoding the JPEG tiles the chunk came from, so tiling through it runs
    at half the decode limit.  For the layouts slidejob writes (regular grid,
    default chunk keys, ``bytes`` + ``blosc`` codecs, optionally inside
    zarr's ``sharding_indexed`` codec with its default index: little-endian
    offsets and sizes, crc32c, at the end) this writer encodes each chunk with
    the same numcodecs Blosc compressor zarr uses and writes it to its key (or
    its shard) directly; any other layout goes through ``zarr.Array``.  The
    result is read back through zarr in the tests.

    In a sharded array ``chunks`` is the inner (read) chunk shape and
    :attr:`shard_shape` the shape each file holds.
    """

    #: With ``skip_incompressible``, a chunk is stored uncompressed (Blosc's own memcpy frame, which
    #: every Blosc reader decodes) when compressing a sample of it saves less than this fraction.
    MIN_SAVING = 0.1

    def __init__(self, array_path: Path, *, skip_incompressible: bool = False) -> None:
        self.array_path = Path(array_path)
        meta = json.loads((self.array_path / "zarr.json").read_text())
        self.shape = tuple(meta["shape"])
        grid_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.fill_value = meta["fill_value"]
        self.dtype = np.dtype(meta["data_type"])
        codecs = meta["codecs"]
        key = meta["chunk_key_encoding"]
        self._separator = _key_separator(meta)
        #: The shape one file holds, in a sharded array; None where each chunk is a file of its own.
        self.shard_shape: tuple[int, ...] | None = None
        plain_index = True
        if [c["name"] for c in codecs] == ["sharding_indexed"]:
            sharding = codecs[0]["configuration"]
            self.shard_shape = grid_shape
            self.chunks = tuple(sharding["chunk_shape"])
            codecs = sharding["codecs"]
            plain_index = _plain_shard_index(sharding)
        else:
            self.chunks = grid_shape
        #: Chunks per shard along each axis (all ones without sharding).
        self._per_shard = tuple(s // c for s, c in zip(self.shard_shape or self.chunks, self.chunks))
        self._blosc: numcodecs.Blosc | None = None
        if (
            [c["name"] for c in codecs] == ["bytes", "blosc"]
            and key["name"] == "default"
            and self._separator in ("/", ".")
            and self.dtype.itemsize == 1
            and plain_index
        ):
            cfg = codecs[1]["configuration"]
            shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                       "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[cfg["shuffle"]]
            self._blosc = numcodecs.Blosc(cname=cfg["cname"], clevel=cfg["clevel"], shuffle=shuffle,
                                          blocksize=cfg.get("blocksize", 0))
        self._raw: numcodecs.Blosc | None = None
        if skip_incompressible and self._blosc is not None:
            self._raw = numcodecs.Blosc(cname=self._blosc.cname, clevel=0, shuffle=numcodecs.Blosc.NOSHUFFLE)
        self._array: zarr.Array | None = None

    def _key_path(self, key_index: tuple[int, ...]) -> Path:
        # zarr v3 "default" keys: "c" and the grid coordinates (of a chunk, or of a shard), joined by the separator.
        if self._separator == "/":
            return self.array_path.joinpath("c", *map(str, key_index))
        return self.array_path / self._separator.join(["c", *map(str, key_index)])

    def _shard_of(self, index: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(i // n for i, n in zip(index, self._per_shard))

    def write(self, index: tuple[int, ...], data: npt.NDArray[Any]) -> None:
        """Write chunk ``index`` (grid coordinates); ``data`` may be smaller than a chunk at the array's edge.

        In a sharded array this rewrites the chunk's shard through zarr: write
        whole shards with :meth:`write_shard` instead.
        """
        if self._blosc is None or self.shard_shape is not None:
            sel = tuple(slice(i * c, i * c + n) for i, c, n in zip(index, self.chunks, data.shape))
            self._zarr_array()[sel] = data
            return
        self._write_file(self._key_path(index), [self._encode(data)])

    def write_shard(self, chunks: Iterable[tuple[tuple[int, ...], npt.NDArray[Any]]]) -> None:
        """Write ``(index, data)`` chunks that make up one shard: its other chunks become absent.

        Each chunk is encoded as it comes and the shard's file is written once,
        with its index, when the last has come: the file's bytes are a function
        of the chunks alone, so a retried task rewrites the same file.  Without
        sharding each chunk is written to its own file as it comes.
        """
        if self.shard_shape is None:
            for index, data in chunks:
                self.write(index, data)
            return
        if self._blosc is None:  # a layout of someone else's: the shard's box, assembled, through zarr
            shard: tuple[int, ...] | None = None
            full: npt.NDArray[Any] | None = None
            for index, data in chunks:
                shard = self._same_shard(shard, index)
                if full is None:
                    full = np.full(self.shard_shape, self.fill_value, dtype=self.dtype)
                local = tuple(slice((i % n) * c, (i % n) * c + d) for i, n, c, d in
                              zip(index, self._per_shard, self.chunks, data.shape))
                full[local] = data
            if shard is not None and full is not None:
                origin = [s * n for s, n in zip(shard, self.shard_shape)]
                sel = tuple(slice(o, min(o + n, size)) for o, n, size in zip(origin, self.shard_shape, self.shape))
                self._zarr_array()[sel] = full[tuple(slice(0, s.stop - s.start) for s in sel)]
            return
        # The sharding codec's index: (offset, size) per chunk in C order, 2^64-1 for an absent chunk,
        # little-endian, then its crc32c; at the end of the file.
        offsets = np.full((*self._per_shard, 2), _ABSENT, dtype="<u8")
        parts: list[bytes] = []
        shard = None
        position = 0
        for index, data in chunks:
            shard = self._same_shard(shard, index)
            encoded = self._encode(data)
            offsets[tuple(i % n for i, n in zip(index, self._per_shard))] = (position, len(encoded))
            parts.append(encoded)
            position += len(encoded)
        if shard is None:
            return
        index_bytes = offsets.tobytes()
        parts += [index_bytes, np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()]
        self._write_file(self._key_path(shard), parts)

    def _same_shard(self, shard: tuple[int, ...] | None, index: tuple[int, ...]) -> tuple[int, ...]:
        """``index``'s shard, which must be ``shard`` when that is not None."""
        own = self._shard_of(index)
        if shard is not None and own != shard:
            raise ValueError(f"{self.array_path}: chunk {index} is not in shard {shard}")
        return own

    def _encode(self, data: npt.NDArray[Any]) -> bytes:
        assert self._blosc is not None
        if data.shape != self.chunks:
            full = np.full(self.chunks, self.fill_value, dtype=self.dtype)
            full[tuple(slice(0, n) for n in data.shape)] = data
            data = full
        data = np.ascontiguousarray(data, dtype=self.dtype)
        codec = self._raw if self._raw is not None and not self._worth_compressing(data) else self._blosc
        return bytes(codec.encode(data))

    @staticmethod
    def _write_file(path: Path, parts: list[bytes]) -> None:
        try:
            f = open(path, "wb")  # noqa: SIM115 - opened in one of two places, closed below
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "wb")  # noqa: SIM115
        with f:
            f.writelines(parts)

    def _worth_compressing(self, data: npt.NDArray[Any]) -> bool:
        """Whether the compressor saves at least :attr:`MIN_SAVING` on four 16 KB samples of ``data``.

        Decoded JPEG of busy texture hardly compresses with LZ4 (1.06-1.08×) yet took ~0.9 ms a
        512² chunk to try, ~40 % of decoding it; the samples take ~0.1 ms.  Real H&E compresses
        1.3-2.4× and keeps being compressed.
        """
        assert self._blosc is not None
        flat = data.reshape(-1).view(np.uint8)
        part = 16384
        if flat.size < 8 * part:
            return True
        step = flat.size // 4
        sample = np.concatenate([flat[i * step : i * step + part] for i in range(4)])
        return len(self._blosc.encode(sample)) <= (1 - self.MIN_SAVING) * sample.nbytes

    def read(self, index: tuple[int, ...]) -> npt.NDArray[Any]:
        """Chunk ``index`` as a writable array, cut at the array's edge; the fill value where it is absent.

        The read-side twin of :meth:`write`, for code that rewrites a few chunks
        (zarr's per-read bookkeeping is ~1.5 ms a chunk, the decode a fraction of that).
        """
        return self.read_box(tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, self.chunks)))

    def read_box(self, box: tuple[slice, ...]) -> npt.NDArray[Any]:
        """``array[box]`` (step-1 slices) as a new, writable array, read chunk by chunk past zarr.

        Inference tasks read their block plus its halo this way: through
        ``zarr.Array`` every chunk of every task also queues for zarr's one
        event-loop thread.
        """
        if self._blosc is None:
            return np.array(self._zarr_array()[box])
        if self.shard_shape is None:
            return read_chunked(box, self.shape, self.chunks, self._stored, dtype=self.dtype,
                                fill_value=self.fill_value)
        # Each shard the box touches is opened once and its index read once (an inference block and
        # its halo: 9 shards, 36 chunks); a parallel file system pays for every open.
        with contextlib.ExitStack() as files:
            shards: dict[tuple[int, ...], tuple[Any, npt.NDArray[np.uint64]] | None] = {}

            def read_chunk(index: tuple[int, ...]) -> npt.NDArray[Any] | None:
                return self._stored_in_shard(index, shards, files)

            return read_chunked(box, self.shape, self.chunks, read_chunk, dtype=self.dtype,
                                fill_value=self.fill_value)

    def _decode(self, encoded: bytes) -> npt.NDArray[Any]:
        assert self._blosc is not None
        return np.frombuffer(self._blosc.decode(encoded), dtype=self.dtype).reshape(self.chunks)

    def _stored(self, index: tuple[int, ...]) -> npt.NDArray[Any] | None:
        """The whole stored chunk ``index`` (read-only), or None where it is absent."""
        try:
            encoded = self._key_path(index).read_bytes()
        except FileNotFoundError:
            return None
        return self._decode(encoded)

    def _stored_in_shard(
        self,
        index: tuple[int, ...],
        shards: dict[tuple[int, ...], tuple[Any, npt.NDArray[np.uint64]] | None],
        files: contextlib.ExitStack,
    ) -> npt.NDArray[Any] | None:
        """Chunk ``index`` from its shard (read-only), or None where it is absent.

        ``shards`` keeps each shard's open file and index (None: absent), ``files`` closes the files.
        """
        shard = self._shard_of(index)
        if shard not in shards:
            try:
                f = files.enter_context(open(self._key_path(shard), "rb"))  # noqa: SIM115 - the stack closes it
            except FileNotFoundError:
                shards[shard] = None
            else:
                shards[shard] = (f, self._shard_index(f))
        opened = shards[shard]
        if opened is None:
            return None
        f, offsets = opened
        offset, nbytes = (int(v) for v in offsets[tuple(i % n for i, n in zip(index, self._per_shard))])
        if offset == _ABSENT:
            return None
        f.seek(offset)
        encoded = f.read(nbytes)
        if len(encoded) != nbytes:
            raise ValueError(f"{f.name}: shard is shorter than its index says")
        return self._decode(encoded)

    def _shard_index(self, f: Any) -> npt.NDArray[np.uint64]:
        """The (offset, size) per chunk of the shard open as ``f``, checked against its crc32c."""
        size = int(np.prod(self._per_shard)) * 16 + 4
        f.seek(0, os.SEEK_END)
        if f.tell() < size:
            raise ValueError(f"{f.name}: shard is shorter than its index")
        f.seek(-size, os.SEEK_END)
        raw = f.read(size)
        if np.frombuffer(raw[-4:], "<u4")[0] != google_crc32c.value(raw[:-4]):
            raise ValueError(f"{f.name}: shard index fails its crc32c check")
        return np.frombuffer(raw[:-4], "<u8").reshape(*self._per_shard, 2)

    def stored_indices(self) -> set[tuple[int, ...]]:
        """The grid indices of the chunks present in the array."""
        ndim = len(self.shape)
        # Each key's grid coordinates: "c.<row>.<col>[.0]" or "c/<row>/<col>[/0]".
        if self._separator == ".":
            keys = [p.name.split(".")[1:] for p in self.array_path.glob("c." + ".".join(["*"] * ndim))]
        else:
            chunk_dir = self.array_path / "c"
            keys = [list(p.relative_to(chunk_dir).parts) for p in chunk_dir.glob("/".join(["*"] * ndim))]
        key_indices = [tuple(int(k) for k in key) for key in keys]
        if self.shard_shape is None:
            return set(key_indices)
        if self._blosc is None:
            raise ValueError(f"{self.array_path}: a shard layout slidejob does not read")
        present: set[tuple[int, ...]] = set()
        for shard in key_indices:
            try:
                with open(self._key_path(shard), "rb") as f:
                    offsets = self._shard_index(f)
            except FileNotFoundError:  # removed since listed
                continue
            for local in zip(*np.nonzero(offsets[..., 0] != _ABSENT)):
                present.add(tuple(s * n + int(i) for s, n, i in zip(shard, self._per_shard, local)))
        return present

    def _zarr_array(self) -> zarr.Array:
        if self._array is None:
            self._array = zarr.open_array(self.array_path, mode="r+")
        return self._array

    def delete(self, index: tuple[int, ...]) -> None:
        """Remove chunk ``index`` (it then reads as the fill value); absent already is fine."""
        if self._blosc is None or self.shard_shape is not None:
            sel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, self.chunks))
            self._zarr_array()[sel] = self.fill_value
            return
        self._key_path(index).unlink(missing_ok=True)


def write_chunks(
    path: Path,
    y0: int,
    x0: int,
    height_px: int,
    width_px: int,
    background: npt.NDArray[np.bool_],
    read_region: Callable[[int, int, int, int], npt.NDArray[np.uint8]],
) -> int:
    """Write the chunks of level 0 in the box at ``(y0, x0)``, each read with ``read_region(y, x, height, width)``.

    Chunks flagged in ``background`` (the box's chunk grid) are neither read
    nor written: they stay absent.  In a sharded store the box is one whole
    shard.  One chunk at a time: given a slide reader's ``read_region``, each
    chunk's source tiles are copied straight into its own contiguous buffer
    and compressed while still in cache (cutting chunks out of a whole 2048²
    box, 12.6 MB, copied every pixel once more);
    ``read_region`` may also cut from a box read once (see
    :func:`slidejob.pipeline._tile_block` for when).  Returns the bytes of pixels written.
    """
    # The store is the pipeline's intermediate: chunks that do not compress are not worth the time.
    writer = ChunkWriter(Path(path) / LEVEL0, skip_incompressible=True)
    cy0, cx0 = y0 // CHUNK_PX, x0 // CHUNK_PX
    written = 0

    def chunks() -> Iterator[tuple[tuple[int, int, int], npt.NDArray[np.uint8]]]:
        nonlocal written
        for cy in range(background.shape[0]):
            for cx in range(background.shape[1]):
                h = min(CHUNK_PX, height_px - cy * CHUNK_PX)
                w = min(CHUNK_PX, width_px - cx * CHUNK_PX)
                if background[cy, cx] or h <= 0 or w <= 0:
                    continue
                chunk = read_region(y0 + cy * CHUNK_PX, x0 + cx * CHUNK_PX, h, w)
                written += chunk.nbytes
                yield (cy0 + cy, cx0 + cx, 0), chunk

    writer.write_shard(chunks())
    return written


def read_attributes(path: Path) -> dict[str, Any]:
    """The ``slidejob`` attributes of a store (raises if it is not a slidejob store)."""
    root = zarr.open_group(path, mode="r")
    attrs = root.attrs.get("slidejob")
    if not isinstance(attrs, dict):
        # The store's content is wrong, not an argument's type: ValueError, as for any bad input file.
        raise ValueError(f"{path}: not a slidejob store (no 'slidejob' attributes)")  # noqa: TRY004
    return dict(attrs)


def stored_chunks(path: Path, array: str = LEVEL0) -> set[tuple[int, int]]:
    """The (row, col) indices of the chunks present in an array (trailing chunk indices, e.g. RGB's 0, dropped)."""
    return {(c[0], c[1]) for c in ChunkWriter(Path(path) / array).stored_indices()}


def _plain_shard_index(sharding: dict[str, Any]) -> bool:
    """Whether a ``sharding_indexed`` configuration has zarr's default index, the one :class:`ChunkWriter` reads."""
    index_codecs = sharding.get("index_codecs", [{"name": "bytes"}, {"name": "crc32c"}])
    return (
        sharding.get("index_location", "end") == "end"
        and [c["name"] for c in index_codecs] == ["bytes", "crc32c"]
        and index_codecs[0].get("configuration", {}).get("endian", "little") == "little"
    )
