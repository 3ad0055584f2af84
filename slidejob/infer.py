"""U-Net inference on blocks of the chunk store: the per-task edge between stores and the model.

A Dask task receives a small, picklable :class:`ModelSpec` (paths, the
weights' sha256, device and precision wishes), never the model itself.  The
model is loaded once per worker process into :data:`_MODELS`, keyed by the
weights' sha256 and how it runs, and reused by every task on that process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from slidejob import chunkstore, geometry, maskstore, outline, stats, tissue
from slidejob.chunkstore import CHUNK_PX, ChunkWriter

logger = logging.getLogger(__name__)

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ModelSpec:
    """How to get the model on a worker: cheap to pickle into every task."""

    card_path: str
    weights_path: str
    weights_sha256: str
    #: "auto" (CUDA when the worker has it, else CPU), "cpu", "cuda", "cuda:1"
    device: str = "auto"
    #: "auto" picks the fastest safe precision for the worker's device
    precision: str = "auto"
    #: torch intra-op threads on CPU workers; None leaves torch's default
    torch_threads: int | None = None


_MODELS: dict[tuple[str, str, str, bool], Any] = {}
_LOCK = threading.Lock()
#: How many times this process has loaded a model (the once-per-worker property is tested on it).
LOAD_COUNT = 0


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def get_model(spec: ModelSpec) -> Any:
    """The process's loaded model for ``spec``, loading it on first use."""
    global LOAD_COUNT
    import torch

    from slidejob.model import best_precision, load_model

    device = resolve_device(spec.device)
    if spec.torch_threads and device == "cpu" and torch.get_num_threads() != spec.torch_threads:
        # Before best_precision: on some CPUs it times forwards, which should run as the tasks' will.
        torch.set_num_threads(spec.torch_threads)
    if spec.precision == "auto":
        precision, channels_last = best_precision(device)
    else:
        # channels_last never changes the mask and is faster everywhere we measured.
        precision, channels_last = spec.precision, True
    key = (spec.weights_sha256, device, precision, channels_last)
    model = _MODELS.get(key)
    if model is not None:
        return model
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = load_model(
                Path(spec.card_path),
                Path(spec.weights_path),
                device=device,
                precision=precision,
                channels_last=channels_last,
            )
            _MODELS[key] = model
            LOAD_COUNT += 1
            logger.info("pid %d loaded model %s on %s (%s, channels_last=%s)", os.getpid(),
                        spec.weights_sha256[:12], device, precision, channels_last)
    return model


def load_count() -> int:
    """Models loaded by this process (for tests: run it on each worker with ``client.run``)."""
    return LOAD_COUNT


def read_window(image: ChunkWriter, window: geometry.Window) -> npt.NDArray[np.uint8]:
    """Read a window from the level-0 tile store and reflect-pad it to the model's input."""
    pixels = image.read_box((slice(window.read_y0, window.read_y1), slice(window.read_x0, window.read_x1),
                             slice(None)))
    return geometry.pad_window(pixels, window.pad)


def predict_windows(
    model: Any,
    inputs: list[npt.NDArray[np.uint8]],
    batch_size: int,
    consume: Callable[[int, npt.NDArray[np.float32]], None],
    margin_px: int = 0,
) -> float:
    """Probabilities for each input, handed to ``consume(index, probabilities)`` as each batch comes back.

    Inputs of the same shape go through the model together.  Nothing is kept
    here: a task holds one batch's probabilities at a time, not its block's.
    With ``margin_px`` (a multiple of 8) each input's outer ``margin_px`` are
    not wanted: the model leaves them out of its output and spends less on them.
    Returns the seconds spent in the model (``consume`` excluded).
    """
    forward_s = 0.0
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(inputs):
        by_shape.setdefault(x.shape, []).append(i)
    for idx in by_shape.values():
        for s in range(0, len(idx), batch_size):
            part = idx[s : s + batch_size]
            # One input (a GPU task's whole block) goes as a view: stacking would copy its ~14 MB.
            batch = inputs[part[0]][None] if len(part) == 1 else np.stack([inputs[i] for i in part])
            t = time.perf_counter()
            probs = model.predict_proba(batch, margin_px)
            forward_s += time.perf_counter() - t
            for i, p in zip(part, probs):
                consume(i, p)
    return forward_s


@dataclass
class BlockResult:
    """What an inference task hands back besides the chunks it wrote (small: no pixels)."""

    #: chunks written to the mask store
    chunks_written: int
    #: the :class:`~slidejob.stats.ChunkPartial` of every mask chunk written
    partials: list[stats.ChunkPartial]
    #: GeoJSON geometry text of every lesion that lies wholly inside one block,
    #: keyed by the raster index (``row * width + col``) of its first pixel
    outlines: dict[int, str]
    #: lesions below the minimum area removed inside the blocks (those touching a
    #: block border are left to the merge: see :func:`slidejob.stats.drop_small_lesions`)
    small_removed: int = 0
    #: how the model ran (:func:`runtime_of`): "auto" is resolved per worker, and the
    #: manifest records what each resolved to
    runtime: dict[str, Any] = field(default_factory=dict)
    #: seconds this task spent in each stage (:data:`TASK_STAGES`), summed into the manifest
    stage_s: dict[str, float] = field(default_factory=dict)


#: The stages of an inference task, in order: where a worker thread's time goes.  "model" gets the
#: process's model (loading it, and starting CUDA, in a worker's first task only); "read" reads and
#: reflect-pads the block; "forward" is the model's, waiting for the device included (a GPU's forwards
#: take turns); "place" batches the forwards' inputs, thresholds each forward's centre and clips it
#: off glass; "lesions" labels the block's mask and removes small lesions; "write" writes the mask
#: (and probability) chunks and reduces them for the statistics; "outlines" traces the block's
#: lesions; "levels" writes its pyramid levels.
TASK_STAGES = ("model", "read", "forward", "place", "lesions", "write", "outlines", "levels")


def runtime_of(model: Any) -> dict[str, Any]:
    """Where and how a loaded model runs: device (with the GPU's name or the CPU's vector unit), precision, layout."""
    import torch

    device = model.device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    return {"device": str(device), "device_name": name, "precision": model.precision,
            "channels_last": bool(model.channels_last)}


def infer_blocks(
    spec: ModelSpec,
    tiles_path: str,
    mask_path: str,
    prob_path: str | None,
    blocks: list[list[geometry.Rect]],
    *,
    halo_px: int,
    threshold: float,
    batch_size: int,
    forward_chunks: int | str | tuple[int, int],
    clip_to_tissue: bool = True,
    min_area_px: int = 0,
    pyramid_levels: int = 0,
) -> BlockResult:
    """Infer the tissue rectangles of some blocks and write their mask (and probability) chunks.

    Each block's pixels are read once (its rectangles' bounding box plus the
    halo); every forward covers at most ``forward_chunks`` chunks
    (:func:`slidejob.geometry.forward_shape`: ``N`` or ``"RxC"``; ``"auto"``
    by the device and precision the model runs in, :func:`slidejob.geometry.resolve_forward_chunks`)
    of a rectangle plus the halo, cut from that read.  On CPUs ``auto`` covers 2 × 4
    chunks in bf16 and 2 × 2 in fp32 (larger inputs cost less halo per pixel but
    take more memory); on GPUs 4 × 4, whole blocks, in batches.

    With ``clip_to_tissue``, cancer calls on bare glass (:func:`slidejob.tissue.glass_mask`
    of the pixels themselves) are set to 0; probabilities are written as the model gave them.
    Lesions of fewer than ``min_area_px`` pixels that lie inside a block are
    removed before anything is written (:func:`slidejob.stats.remove_small_interior`).
    Pyramid levels 1..``pyramid_levels`` are written from the block too
    (:func:`slidejob.maskstore.write_levels`): the caller sees to it that each
    of their chunks lies inside one block (2**pyramid_levels divides the
    block side), so no pass over level 0 is needed for them.

    While a block's mask is in memory the task also reduces it for the
    statistics (one :class:`~slidejob.stats.ChunkPartial` per chunk) and
    traces the lesions that lie wholly inside it for the GeoJSON export, so
    neither needs a second pass over the mask.

    Each chunk is written by exactly one task, so a retried task (a worker
    died) rewrites the same bytes and returns the same result.
    """
    stage_s = dict.fromkeys(TASK_STAGES, 0.0)
    t = time.perf_counter()
    model = get_model(spec)
    forward_chunks = geometry.resolve_forward_chunks(forward_chunks, model.precision, model.device.type)
    t = _lap(stage_s, "model", t)
    image = ChunkWriter(Path(tiles_path) / chunkstore.LEVEL0)
    shape = (int(image.shape[0]), int(image.shape[1]))
    jobs: list[tuple[int, geometry.Window, npt.NDArray[np.uint8]]] = []
    bounds: list[geometry.Rect] = []
    for b, rects in enumerate(blocks):
        bound = geometry.bounding_rect(rects)
        bounds.append(bound)
        region_win = geometry.region_window(bound, halo_px=halo_px, shape_px=shape)
        region = read_window(image, region_win)
        for rect in rects:
            for piece in geometry.split_rect(rect, forward_chunks):
                win = geometry.rect_window(piece, halo_px=halo_px, shape_px=shape)
                jobs.append((b, win, geometry.cut_window(region, region_win, win)))
    mask_writer = ChunkWriter(Path(mask_path) / "0")
    prob_writer = ChunkWriter(Path(prob_path) / "0") if prob_path else None
    shapes = [
        (min(r1 * CHUNK_PX, shape[0]) - r0 * CHUNK_PX, min(c1 * CHUNK_PX, shape[1]) - c0 * CHUNK_PX)
        for r0, c0, r1, c1 in bounds
    ]
    masks = [np.zeros(hw, np.uint8) for hw in shapes]
    probs8 = [np.zeros(hw, np.uint8) for hw in shapes] if prob_writer is not None else None
    _lap(stage_s, "read", t)

    margin_px = geometry.forward_margin(halo_px)  # the forwards need not return the halo's outputs

    def place(i: int, p: npt.NDArray[np.float32]) -> None:
        # Keep the window's centre: thresholded (and clipped off glass) into the block's mask canvas.
        b, win, x = jobs[i]
        crop = win.crop()
        rows, cols = crop
        kept = p[rows.start - margin_px : rows.stop - margin_px, cols.start - margin_px : cols.stop - margin_px]
        mask = (kept >= threshold).astype(np.uint8)
        if clip_to_tissue and mask.any():  # no call, nothing to clip: most windows of a slide
            mask[tissue.glass_mask(x[crop])] = 0
        oy, ox = win.y0 - bounds[b][0] * CHUNK_PX, win.x0 - bounds[b][1] * CHUNK_PX
        kept_rows, kept_cols = slice(oy, oy + mask.shape[0]), slice(ox, ox + mask.shape[1])
        masks[b][kept_rows, kept_cols] = mask
        if probs8 is not None:
            probs8[b][kept_rows, kept_cols] = np.round(kept * 255).astype(np.uint8)

    t = time.perf_counter()
    stage_s["forward"] = predict_windows(model, [x for _, _, x in jobs], batch_size, place, margin_px)
    stage_s["place"] = time.perf_counter() - t - stage_s["forward"]
    partials: list[stats.ChunkPartial] = []
    outlines: dict[int, str] = {}
    small_removed = 0
    for b, (rects, bound) in enumerate(zip(blocks, bounds)):
        by, bx = bound[0] * CHUNK_PX, bound[1] * CHUNK_PX
        t = time.perf_counter()
        # One labelling of the block serves the small-lesion removal and the outlines.
        labelled = stats.label_components(masks[b])
        removed = stats.remove_small_interior(masks[b], min_area_px, labelled=labelled)
        small_removed += int(removed.sum())
        t = _lap(stage_s, "lesions", t)
        for r0, c0, r1, c1 in rects:
            for r in range(r0, r1):
                for c in range(c0, c1):
                    rows = slice(r * CHUNK_PX - by, (r + 1) * CHUNK_PX - by)
                    cols = slice(c * CHUNK_PX - bx, (c + 1) * CHUNK_PX - bx)
                    chunk = masks[b][rows, cols]
                    mask_writer.write((r, c), chunk)
                    if prob_writer is not None and probs8 is not None:
                        prob_writer.write((r, c), probs8[b][rows, cols])
                    # The block's labels, cut to the chunk: no labelling of the chunk of its own.
                    partials.append(stats.partial_from_array(
                        chunk, r * CHUNK_PX, c * CHUNK_PX, removed=removed,
                        block_labels=labelled[0][rows, cols] if labelled[1] else None))
        t = _lap(stage_s, "write", t)
        outlines.update(outline.interior_outlines(masks[b], by, bx, height_px=shape[0], width_px=shape[1],
                                                  labelled=labelled, removed=removed))
        t = _lap(stage_s, "outlines", t)
        if pyramid_levels:
            _write_block_levels(mask_path, masks[b], bound, shape, pyramid_levels, "max")
            if prob_path is not None and probs8 is not None:
                _write_block_levels(prob_path, probs8[b], bound, shape, pyramid_levels, "mean")
        _lap(stage_s, "levels", t)
    runtime = {**runtime_of(model), "forward_chunks": forward_chunks}  # what "auto" became here
    return BlockResult(len(partials), partials, outlines, small_removed, runtime, stage_s)


def _lap(stage_s: dict[str, float], stage: str, since: float) -> float:
    """Add the seconds since ``since`` to ``stage``; returns now, the next stage's start."""
    now = time.perf_counter()
    stage_s[stage] += now - since
    return now


def _write_block_levels(
    path: str, canvas: npt.NDArray[np.uint8], bound: geometry.Rect, shape: tuple[int, int], levels: int, reducer: str
) -> None:
    """Levels 1..``levels`` above a block's canvas, widened to whole chunks of level ``levels`` (zeros: absent)."""
    step = 1 << levels
    r0, c0 = bound[0] // step * step, bound[1] // step * step
    y1 = min(-(-bound[2] // step) * step * CHUNK_PX, shape[0])
    x1 = min(-(-bound[3] // step) * step * CHUNK_PX, shape[1])
    region = np.zeros((y1 - r0 * CHUNK_PX, x1 - c0 * CHUNK_PX), np.uint8)
    oy, ox = (bound[0] - r0) * CHUNK_PX, (bound[1] - c0) * CHUNK_PX
    region[oy : oy + canvas.shape[0], ox : ox + canvas.shape[1]] = canvas
    maskstore.write_levels(Path(path), region, (r0, c0), levels, reducer=reducer)


def predict_one_pass(model: Any, image: npt.NDArray[np.uint8], halo_px: int) -> npt.NDArray[np.float32]:
    """Probabilities of a whole (small) image in one forward, padded exactly as blocks are.

    The reference the stitched result is compared with.
    """
    window = geometry.one_pass_window(image.shape[:2], halo_px)
    padded = geometry.pad_window(image, window.pad)
    return model.predict_proba(padded[None])[0][window.crop()]
