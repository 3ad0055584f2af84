"""Tile geometry for seamless inference: which rectangles to infer, their halo windows, padding, cropping.

Pure functions on integers and numpy arrays.  The rules that make stitching
seamless (the mask does not depend on where chunk borders fall):

* every forward's input starts at ``chunk origin - halo_px``; chunk origins
  are multiples of 512 and ``halo_px`` a multiple of 8, so every input is
  aligned to the U-Net's 8-px pooling grid the same way a one-pass forward
  over the whole slide would be;
* the halo is at least the network's receptive radius, so the kept centre
  sees exactly the context it would see in a one-pass forward;
* outside the slide, the input is reflect-padded in both cases alike
  (:func:`pad_window`), then padded up to a multiple of 8 at the far side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from slidejob.chunkstore import CHUNK_PX

Rect = tuple[int, int, int, int]  # chunk rows [r0, r1) × chunk cols [c0, c1)


def halo_for(receptive_radius_px: int, halo_px: int | None = None) -> int:
    """The halo to use: the requested one, or the receptive radius rounded up to a multiple of 8.

    >>> halo_for(51), halo_for(51, 64), halo_for(0)
    (56, 64, 0)
    """
    if halo_px is None:
        halo_px = -(-receptive_radius_px // 8) * 8
    if halo_px < 0 or halo_px % 8:
        raise ValueError(f"halo_px must be a non-negative multiple of 8, got {halo_px}")
    return halo_px


def forward_margin(halo_px: int) -> int:
    """The border of a forward's input whose outputs need not be computed: the halo, rounded down to 8.

    Every window has the whole halo before its kept rectangle (reflect-padded at the slide's borders)
    and at least that after it; the U-Net skips a margin in steps of its 8-px pooling grid
    (:meth:`slidejob.model.UNet.forward`).

    >>> forward_margin(56), forward_margin(60), forward_margin(7)
    (56, 56, 0)
    """
    return halo_px // 8 * 8


def tissue_rectangles(grid: npt.NDArray[np.bool_]) -> list[Rect]:
    """Cover the True cells of a small grid with disjoint rectangles, no False cell included.

    Row runs are merged downwards while the run below is identical, so a
    solid block becomes one rectangle (one forward, one halo) and a ragged
    tissue edge a few thin ones, never dragging glass chunks into the model.

    >>> tissue_rectangles(np.array([[1, 1, 0], [1, 1, 0], [0, 1, 1]], bool))
    [(0, 0, 2, 2), (2, 1, 3, 3)]
    """
    rects: list[Rect] = []
    open_runs: dict[tuple[int, int], int] = {}  # (c0, c1) -> first row
    gh, gw = grid.shape
    for r in range(gh + 1):
        runs: set[tuple[int, int]] = set()
        if r < gh:
            c = 0
            while c < gw:
                if grid[r, c]:
                    c0 = c
                    while c < gw and grid[r, c]:
                        c += 1
                    runs.add((c0, c))
                else:
                    c += 1
        for run in list(open_runs):
            if run not in runs:
                rects.append((open_runs.pop(run), run[0], r, run[1]))
        for run in runs:
            open_runs.setdefault(run, r)
    return sorted(rects)


@dataclass(frozen=True)
class Window:
    """The input window of one forward: what to read, how to pad it, what to keep."""

    #: the rectangle kept, level-0 pixels (clipped to the slide)
    y0: int
    x0: int
    y1: int
    x1: int
    #: the part of the slide read (the rectangle plus halo, clipped)
    read_y0: int
    read_x0: int
    read_y1: int
    read_x1: int
    #: reflect padding added around what was read: top, bottom, left, right
    pad: tuple[int, int, int, int]

    @property
    def input_shape(self) -> tuple[int, int]:
        t, b, left, right = self.pad
        return (self.read_y1 - self.read_y0 + t + b, self.read_x1 - self.read_x0 + left + right)

    def crop(self) -> tuple[slice, slice]:
        """Where the kept rectangle lies in the model's output."""
        oy = self.pad[0] + self.y0 - self.read_y0
        ox = self.pad[2] + self.x0 - self.read_x0
        return slice(oy, oy + self.y1 - self.y0), slice(ox, ox + self.x1 - self.x0)


def _axis(lo: int, hi: int, halo: int, size: int) -> tuple[int, int, int, int]:
    read_lo, read_hi = max(lo - halo, 0), min(hi + halo, size)
    pad_lo = halo - (lo - read_lo)
    pad_hi = halo - (read_hi - hi)
    total = read_hi - read_lo + pad_lo + pad_hi
    pad_hi += -total % 8
    return read_lo, read_hi, pad_lo, pad_hi


def window_for(y0: int, x0: int, y1: int, x1: int, *, halo_px: int, shape_px: tuple[int, int]) -> Window:
    """The input window for keeping level-0 rectangle ``[y0, y1) × [x0, x1)``.

    >>> w = window_for(512, 0, 1024, 512, halo_px=56, shape_px=(1000, 700))
    >>> (w.read_y0, w.read_y1, w.read_x0, w.read_x1), w.pad, w.input_shape
    ((456, 1000, 0, 568), (0, 56, 56, 0), (600, 624))
    """
    h, w = shape_px
    y1, x1 = min(y1, h), min(x1, w)
    ry0, ry1, pt, pb = _axis(y0, y1, halo_px, h)
    rx0, rx1, pl, pr = _axis(x0, x1, halo_px, w)
    return Window(y0, x0, y1, x1, ry0, rx0, ry1, rx1, (pt, pb, pl, pr))


def rect_window(rect: Rect, *, halo_px: int, shape_px: tuple[int, int]) -> Window:
    """:func:`window_for` of a rectangle of chunks."""
    r0, c0, r1, c1 = rect
    return window_for(r0 * CHUNK_PX, c0 * CHUNK_PX, r1 * CHUNK_PX, c1 * CHUNK_PX, halo_px=halo_px, shape_px=shape_px)


def forward_shape(value: int | str | tuple[int, int]) -> tuple[int, int]:
    """The most chunks (rows, cols) one forward covers: ``N`` for N × N, or ``"RxC"``.

    >>> forward_shape(2), forward_shape("1x2"), forward_shape("3"), forward_shape((4, 1))
    ((2, 2), (1, 2), (3, 3), (4, 1))
    """
    if isinstance(value, tuple):
        rows, cols = value
    elif isinstance(value, int) or str(value).strip().isdigit():
        rows = cols = int(value)
    else:
        parts = str(value).lower().replace("×", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"forward chunks must be N or ROWSxCOLS (e.g. 1x2), got {value!r}")
        rows, cols = int(parts[0]), int(parts[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"forward chunks must be at least 1 a side, got {value!r}")
    return int(rows), int(cols)


def forward_label(value: int | str | tuple[int, int]) -> str:
    """:func:`forward_shape` as the ``"RxC"`` that manifests and the config record; ``"auto"`` stays.

    >>> forward_label(2), forward_label(" 1 X 2"), forward_label((4, 1)), forward_label("Auto")
    ('2x2', '1x2', '4x1', 'auto')
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return "{}x{}".format(*forward_shape(value))


#: ``forward-chunks: auto`` on CPUs, by the precision the model runs in.  A forward's activations
#: bound its size: one thread's 1024² + halo forward held ~245 MB in fp32 and ~165 MB in bf16, a
#: 1024 x 2048 one ~310 MB in bf16, 2048² ~500 MB.  Larger forwards spend less on the halo: two
#: threads' bf16 forwards (Zen 5, workers' malloc) kept 21.9 MP/s at 2x2, 23.4 at 2x4 and 3x3,
#: 24.5 at 4x4; in fp32 (Xeon) 2x2 was as fast per pixel as larger ones and within memory.
CPU_FORWARD_CHUNKS = {"fp32": "2x2", "bf16": "2x4", "fp16": "2x4"}


#: ``forward-chunks: auto`` on a CUDA device: a whole 4×4-chunk block (2160² with the default halo) a
#: forward, in batches (``run.batch-size-gpu``): a GPU has the memory, and the halo's share is smallest.
GPU_FORWARD_CHUNKS = "4x4"


def resolve_forward_chunks(value: int | str | tuple[int, int], precision: str, device: str = "cpu") -> str:
    """The ``"RxC"`` a forward covers: ``value``, or for ``"auto"`` what suits the device the model runs on.

    ``auto`` is :data:`GPU_FORWARD_CHUNKS` on CUDA and :data:`CPU_FORWARD_CHUNKS` of ``precision`` on a
    CPU (a GPU worker that could not open its device runs on its CPU, with a CPU's forwards).

    >>> resolve_forward_chunks("auto", "bf16"), resolve_forward_chunks("auto", "fp32"), resolve_forward_chunks(3, "bf16")
    ('2x4', '2x2', '3x3')
    >>> resolve_forward_chunks("auto", "bf16", "cuda"), resolve_forward_chunks("1x2", "bf16", "cuda")
    ('4x4', '1x2')
    """
    label = forward_label(value)
    if label != "auto":
        return label
    return GPU_FORWARD_CHUNKS if device == "cuda" else CPU_FORWARD_CHUNKS.get(precision, "2x2")


def split_rect(rect: Rect, max_chunks: int | str | tuple[int, int]) -> list[Rect]:
    """Cut a rectangle of chunks into pieces of at most ``max_chunks`` (:func:`forward_shape`) chunks.

    A piece is rows × cols chunks, or cols × rows where that takes fewer
    pieces (a tall rectangle cut into wide pieces would waste them).

    >>> split_rect((0, 0, 3, 2), 2)
    [(0, 0, 2, 2), (2, 0, 3, 2)]
    >>> split_rect((0, 0, 2, 2), "1x2"), split_rect((0, 0, 2, 1), "1x2")
    ([(0, 0, 1, 2), (1, 0, 2, 2)], [(0, 0, 2, 1)])
    """
    rows, cols = forward_shape(max_chunks)
    r0, c0, r1, c1 = rect

    def n_pieces(h: int, w: int) -> int:
        return -(-(r1 - r0) // h) * -(-(c1 - c0) // w)

    if n_pieces(cols, rows) < n_pieces(rows, cols):
        rows, cols = cols, rows
    return [
        (r, c, min(r + rows, r1), min(c + cols, c1))
        for r in range(r0, r1, rows)
        for c in range(c0, c1, cols)
    ]


def bounding_rect(rects: list[Rect]) -> Rect:
    """The smallest rectangle of chunks holding all of ``rects``."""
    return (min(r[0] for r in rects), min(r[1] for r in rects), max(r[2] for r in rects), max(r[3] for r in rects))


def region_window(rect: Rect, *, halo_px: int, shape_px: tuple[int, int]) -> Window:
    """A window to read once and cut the input of every forward inside ``rect`` from (:func:`cut_window`).

    It reaches ``halo_px + 16`` pixels past the rectangle on every side: enough
    for any sub-rectangle's halo and its round-up to a multiple of 8, and, at a
    slide border, enough pixels that the reflection is the slide's own (as a
    one-pass forward over the whole slide pads it) rather than a reflection of
    a thin read.
    """
    margin = halo_px + 16
    h, w = shape_px
    r0, c0, r1, c1 = rect
    y0, x0 = r0 * CHUNK_PX, c0 * CHUNK_PX
    y1, x1 = min(r1 * CHUNK_PX, h), min(c1 * CHUNK_PX, w)
    ry0, ry1 = max(y0 - margin, 0), min(y1 + margin, h)
    rx0, rx1 = max(x0 - margin, 0), min(x1 + margin, w)
    pad = (margin - (y0 - ry0), margin - (ry1 - y1), margin - (x0 - rx0), margin - (rx1 - x1))
    return Window(y0, x0, y1, x1, ry0, rx0, ry1, rx1, pad)


def cut_window(region: npt.NDArray[np.uint8], region_win: Window, win: Window) -> npt.NDArray[np.uint8]:
    """The padded input of ``win`` from the padded pixels of an enclosing :func:`region_window`."""
    oy = (win.read_y0 - win.pad[0]) - (region_win.read_y0 - region_win.pad[0])
    ox = (win.read_x0 - win.pad[2]) - (region_win.read_x0 - region_win.pad[2])
    h, w = win.input_shape
    if oy < 0 or ox < 0 or oy + h > region.shape[0] or ox + w > region.shape[1]:
        raise ValueError(f"window {win} does not lie inside region {region_win}")
    return region[oy : oy + h, ox : ox + w]


def pad_window(pixels: npt.NDArray[np.uint8], pad: tuple[int, int, int, int]) -> npt.NDArray[np.uint8]:
    """Reflect-pad an (H, W, C) window; an axis of one pixel is repeated (reflect needs two).

    numpy reflects repeatedly when a pad is wider than the axis, so slides
    smaller than the halo still pad.
    """
    t, b, left, right = pad
    if not any(pad):
        return pixels
    widths = ((t, b), (left, right), (0, 0))
    if pixels.shape[0] > 1 and pixels.shape[1] > 1:
        return np.pad(pixels, widths, mode="reflect")
    out = pixels
    for axis, (lo, hi) in enumerate(widths[:2]):
        w = [(0, 0)] * pixels.ndim
        w[axis] = (lo, hi)
        out = np.pad(out, w, mode="reflect" if out.shape[axis] > 1 else "edge")
    return out


def one_pass_window(shape_px: tuple[int, int], halo_px: int) -> Window:
    """The window of a single forward over a whole (small) slide, padded exactly as blocks are."""
    return window_for(0, 0, shape_px[0], shape_px[1], halo_px=halo_px, shape_px=shape_px)
