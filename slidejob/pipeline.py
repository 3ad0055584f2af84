"""Orchestration: the one module that builds Dask graphs and owns the Dask client.

Stages are plain functions that take explicit keywords and return small
result objects.  Graphs are computed with :func:`compute_settled` (dask.compute,
settling the other tasks before an error is raised), which runs on the active
``distributed`` client when there is one (a LocalCluster, a scheduler address,
SLURM workers) and on the local threaded scheduler otherwise; the caller
decides where work runs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import logging
import os
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import numpy.typing as npt
import zarr
from dask.system import CPU_COUNT

from slidejob import (
    __version__,
    chunkstore,
    config,
    export,
    geometry,
    infer,
    maskstore,
    stats,
    summarydb,
    tissue,
    wsi,
)
from slidejob.chunkstore import CHUNK_PX
from slidejob.errors import STORAGE_FULL_ERRNOS, OutputExists, OutputStorageFull, UnsupportedSlide
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
    tile_h, tile_w = reader.tile_shape_px(0)
    if CHUNK_PX % tile_h == 0 and CHUNK_PX % tile_w == 0:
        # Each source tile lies in one chunk (256² tiles, say): read chunk by chunk, no tile decoded twice.
        return chunkstore.write_chunks(Path(store), y0, x0, height, width, background, reader.read_region)
    # Tiles across chunk borders (Aperio's 240², 1024² OME-TIFF tiles, strips): chunk-by-chunk reads
    # would decode each such tile once per chunk it touches (~2x for 240², 4x for 1024²), so the
    # block is read once and its chunks cut from it.
    block = reader.read_region(y0, x0, height, width)

    def cut(y: int, x: int, h: int, w: int) -> npt.NDArray[np.uint8]:
        return block[y - y0 : y - y0 + h, x - x0 : x - x0 + w]

    return chunkstore.write_chunks(Path(store), y0, x0, height, width, background, cut)


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
    shards: bool | None = None,
    overwrite: bool = False,
    tissue_result: TissueResult | None = None,
    context_chunks: int = 0,
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
    shards
        Store each task's block of chunks as one shard file (see
        :func:`slidejob.chunkstore.create_image_store`); the chunks stay 512².
    overwrite
        Replace an existing store.
    tissue_result
        A tissue detection already done for this slide (skips redoing it).
    context_chunks
        Also write the chunks within this many chunks of tissue: the inference
        halo reads them, and glass read as the store's pure-white fill value
        instead of the slide's own glass would put an edge into the model's view.
    """
    t0 = time.perf_counter()
    block_chunks = int(config.get("tile.block-chunks", block_chunks))
    shards = bool(config.get("tile.shards", shards))
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
        "parameters": {"block_chunks": block_chunks, "shards": shards, "all_tissue": all_tissue},
    }
    with chunkstore.atomic_directory(out, overwrite=overwrite) as tmp:
        chunkstore.create_image_store(
            tmp, height_px=info.height_px, width_px=info.width_px, attributes=attrs, tissue_fraction=tr.fraction,
            shard_chunks=block_chunks if shards else 1,  # a task writes one whole shard: its block
        )
        grid = tr.grid
        if context_chunks:
            from scipy import ndimage

            grid = ndimage.binary_dilation(grid, structure=np.ones((3, 3), bool), iterations=context_chunks)
        tasks = []
        for by, bx, sub in block_slices(grid, block_chunks):
            y0, x0 = by * CHUNK_PX, bx * CHUNK_PX
            height = min(sub.shape[0] * CHUNK_PX, info.height_px - y0)
            width = min(sub.shape[1] * CHUNK_PX, info.width_px - x0)
            tasks.append(
                dask.delayed(_tile_block, pure=False)(str(path), mpp_um, str(tmp), y0, x0, height, width, ~sub)
            )
        logger.info("%s: tiling %d chunks (%d with tissue) in %d tasks", path.name, int(grid.sum()),
                    tr.n_tissue_chunks, len(tasks))
        compute_settled(*tasks)
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


# --------------------------------------------------------------------------------------------------------
# The Dask client
# --------------------------------------------------------------------------------------------------------


def cuda_device_count() -> int:
    """CUDA devices torch can use in this process; 0 on a Linux machine without an NVIDIA driver.

    There the answer is known without importing torch, which would cost the
    client ~180 MB of memory for the whole batch: the client never runs the
    model (workers import torch themselves).  The driver shows itself as
    ``/proc/driver/nvidia`` and ``/dev/nvidia*`` (``/dev/dxg`` under WSL2).
    """
    if sys.platform.startswith("linux") and not (
        Path("/proc/driver/nvidia").exists() or Path("/dev/dxg").exists() or any(Path("/dev").glob("nvidia[0-9]*"))
    ):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_cluster_shape(n_workers: int | None = None, threads_per_worker: int | None = None) -> dict[str, Any]:
    """Worker processes and threads for an embedded LocalCluster on this machine.

    Cores are those this process may use (CPU affinity and cgroup limits, as
    :data:`dask.system.CPU_COUNT` counts them), and no more than a SLURM job's
    ``SLURM_CPUS_PER_TASK`` (a SLURM without affinity or cgroup plugins shows a
    job the whole node): :func:`usable_cores`.
    With CUDA: ``cluster.workers-per-gpu`` worker processes per GPU (each sees
    its one GPU only and declares a ``GPU`` resource), sharing the cores, one
    left for the client and scheduler, with at least 2 task threads each and no
    more than the inference tasks a worker admits (1 / ``GPU_RESOURCES["GPU"]``).
    Around the forward, a task's reading, thresholding and writing are CPU work,
    most of it on a GPU, and it holds the GIL often enough that one process's
    threads queue on it: :func:`workers_per_gpu`.  Without CUDA: one worker
    process per 8 cores (one model in memory each), one task thread per core,
    each forward on one torch thread — on CPUs, parallel forwards scale better
    than threads inside one forward.
    """
    cores = usable_cores()
    n_gpus = cuda_device_count()
    if n_gpus:
        n = int(config.get("cluster.n-workers", n_workers) or n_gpus * workers_per_gpu(cores, n_gpus))
        admitted = int(1 / GPU_RESOURCES["GPU"])
        t = int(config.get("cluster.threads-per-worker", threads_per_worker) or min(admitted, max(2, (cores - 1) // n)))
        return {"n_workers": n, "threads_per_worker": t, "resources": {"GPU": 1}, "gpus": n_gpus}
    n = int(config.get("cluster.n-workers", n_workers) or max(1, cores // 8))
    t = int(config.get("cluster.threads-per-worker", threads_per_worker) or max(1, cores // n))
    return {"n_workers": n, "threads_per_worker": t, "resources": None, "gpus": 0}


def usable_cores() -> int:
    """Cores for the embedded cluster: :data:`dask.system.CPU_COUNT`, capped by ``SLURM_CPUS_PER_TASK`` when set.

    >>> import os; saved = os.environ.get("SLURM_CPUS_PER_TASK")
    >>> os.environ["SLURM_CPUS_PER_TASK"] = "1"; usable_cores()
    1
    >>> _ = os.environ.pop("SLURM_CPUS_PER_TASK") if saved is None else os.environ.update(SLURM_CPUS_PER_TASK=saved)
    """
    cores = CPU_COUNT or 1
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if allocated.isdigit() and int(allocated) > 0:
        cores = min(cores, int(allocated))
    return cores


def workers_per_gpu(cores: int, n_gpus: int) -> int:
    """Worker processes per GPU for the embedded cluster: ``cluster.workers-per-gpu``.

    Parameters
    ----------
    cores
        Cores this process may use.
    n_gpus
        GPUs it may use (at least 1).

    Returns
    -------
    int
        The configured count, or for ``auto`` one process per 4 cores of a GPU's share, 1 to 4.

    Raises
    ------
    ValueError
        The setting is neither ``auto`` nor a whole number ≥ 1.

    On an H200 with 16 cores (8192² all-tissue slide, bench_run), the default 4 processes × 3
    task threads ran 216 tiles/s where one process of 15 threads ran 148 in the same call: in the
    one process the tasks spent 2.0-2.3 thread-seconds reading their blocks, in four 0.65 (its
    tiling too, 0.45 against 0.23 s).  The model is loaded once per process; each process has its
    own CUDA context, model and activations on the GPU, so GPU memory grows with the count
    (``workers-per-gpu: 1`` on a small card).

    >>> workers_per_gpu(16, 1), workers_per_gpu(64, 8), workers_per_gpu(4, 1), workers_per_gpu(128, 1)
    (4, 2, 1, 4)
    >>> with dask.config.set({"slidejob.cluster.workers-per-gpu": 1}):
    ...     workers_per_gpu(16, 1)
    1
    >>> with dask.config.set({"slidejob.cluster.workers-per-gpu": 0}):
    ...     workers_per_gpu(16, 1)
    Traceback (most recent call last):
    ValueError: cluster.workers-per-gpu must be auto or a whole number >= 1, got 0
    """
    choice = config.get("cluster.workers-per-gpu")
    if choice in (None, "auto"):
        return max(1, min(4, cores // n_gpus // 4))
    if isinstance(choice, bool) or not (isinstance(choice, int) or str(choice).isdigit()) or int(choice) < 1:
        raise ValueError(f"cluster.workers-per-gpu must be auto or a whole number >= 1, got {choice!r}")
    return int(choice)


#: Environment of CPU worker processes, on top of Dask's own (their malloc; glibc reads it at start).
#: A CPU forward allocates its activations (up to ~40 MB each) afresh and frees them again, every
#: forward.  glibc serves any allocation over its mmap threshold as a fresh mmap, which page-faults in
#: and is unmapped again on free: the threshold is 128 KiB once the nanny sets MALLOC_TRIM_THRESHOLD_
#: (which turns off glibc's adaptive threshold), at most 32 MiB in any case, and a task thread's own
#: arena mmaps whatever outgrows its 64 MiB heap whatever the threshold.  On an 8192² slide the
#: worker took 1.1-2.0 M page faults and 2.5-4.3 s of kernel time (of ~16 s).  One arena (the main
#: heap, grown by brk), no mmap and a 1 GiB trim threshold keep freed activations for the next
#: forward: under 0.2 M faults, 0.3-0.8 s, the slide's inference 10-25 % faster, and larger forwards
#: no longer slower per pixel.  The cost: a worker keeps its peak heap instead of handing it back.
#: Workers of a cluster started outside slidejob (--scheduler) want it in their environment too.
CPU_WORKER_ENVIRON = {"MALLOC_ARENA_MAX": 1, "MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": 2**30}
#: GPU workers: activations live on the device.  One arena ("heap", as CPU workers) was no faster
#: there (H200: 1 x 15 threads 164 against 167 tiles/s, 4 x 3 203 against 216).  Allocations up to 32 MiB (glibc's
#: adaptive ceiling; the nanny's trim threshold would otherwise make it 128 KiB) come from the heap
#: again (before CPU workers had settings of their own, a CPU forward ran 1.6x slower without).
GPU_WORKER_ENVIRON = {"MALLOC_MMAP_THRESHOLD_": 32 * 2**20}
#: ``cluster.worker-malloc`` choices.
WORKER_MALLOC: dict[str, dict[str, int]] = {"heap": CPU_WORKER_ENVIRON, "large-mmap": GPU_WORKER_ENVIRON, "dask": {}}


def worker_environ(gpus: int) -> dict[str, int]:
    """The malloc environment for the embedded cluster's workers (``cluster.worker-malloc``).

    >>> worker_environ(0) == CPU_WORKER_ENVIRON, worker_environ(1) == GPU_WORKER_ENVIRON
    (True, True)
    """
    choice = str(config.get("cluster.worker-malloc"))
    if choice == "auto":
        choice = "large-mmap" if gpus else "heap"
    if choice not in WORKER_MALLOC:
        raise ValueError(f"cluster.worker-malloc must be auto or one of {', '.join(WORKER_MALLOC)}, got {choice!r}")
    return WORKER_MALLOC[choice]


@contextlib.contextmanager
def dask_client(
    *,
    scheduler: str | None = None,
    scheduler_file: Path | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
) -> Iterator[Any]:
    """A ``distributed.Client``: to ``scheduler`` / ``scheduler_file`` if given, else an embedded LocalCluster.

    The client is the default for :func:`dask.compute` inside the block.
    """
    from distributed import Client, LocalCluster

    if scheduler or scheduler_file:
        from slidejob.errors import ClusterUnreachable

        where = scheduler or str(scheduler_file)
        if scheduler_file and not Path(scheduler_file).is_file():
            # distributed would wait for the file to appear until its connect timeout.
            raise ClusterUnreachable(f"{scheduler_file}: no such scheduler file (is the scheduler running?)")
        try:
            client = Client(scheduler, scheduler_file=str(scheduler_file) if scheduler_file else None)
        except (OSError, TimeoutError) as exc:
            raise ClusterUnreachable(f"{where}: cannot connect to the Dask scheduler ({_one_line(exc)})") from None
        logger.info("connected to Dask scheduler %s (dashboard %s)", client.scheduler.address, client.dashboard_link)
        try:
            yield client
        finally:
            client.close()
        return
    shape = local_cluster_shape(n_workers, threads_per_worker)
    # Worker i of a GPU machine sees GPU i alone.  CUDA stops listing devices at the first id that
    # does not exist, so ids past torch's count are not handed out.
    gpu_kwargs = {"gpu_ids": visible_gpu_ids()[: shape["gpus"]]} if shape["gpus"] else {}
    cluster_class = _gpu_local_cluster() if shape["gpus"] else LocalCluster
    environ = worker_environ(shape["gpus"])
    # Workers inherit this process's whole environment, and a nanny takes a variable already in it
    # over its config (and copies its spawn environment into it, at start and at every worker
    # restart): a cluster started before in this process (tests, benchmarks), or settings exported
    # for workers of another cluster, would decide this cluster's malloc.  So, for the spawn, ours
    # are set and the other choices' taken out; the whole environment is put back after the spawn
    # and again after the cluster closes.
    saved = dict(os.environ)
    try:
        for key in set().union(*WORKER_MALLOC.values()) - set(environ):
            os.environ.pop(key, None)
        os.environ.update({k: str(v) for k, v in environ.items()})
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environ.items()}):
            cluster = cluster_class(
                **gpu_kwargs,
                n_workers=shape["n_workers"],
                threads_per_worker=shape["threads_per_worker"],
                processes=True,
                resources=shape["resources"],
                dashboard_address=config.get("cluster.dashboard-address"),
            )
    finally:
        _restore_environ(saved)
    client = Client(cluster)
    logger.info(
        "LocalCluster: %d worker process(es) × %d thread(s)%s; dashboard %s",
        shape["n_workers"], shape["threads_per_worker"], f", {shape['gpus']} GPU(s)" if shape["gpus"] else "",
        client.dashboard_link,
    )
    try:
        # A worker that dies (killed for memory, a crashing codec) is started again by its nanny.  But the
        # cluster also closes a dead worker's nanny when, lost-worker-timeout (15 s) after the death, no
        # worker of that name is registered: should that instant fall in a later restart (a slide whose
        # tasks kill their worker again and again, each try), the nanny went for good, and with it the
        # cluster's only worker: the batch then waited for workers all night.  Nannies restart; let them.
        with dask.config.set({"distributed.deploy.lost-worker-timeout": LOCAL_LOST_WORKER_TIMEOUT}):
            yield client
    finally:
        client.close()
        cluster.close()
        _restore_environ(saved)


#: ``distributed.deploy.lost-worker-timeout`` while the embedded cluster runs (see :func:`dask_client`).
LOCAL_LOST_WORKER_TIMEOUT = "3650 days"


def _restore_environ(saved: dict[str, str]) -> None:
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


def visible_gpu_ids() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (a scheduler's allocation first).

    >>> import os; saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    >>> os.environ["CUDA_VISIBLE_DEVICES"] = "2, 3"; visible_gpu_ids()
    ['2', '3']
    >>> _ = os.environ.pop("CUDA_VISIBLE_DEVICES") if saved is None else os.environ.update(CUDA_VISIBLE_DEVICES=saved)
    """
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip()]
    return [str(i) for i in range(cuda_device_count())]


def _gpu_local_cluster() -> type:
    from distributed import LocalCluster

    class GpuLocalCluster(LocalCluster):
        """A LocalCluster whose workers each see one of ``gpu_ids`` (``CUDA_VISIBLE_DEVICES``), as dask-cuda does.

        Without it every worker's "cuda" is the first GPU: the others idle and the first runs them all.
        LocalCluster starts its first workers from one shared spec, so this one starts none and scales
        up through :meth:`new_worker_spec` (dask-cuda's LocalCUDACluster does the same).  A new worker
        gets the GPU the fewest current workers hold, so a worker added after scaling down and up
        again does not double up on one GPU while another idles.
        """

        def __init__(self, n_workers: int, *, gpu_ids: list[str], **kwargs: Any) -> None:
            from distributed.worker_memory import parse_memory_limit

            if not gpu_ids:
                raise ValueError("a GPU cluster needs at least one GPU id")
            self.gpu_ids = list(gpu_ids)
            # What LocalCluster gives each of n_workers (it sets nothing when started with none).
            kwargs.setdefault("memory_limit", parse_memory_limit("auto", 1, n_workers, logger=logger))
            super().__init__(n_workers=0, **kwargs)
            try:
                self.scale(n_workers)
                self.sync(self._correct_state)
            except BaseException:
                self.close()  # as SpecCluster does when its own start fails
                raise

        def new_worker_spec(self) -> dict:
            held = [w.get("options", {}).get("env", {}).get("CUDA_VISIBLE_DEVICES") for w in self.worker_spec.values()]
            specs = {}
            for name, spec in super().new_worker_spec().items():
                gpu = min(self.gpu_ids, key=lambda g: (held.count(g), self.gpu_ids.index(g)))
                held.append(gpu)
                options = dict(spec.get("options", {}))
                env = {**(options.get("env") or {}), "CUDA_VISIBLE_DEVICES": gpu}
                specs[name] = {**spec, "options": {**options, "env": env}}
            return specs

    return GpuLocalCluster


def compute_settled(*tasks: Any, **kwargs: Any) -> tuple[Any, ...]:
    """:func:`dask.compute` of ``tasks``; on a cluster, an error is raised only once the other tasks have settled.

    On a distributed cluster dask.compute raises at the first failed task while the others may still
    be writing into the stores the caller then removes (:func:`slidejob.chunkstore.atomic_directory`):
    a writer recreates the folder, and a hidden partial store stays behind.  Waiting for them (they
    fail or finish in seconds: a full disk, one corrupt tile) keeps the removal whole.  Ctrl-C does
    not wait.
    """
    client = _client_or_none()
    if client is None:
        return tuple(dask.compute(*tasks, **kwargs))
    futures = client.compute(list(tasks), **kwargs)
    try:
        return tuple(client.gather(futures))
    except Exception:
        from distributed import wait

        with contextlib.suppress(Exception):
            wait(futures, timeout=300)
        # Let go of them before the error leaves: its traceback keeps this frame, and with it futures the
        # scheduler would compute again, were the worker holding their results to die later (by then
        # into stores the caller has removed).
        with contextlib.suppress(Exception):
            client.cancel(futures)
        del futures
        raise


def _client_or_none() -> Any:
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _has_gpu_workers(client: Any) -> bool:
    if client is None:
        return False
    workers = client.scheduler_info(n_workers=-1).get("workers", {}) if client else {}
    return any("GPU" in (w.get("resources") or {}) for w in workers.values())


def _warn_unless_cpu_workers_keep_their_heap(client: Any) -> None:
    """Log a warning when CPU workers lack the malloc settings of ``cluster.worker-malloc``.

    The embedded cluster gets them; workers started outside slidejob (``--scheduler``) need them
    in their environment, or their forwards page-fault every activation in afresh
    (:data:`CPU_WORKER_ENVIRON`), and nothing else would tell a user why a night's batch was slow.
    """
    expected = worker_environ(0)
    if not expected:
        return

    def malloc_environ() -> dict[str, str | None]:
        import os

        return {k: os.environ.get(k) for k in expected}

    def has_them(environ: dict[str, str | None]) -> bool:
        # Each setting or one that does as well: the trim threshold at least ours, the others equal.
        for key, wanted in expected.items():
            try:
                value = int(environ.get(key) or "")
            except ValueError:  # unset or not a number
                return False
            if value < wanted if key == "MALLOC_TRIM_THRESHOLD_" else value != wanted:
                return False
        return True

    try:
        seen = client.run(malloc_environ)
    except Exception:  # a worker going away mid-call: no reason to stop the batch  # noqa: BLE001
        return
    lacking = sorted(address for address, environ in seen.items() if not has_them(environ))
    if lacking:
        settings = " ".join(f"{k}={v}" for k, v in expected.items())
        logger.warning("%d of %d CPU worker(s) (%s%s) run without %s: their forwards page-fault every "
                       "activation in afresh, inference 10-25 %% slower; start workers with it (deploy/README.md)",
                       len(lacking), len(seen), lacking[0], ", ..." if len(lacking) > 1 else "", settings)


def _task_threads_per_host(client: Any) -> int:
    """Task threads that share one machine's cores: the most any host runs across its workers.

    Each CPU forward then gets ``cores // this`` torch threads, so that, e.g.,
    2 workers × 1 thread on 2 cores do not each start 2 torch threads.
    """
    if client is None:
        return int(dask.config.get("num_workers", None) or CPU_COUNT)
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    per_host: dict[str, int] = {}
    for w in workers.values():
        host = str(w.get("host") or w.get("address", "").rsplit(":", 1)[0])
        per_host[host] = per_host.get(host, 0) + int(w.get("nthreads", 1))
    return max(per_host.values() or [1])


# --------------------------------------------------------------------------------------------------------
# Inference and the mask pyramid
# --------------------------------------------------------------------------------------------------------


#: What an inference task asks of a worker on a cluster that has GPU workers: a sliver of
#: one GPU.  Enough that only workers declaring a ``GPU`` run it; small enough that every
#: task thread of such a worker runs one at once, so one task's reading, thresholding and
#: writing overlap another's forward (the forwards themselves take turns on the device:
#: :meth:`slidejob.model.LoadedModel.predict_proba`).  A whole GPU per task let a worker run
#: one task at a time: 60 tiles/s end to end on an H200 whose forward of 512² batches runs 1870.
#: 1/64 is exact in binary, so the scheduler's sums of it never drift.
GPU_RESOURCES = {"GPU": 1 / 64}


def inference_tasks(
    grid: npt.NDArray[np.bool_],
    *,
    spec: Any,
    tiles_path: Path,
    mask_path: Path,
    prob_path: Path | None,
    halo_px: int,
    threshold: float,
    block_chunks: int,
    forward_chunks: str,
    batch_size: int,
    blocks_per_task: int,
    clip_to_tissue: bool = True,
    min_area_px: int = 0,
    pyramid_levels: int = 0,
) -> list[Any]:
    """Delayed inference tasks, each computing to an :class:`slidejob.infer.BlockResult`.

    A task covers ``blocks_per_task`` blocks of ``block_chunks``² chunks and
    infers only their tissue rectangles, in forwards of at most ``forward_chunks`` (``"RxC"``) chunks.
    On a cluster with GPU workers, compute them with :data:`GPU_RESOURCES`
    (``dask.compute(*tasks, resources=GPU_RESOURCES)``): the restriction then goes
    with this one compute call and no other graph can pick it up.
    """
    blocks = [
        [(by + r0, bx + c0, by + r1, bx + c1) for r0, c0, r1, c1 in geometry.tissue_rectangles(sub)]
        for by, bx, sub in block_slices(grid, block_chunks)
    ]
    return [
        dask.delayed(infer.infer_blocks, pure=False)(
            spec,
            str(tiles_path),
            str(mask_path),
            str(prob_path) if prob_path else None,
            blocks[i : i + blocks_per_task],
            halo_px=halo_px,
            threshold=threshold,
            batch_size=batch_size,
            forward_chunks=forward_chunks,
            clip_to_tissue=clip_to_tissue,
            min_area_px=min_area_px,
            pyramid_levels=pyramid_levels,
        )
        for i in range(0, len(blocks), blocks_per_task)
    ]


def cpu_block_chunks(grid: npt.NDArray[np.bool_], block_chunks: int, task_threads: int) -> int:
    """The block side for a slide on CPU workers: ``block_chunks``, halved while the slide has fewer blocks than threads.

    A task is one block; a small slide of one 4×4 block would keep one thread
    busy and the others idle.  On CPUs forwards are small (``run.forward-chunks``,
    2 × 2 chunks) whatever the block, and where their borders fall changes the
    mask only within the seam tolerance (tested); pyramid levels written by the
    tasks follow the block side.

    >>> grid = np.ones((4, 4), bool)
    >>> cpu_block_chunks(grid, 4, 1), cpu_block_chunks(grid, 4, 2), cpu_block_chunks(grid, 4, 8)
    (4, 2, 1)
    >>> cpu_block_chunks(np.ones((40, 40), bool), 4, 16), cpu_block_chunks(np.ones((1, 1), bool), 4, 2)
    (4, 4)
    """
    n_blocks = len(block_slices(grid, block_chunks))
    while block_chunks > 1 and n_blocks < task_threads:
        n_smaller = len(block_slices(grid, block_chunks // 2))
        if n_smaller <= n_blocks:
            break
        block_chunks, n_blocks = block_chunks // 2, n_smaller
    return block_chunks


def _pyramid_block(path: str, level: int, r0: int, c0: int, n: int, reducer: str) -> int:
    src = zarr.open_array(Path(path) / str(level - 1), mode="r")
    step = 2 * CHUNK_PX
    block = np.asarray(src[r0 * step : (r0 + n) * step, c0 * step : (c0 + n) * step])
    # The block is 2n × 2n chunks of the level below, from chunk (2 r0, 2 c0).
    return maskstore.write_levels(Path(path), block, (2 * r0, 2 * c0), 1, reducer=reducer, base_level=level - 1)


def build_pyramid(
    path: Path, grid: npt.NDArray[np.bool_], *, reducer: str, block_chunks: int = 4, from_level: int = 1
) -> None:
    """Fill levels ``from_level``.. of a mask/probability store from the level below, only where there is tissue."""
    root = zarr.open_group(path, mode="r")
    ome: Any = root.attrs["ome"]
    n_levels = len(ome["multiscales"][0]["datasets"])
    for level in range(1, n_levels):
        grid = maskstore.downsample_max(grid.astype(np.uint8)).astype(bool)
        if level < from_level:
            continue
        tasks = [
            dask.delayed(_pyramid_block, pure=False)(str(path), level, by, bx, block_chunks, reducer)
            for by, bx, _ in block_slices(grid, block_chunks)
        ]
        compute_settled(*tasks)


# --------------------------------------------------------------------------------------------------------
# The main job: slides in, masks and manifests out
# --------------------------------------------------------------------------------------------------------

MANIFEST_NAME = "manifest.json"
TILES_NAME = "tiles.zarr"
MANIFEST_SCHEMA = "slidejob-run-manifest/1"


@dataclass
class SlideOutcome:
    """What happened to one slide of a batch."""

    source: str
    slide_id: str
    status: str  # "ok", "failed" or "skipped" (already done with the same inputs)
    error: str | None
    out_dir: Path
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)
    #: it failed because the worker processes running its tasks died (:func:`_workers_died`)
    workers_died: bool = False


@dataclass
class BatchResult:
    """Outcomes of a batch, in input order."""

    out_dir: Path
    outcomes: list[SlideOutcome]

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def _fingerprint_and_id(path: Path) -> tuple[str | None, str]:
    """The slide file's content fingerprint (None when unreadable) and its :func:`slide_id_for`."""
    try:
        fingerprint = wsi.fingerprint_file(path) if path.is_file() else None
    except OSError:
        fingerprint = None
    return fingerprint, slide_id_for(path, fingerprint)


def slide_id_for(path: Path, fingerprint: str | None) -> str:
    """Stable, unique id: the file's stem plus 10 hex of its content fingerprint.

    Two different slides that share a file name in different folders get
    different ids; the same slide gets the same id wherever it is read from.
    Unreadable files (no fingerprint) are keyed by their absolute path instead.

    >>> slide_id_for(Path("/a/CMU 1.svs"), "sha256:0123456789abcdef")
    'CMU_1-0123456789'
    """
    import hashlib
    import re

    stem = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(stem).stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "slide"
    if fingerprint:
        return f"{stem}-{fingerprint.split(':', 1)[-1][:10]}"
    return f"{stem}-p{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:9]}"


def _versions() -> dict[str, str]:
    """The versions every manifest records (a copy: the packages' metadata is read once a process, ~11 ms)."""
    return dict(_package_versions())


@functools.cache
def _package_versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "slidejob": __version__}
    for pkg in ("torch", "dask", "distributed", "zarr", "tifffile", "imagecodecs", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            out[pkg] = "absent"
    return out


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    import json

    chunkstore.write_file_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class RunParameters:
    """Everything that changes a slide's result; recorded in every manifest, compared on resume."""

    threshold: float
    precision: str
    halo_px: int
    block_chunks: int
    #: the most chunks one forward covers, "ROWSxCOLS"
    forward_chunks: str
    min_tissue_fraction: float
    all_tissue: bool
    mpp_um_override: float | None
    save_probabilities: bool
    clip_to_tissue: bool = True
    min_lesion_area_um2: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def _workers_died(exc: BaseException) -> bool:
    """Whether ``exc`` says the scheduler gave up on a task whose workers kept dying under it (``KilledWorker``).

    It names a task, not the slide at fault: every task running on a worker that dies counts the
    death, so the tasks of another slide in flight on that worker fail beside those of one whose
    reading kills its worker (run_batch retries them alone).
    """
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover - distributed is a dependency
        return False
    return isinstance(exc, KilledWorker)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def prepare_output_dir(out_dir: Path, *, create: bool = True) -> None:
    """Make the output directory and open its summary database, so that an unusable one stops a batch
    before any slide is done (not after the first, with nowhere to record it).

    With ``create=False`` (the CLI, before it starts or reaches a cluster) nothing is made: only a
    database already there is checked.  Raises :class:`~slidejob.summarydb.SummaryError` for a
    database that is not slidejob's, is corrupt, locked or cannot be written; it is left as it is.
    """
    out_dir = Path(out_dir)
    db_path = summarydb.db_path_for(out_dir)
    if create:
        out_dir.mkdir(parents=True, exist_ok=True)
        chunkstore.remove_stale_temporaries(out_dir)  # a killed run's half-written report
    elif not db_path.exists():
        _check_writable(out_dir)
        return
    with _storage_full_stops_batch(out_dir, db_path):  # a full disk keeps its own exit status
        summarydb.open_database(db_path).close()


def _check_writable(out_dir: Path) -> None:
    """Raise the ``OSError`` that making ``out_dir`` would meet (read-only file system, no permission), making nothing."""
    existing = out_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out_dir))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(existing))


def run_batch(
    inputs: list[Path],
    out_dir: Path,
    *,
    weights: Path | None = None,
    threshold: float | None = None,
    precision: str = "auto",
    device: str = "auto",
    halo_px: int | None = None,
    block_chunks: int | None = None,
    forward_chunks: int | str | None = None,
    batch_size: int | None = None,
    save_probabilities: bool = False,
    mpp_um: float | None = None,
    min_tissue_fraction: float | None = None,
    all_tissue: bool = False,
    min_lesion_area_um2: float | None = None,
    keep_tiles: bool = False,
    force: bool = False,
    slides_in_flight: int | None = None,
) -> BatchResult:
    """Segment cancer in every slide of ``inputs`` (files and directories) into ``out_dir``.

    Runs on the active Dask client (see :func:`dask_client`), or on local
    threads without one.  Each slide is isolated: a failure is recorded with a
    one-line reason (traceback in the log) and the batch goes on.  A slide
    whose manifest says it was done with the same fingerprint, weights and
    parameters is skipped unless ``force``.

    Parameters
    ----------
    inputs
        Slide files and/or directories (searched recursively by extension).
    out_dir
        Output directory; each slide gets ``out_dir/<slide-id>/``.
    weights
        A model card (``.json``) or its ``.safetensors``; the shipped default when None.
    threshold
        Probability threshold; the card's when None.
    precision
        ``auto`` (fastest safe for each worker's device), ``fp32``, ``bf16`` or ``fp16``.
    device
        ``auto`` (CUDA when a worker has it), ``cpu`` or ``cuda``.
    halo_px
        Context around each inferred rectangle; the receptive radius rounded up to 8 when None.
    block_chunks
        Chunks per side of an inference block (what one task reads, writes and reduces).  When
        None, ``run.block-chunks`` from the config, halved on CPU workers for slides with fewer
        blocks than task threads (:func:`cpu_block_chunks`); a value given here is used as is.
    forward_chunks
        The most chunks one forward covers: ``N`` (N × N), ``"RxC"`` or ``"auto"`` (the default:
        :func:`slidejob.geometry.resolve_forward_chunks` on each worker, by its device and precision).
    batch_size
        Same-shaped inputs per forward (default: 1 on CPU, 8 on GPU workers).
    save_probabilities
        Also write ``probability.ome.zarr`` (uint8, probability × 255).
    mpp_um, min_tissue_fraction, all_tissue
        As for :func:`tile_slide`.
    min_lesion_area_um2
        Lesions below this area are removed from mask, statistics and GeoJSON
        (config ``run.min-lesion-area-um2`` when None; 0 keeps all; not applied
        to slides without µm/px).
    keep_tiles
        Keep each slide's ``tiles.zarr`` after its mask is written.
    force
        Redo slides already done.
    slides_in_flight
        Slides processed at once on a Dask cluster (config ``run.slides-in-flight``, default 2 when
        None): the next slide's tiling and the last one's merge and exports fill the workers' idle
        time.  Without a cluster, one.
    """
    from slidejob.model import ModelCard, resolve_model_paths

    out_dir = Path(out_dir)
    slides = wsi.find_slides(list(inputs))  # inputs without any slide fail here, before anything is written
    prepare_output_dir(out_dir)
    if weights is not None and Path(weights).suffix.lower() == ".json":
        card_path, weights_path = resolve_model_paths(Path(weights), None)
    else:
        card_path, weights_path = resolve_model_paths(None, Path(weights) if weights else None)
    card = ModelCard.load(card_path)
    client = _client_or_none()
    gpu = _has_gpu_workers(client)
    if client is not None and not gpu:
        _warn_unless_cpu_workers_keep_their_heap(client)
    threads = _task_threads_per_host(client)
    spec = infer.ModelSpec(
        card_path=str(card_path),
        weights_path=str(weights_path),
        weights_sha256=card.weights_sha256,
        device=device,
        precision=precision,
        # Parallel tasks each get one torch thread; one task per machine gets them all.
        torch_threads=max(1, usable_cores() // max(1, threads)) if client is not None else 1,
    )
    params = RunParameters(
        threshold=float(card.threshold if threshold is None else threshold),
        precision=precision,
        halo_px=geometry.halo_for(card.receptive_radius_px, halo_px),
        block_chunks=int(config.get("run.block-chunks", block_chunks)),
        forward_chunks=geometry.forward_label(
            config.get("run.forward-chunks-gpu" if gpu else "run.forward-chunks", forward_chunks)),
        min_tissue_fraction=float(config.get("tile.min-tissue-fraction", min_tissue_fraction)),
        all_tissue=all_tissue,
        mpp_um_override=mpp_um,
        save_probabilities=save_probabilities,
        min_lesion_area_um2=float(config.get("run.min-lesion-area-um2", min_lesion_area_um2)),
    )
    batch = int(batch_size or config.get("run.batch-size-gpu" if gpu else "run.batch-size"))
    blocks_per_task = int(config.get("run.blocks-per-task-gpu")) if gpu else 1
    model_info = {
        "name": card.name,
        "card_path": str(card_path),
        "weights_path": str(weights_path),
        "weights_sha256": card.weights_sha256,
        "threshold": params.threshold,
        "mpp_um": card.mpp_um,
    }
    # An explicit block size is used as given; the configured one shrinks for small slides
    # (cpu_block_chunks) until the cluster's task threads each have a block.
    if block_chunks is not None:
        task_threads = 1
    else:
        task_threads = sum(client.nthreads().values()) if client is not None else CPU_COUNT
    # Without a cluster, dask.compute runs on a thread pool of its own per call: slides one by one.
    in_flight = max(1, int(config.get("run.slides-in-flight", slides_in_flight))) if client is not None else 1
    in_flight = min(in_flight, len(slides)) or 1
    logger.info("%d slide(s) to process into %s (%d in flight)", len(slides), out_dir, in_flight)
    stopping = threading.Event()

    def one(path: Path, after: Future[SlideOutcome] | None = None,
            identity: tuple[str | None, str] | None = None, *, alone: bool = False) -> SlideOutcome:
        if after is not None:
            after.exception()  # wait; the earlier copy's outcome is reported on its own
        return _run_one(
            path, out_dir, spec=spec, params=params, model_info=model_info, batch_size=batch,
            blocks_per_task=blocks_per_task, gpu=gpu, keep_tiles=keep_tiles, force=force,
            task_threads=task_threads, stopping=stopping, identity=identity,
            retried_if_workers_die=in_flight > 1 and not alone,
        )

    outcomes = []
    # With more than one in flight, each slide is driven by a client thread of its own; their graphs
    # share the cluster, so one slide's tiling and client-side tail (merge, exports, database) overlap
    # another's inference instead of leaving the workers idle.  Outcomes are reported in input order.
    pool = ThreadPoolExecutor(in_flight, thread_name_prefix="slidejob-slide") if in_flight > 1 else None
    try:
        if pool is None:
            results: Iterator[SlideOutcome] = (one(path) for path in slides)
        else:
            # Copies of one slide in different folders share an id, hence an output folder: a copy
            # waits for the one before it (and is then skipped as done), as one after another would.
            futures: list[Future[SlideOutcome]] = []
            latest: dict[str, Future[SlideOutcome]] = {}
            for path in slides:
                identity = _fingerprint_and_id(path)  # read once: the slide's run takes it as it is
                futures.append(pool.submit(one, path, latest.get(identity[1]), identity))
                latest[identity[1]] = futures[-1]
            results = (future.result() for future in futures)
        for i, outcome in enumerate(results, 1):
            logger.info("[%d/%d] %s: %s%s (%.1f s)", i, len(slides), outcome.slide_id, outcome.status,
                        f" — {outcome.error}" if outcome.error else "", outcome.seconds)
            outcomes.append(outcome)
        if pool:
            pool.shutdown()
        # A slide whose tasks kept killing their worker (out of memory, a crashing codec) takes down
        # the tasks of every slide in flight beside it on that worker: those fail with it.  Each is
        # retried alone, where only its own tasks die with its workers; the one at fault fails again.
        retry = [i for i, o in enumerate(outcomes) if o.workers_died] if in_flight > 1 else []
        if retry:
            logger.warning("%d slide(s) failed as their workers died while other slides were in flight: "
                           "retrying each alone", len(retry))
        for i in retry:
            outcomes[i] = outcome = one(slides[i], alone=True)
            logger.info("%s retried alone: %s%s (%.1f s)", outcome.slide_id, outcome.status,
                        f" — {outcome.error}" if outcome.error else "", outcome.seconds)
    except BaseException:
        # Interrupted (Ctrl-C): slides not started are dropped; those in flight record nothing when
        # their cluster goes away under them (see _run_one), so a rerun redoes them.
        stopping.set()
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    if client is not None and not gpu:
        # CPU workers keep their forwards' heap for the next forward (CPU_WORKER_ENVIRON); between
        # batches on a long-lived cluster that is ~0.25-0.33 GB a task thread held for nothing.
        with contextlib.suppress(Exception):
            client.run(trim_heap)
    export.write_report(out_dir)
    return BatchResult(out_dir=out_dir, outcomes=outcomes)


#: Free space under which a write error on the output's file system is taken for a full one (sqlite
#: reports a full disk as a plain "disk I/O error" when its journal cannot grow).
_NEARLY_FULL_BYTES = 16 * 2**20


def _storage_full(exc: BaseException, out_dir: Path) -> BaseException | None:
    """The error in ``exc``'s chain that says the output's file system is full or over quota, or None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_FULL_ERRNOS:
            return e
        if isinstance(e, (OSError, sqlite3.Error)):
            with contextlib.suppress(OSError):
                if shutil.disk_usage(out_dir).free < _NEARLY_FULL_BYTES:
                    return e
        e = e.__cause__ or e.__context__
    return None


def _raise_if_storage_full(exc: BaseException, out_dir: Path, path: Path) -> None:
    full = _storage_full(exc, out_dir)
    if full is not None:
        reason = getattr(full, "strerror", None) or str(full)
        raise OutputStorageFull(
            f"{out_dir}: its file system is full ({reason}) while writing {path.name}; the batch stopped: "
            "slides finished so far are kept, and a rerun after freeing space goes on from there"
        ) from exc


@contextlib.contextmanager
def _storage_full_stops_batch(out_dir: Path, path: Path) -> Iterator[None]:
    """Errors pass through unchanged, except one caused by a full output file system: :class:`OutputStorageFull`."""
    try:
        yield
    except Exception as exc:
        _raise_if_storage_full(exc, out_dir, path)
        raise


def _record_done_slide(db_path: Path, slide_dir: Path, slide_id: str, provenance: dict[str, Any], path: Path) -> bool:
    """See that the summary database records a slide skipped as done; False when it cannot (redo the slide).

    A database that was lost or moved aside lacks the row: it is recorded again from the slide's
    stats.json, if that file is of the run the manifest describes (``provenance``).
    """
    if summarydb.recorded_provenance(db_path, slide_id) == provenance:
        return True
    try:
        summarydb.record_from_stats_json(db_path, slide_dir / export.STATS_NAME,
                                         expect={"slide_id": slide_id, **provenance})
    except summarydb.SummaryError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s: done before, but not recorded and its %s cannot be (%s): doing it again",
                       path, export.STATS_NAME, _one_line(exc))
        return False
    return True


def trim_heap() -> None:
    """Hand this process's free heap back to the OS (glibc's ``malloc_trim``; elsewhere nothing)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _run_one(
    path: Path,
    out_dir: Path,
    *,
    spec: Any,
    params: RunParameters,
    model_info: dict[str, Any],
    batch_size: int,
    blocks_per_task: int,
    gpu: bool,
    keep_tiles: bool,
    force: bool,
    task_threads: int = 1,
    stopping: threading.Event | None = None,
    identity: tuple[str | None, str] | None = None,
    retried_if_workers_die: bool = False,
) -> SlideOutcome:
    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc)
    timings: dict[str, float] = {}
    info: SlideInfo | None = None
    slide_stats: stats.SlideStats | None = None
    # The file's fingerprint and id, when the batch has already read them to find copies of a slide.
    fingerprint, slide_id = identity if identity is not None else _fingerprint_and_id(path)
    slide_dir = out_dir / slide_id
    manifest: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA,
        "slide_id": slide_id,
        "status": "running",
        "error": None,
        "input": {"path": str(path.resolve()), "fingerprint": fingerprint},
        "model": model_info,
        "parameters": params.to_dict(),
        "versions": _versions(),
        "started": started.isoformat(timespec="seconds"),
    }
    workers_died = False
    previous = _read_json(slide_dir / MANIFEST_NAME)
    if (
        not force
        and previous
        and previous.get("status") == "ok"
        and previous.get("input", {}).get("fingerprint") == fingerprint
        and previous.get("model", {}).get("weights_sha256") == model_info["weights_sha256"]
        and previous.get("parameters") == params.to_dict()
    ):
        db_path = summarydb.db_path_for(out_dir)
        provenance = {"fingerprint": fingerprint, "weights_sha256": model_info["weights_sha256"],
                      "parameters": params.to_dict()}
        with _storage_full_stops_batch(out_dir, db_path):
            if not _record_done_slide(db_path, slide_dir, slide_id, provenance, path):
                previous = None
        if previous is not None:
            return SlideOutcome(str(path), slide_id, "skipped", None, slide_dir, time.perf_counter() - t0, previous)
    try:
        slide_dir.mkdir(parents=True, exist_ok=True)
        # The slide is being (re)done: a manifest of an earlier run must not outlive the outputs it
        # describes, or a run killed after replacing them would leave it vouching for the new ones.
        (slide_dir / MANIFEST_NAME).unlink(missing_ok=True)
        # What a killed run of this slide left under temporary names (a probability store
        # this run will not write included).
        chunkstore.remove_stale_temporaries(slide_dir)
        tr = detect_slide_tissue(
            path, mpp_um=params.mpp_um_override, min_tissue_fraction=params.min_tissue_fraction,
            all_tissue=params.all_tissue,
        )
        info = tr.info
        manifest["input"].update(
            {k: getattr(info, k) for k in ("file_size_bytes", "vendor", "width_px", "height_px", "mpp_um",
                                           "mpp_source", "objective_power", "fluorescence")}
        )
        manifest["tissue"] = {k: v for k, v in tr.attributes().items() if k != "grid"}
        timings["tissue"] = time.perf_counter() - t0
        if info.fluorescence:
            # The model segments brightfield H&E: on a fluorescence scan its calls (on a dark
            # background that glass clipping does not know) came out as "micrometastasis" with a
            # cancer area 40x the tissue's.  No result beats a confident wrong one in the summary.
            raise UnsupportedSlide(f"{path}: fluorescence scan; slidejob's model segments brightfield H&E slides, "
                                   "so it is not run on it")

        block_chunks = params.block_chunks if gpu else cpu_block_chunks(tr.grid, params.block_chunks, task_threads)
        manifest["block_chunks_used"] = block_chunks
        t = time.perf_counter()
        tiles = slide_dir / TILES_NAME
        # The tiling tasks take the configured block side, halved like the inference blocks for small
        # slides (tile.block-chunks is 4 as run.block-chunks is: one task for a 2048² slide otherwise).
        tile_slide(path, tiles, overwrite=True, tissue_result=tr, mpp_um=params.mpp_um_override,
                   all_tissue=params.all_tissue, context_chunks=-(-params.halo_px // CHUNK_PX),
                   block_chunks=None if block_chunks == params.block_chunks else block_chunks)
        timings["tile"] = time.perf_counter() - t

        attrs = {
            "slide_id": slide_id,
            "slide": info.to_dict(),
            "tissue": tr.attributes(),
            "model": model_info,
            "threshold": params.threshold,
            "weights_sha256": model_info["weights_sha256"],
            "parameters": params.to_dict(),
            "slidejob_version": __version__,
        }
        min_area_px = stats.min_area_px(params.min_lesion_area_um2, info.mpp_um)
        # Levels whose chunks each lie inside one inference block are written by the tasks.
        task_levels = min(maskstore.levels_within_blocks(block_chunks),
                          maskstore.n_levels_for(info.height_px, info.width_px) - 1)
        if params.min_lesion_area_um2 > 0 and info.mpp_um is None:
            logger.warning("%s: µm/px unknown: lesions of any size kept (--mpp sets it)", path)
        t = time.perf_counter()
        with contextlib.ExitStack() as stack:
            mask_tmp = stack.enter_context(
                chunkstore.atomic_directory(slide_dir / maskstore.MASK_NAME, overwrite=True)
            )
            maskstore.create_mask_store(
                mask_tmp, height_px=info.height_px, width_px=info.width_px, mpp_um=info.mpp_um,
                attributes=attrs, tissue_fraction=tr.fraction,
            )
            prob_tmp = None
            if params.save_probabilities:
                prob_tmp = stack.enter_context(
                    chunkstore.atomic_directory(slide_dir / maskstore.PROBABILITY_NAME, overwrite=True)
                )
                maskstore.create_mask_store(
                    prob_tmp, height_px=info.height_px, width_px=info.width_px, mpp_um=info.mpp_um,
                    attributes=attrs, tissue_fraction=tr.fraction, name="cancer-probability", label=False,
                )
            tasks = inference_tasks(
                tr.grid, spec=spec, tiles_path=tiles, mask_path=mask_tmp, prob_path=prob_tmp,
                halo_px=params.halo_px, threshold=params.threshold, block_chunks=block_chunks,
                forward_chunks=params.forward_chunks, batch_size=batch_size, blocks_per_task=blocks_per_task,
                clip_to_tissue=params.clip_to_tissue, min_area_px=min_area_px, pyramid_levels=task_levels,
            )
            results: list[infer.BlockResult] = list(
                compute_settled(*tasks, resources=GPU_RESOURCES) if gpu else compute_settled(*tasks)
            )
            n_written = sum(r.chunks_written for r in results)
            timings["infer"] = time.perf_counter() - t
            # What "auto" became on the workers that ran this slide (one entry per distinct setup).
            runtimes = {tuple(sorted(r.runtime.items())) for r in results if r.runtime}
            manifest["inference"] = {
                "runtimes": [dict(r) for r in sorted(runtimes)],
                "tasks": len(results),
                # Worker-thread seconds by stage, summed over the tasks: with the "infer" wall time and
                # the task threads they say whether the model, the reading or the work around it held
                # the stage (on a GPU the forwards take turns, so "forward" includes the wait).
                "task_stage_s": {k: round(sum(r.stage_s.get(k, 0.0) for r in results), 3)
                                 for k in infer.TASK_STAGES},
            }
            if gpu and spec.device == "auto" and any(r["device"] == "cpu" for r in manifest["inference"]["runtimes"]):
                # A worker declaring a GPU that CUDA does not show it (a wrong CUDA_VISIBLE_DEVICES, a
                # CPU build of torch) infers on its CPU: right masks, a night's batch many times slower.
                logger.warning("%s: workers declaring a GPU ran the model on their CPU (no CUDA device they "
                               "could open; see the manifest's \"inference\")", path)
            t = time.perf_counter()
            # The tasks reduced every mask chunk and traced the lesions inside their blocks
            # while the mask was in memory: no second pass over the store.
            slide_stats = stats.statistics_from_partials(mask_tmp, [p for r in results for p in r.partials])
            # Small lesions inside a block went in its task; those across block borders
            # are known only now, and are erased before the pyramid is built from level 0.
            slide_stats, small = stats.drop_small_lesions(slide_stats, min_area_px)
            maskstore.erase_components(mask_tmp, [(les.bbox_px, les.first_pixel_yx) for les in small],
                                       levels=task_levels)
            manifest["small_lesions"] = {
                "min_area_um2": params.min_lesion_area_um2,
                "min_area_px": min_area_px,
                "removed": sum(r.small_removed for r in results) + len(small),
            }
            timings["statistics"] = time.perf_counter() - t
            t = time.perf_counter()
            build_pyramid(mask_tmp, tr.grid, reducer="max", from_level=task_levels + 1)
            if prob_tmp is not None:
                build_pyramid(prob_tmp, tr.grid, reducer="mean", from_level=task_levels + 1)
            timings["pyramid"] = time.perf_counter() - t
        manifest["outputs"] = {"mask": maskstore.MASK_NAME, "inferred_chunks": int(n_written)}
        if params.save_probabilities:
            manifest["outputs"]["probability"] = maskstore.PROBABILITY_NAME
        t = time.perf_counter()
        mask_path = slide_dir / maskstore.MASK_NAME
        export.write_overlay_png(tr.thumbnail, tr.thumbnail_downsample_yx, tr.tissue_mask, mask_path,
                                 slide_dir / export.OVERLAY_NAME)
        outlines = {k: v for r in results for k, v in r.outlines.items()}
        del results
        export.write_geojson(mask_path, slide_dir / export.GEOJSON_NAME, stats=slide_stats, outlines=outlines)
        timings["exports"] = time.perf_counter() - t
        manifest["outputs"].update(
            {"stats": export.STATS_NAME, "overlay": export.OVERLAY_NAME, "geojson": export.GEOJSON_NAME}
        )
        manifest["statistics"] = {
            k: getattr(slide_stats, k)
            for k in ("tissue_area_mm2", "cancer_area_mm2", "cancer_fraction", "lesion_count",
                      "largest_diameter_mm", "size_category")
        }
        if keep_tiles:
            manifest["outputs"]["tiles"] = TILES_NAME
        manifest["status"] = "ok"
    except Exception as exc:  # one bad slide never stops the batch
        from slidejob.errors import SlidejobError

        # ...but a full disk is no bad slide: every further slide would fail the same way.  Its
        # unfinished stores are gone (atomic_directory); nothing of it is recorded.
        _raise_if_storage_full(exc, out_dir, path)
        if stopping is not None and stopping.is_set():
            # The batch was interrupted and its cluster closed under this slide: not the slide's
            # failure, so no manifest or database row says it failed (its unfinished stores are
            # removed as on any error; a rerun redoes the slide).
            raise

        workers_died = _workers_died(exc)
        error = (f"{path}: the worker processes running its tasks died, each try (killed for memory, "
                 "a crash in a reader or codec, or a lost node)" if workers_died else _one_line(exc))
        if workers_died and retried_if_workers_die:
            # Perhaps only beside the slide at fault: run_batch tries it again alone.
            logger.warning("%s: failed: %s; to be retried alone after the slides in flight", path, error)
        else:
            # Our own errors are about the input and say all there is; anything else gets its traceback.
            logger.error("%s: failed: %s", path, error,
                         exc_info=not isinstance(exc, SlidejobError) and not workers_died)
        manifest["status"] = "failed"
        manifest["error"] = error
    if not keep_tiles:
        # A second copy of the slide's tissue: done with once the mask is written, and useless without it.
        shutil.rmtree(slide_dir / TILES_NAME, ignore_errors=True)
    finished = _dt.datetime.now(_dt.timezone.utc)
    seconds = time.perf_counter() - t0
    timings["total"] = seconds
    manifest["finished"] = finished.isoformat(timespec="seconds")
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    slide_dir.mkdir(parents=True, exist_ok=True)
    slide_dict = info.to_dict() if info else {"path": str(path.resolve()), "fingerprint": fingerprint}
    record = summarydb.slide_record(
        slide_id=slide_id, status=manifest["status"], stats=slide_stats, error=manifest["error"], slide=slide_dict,
        weights_sha256=model_info["weights_sha256"], threshold=params.threshold, parameters=params.to_dict(),
        started_at=started, finished_at=finished,
    )
    with _storage_full_stops_batch(out_dir, path):
        if slide_stats is not None:
            export.write_stats_json(slide_dir / export.STATS_NAME, record, slide_stats.lesions)
        # The database is written by this (the client) process only; the manifest goes last, so a
        # manifest saying "ok" means every other output of the slide is in place.
        summarydb.record_slide(summarydb.db_path_for(out_dir), record, slide_stats.lesions if slide_stats else [])
        _write_json_atomic(slide_dir / MANIFEST_NAME, manifest)
    return SlideOutcome(str(path), slide_id, manifest["status"], manifest["error"], slide_dir, seconds, manifest,
                        workers_died=workers_died)
