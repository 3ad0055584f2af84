"""Boxes of chunked arrays, assembled from the chunks they overlap.

One pure function shared by the two readers that go past ``zarr.Array`` for
speed: the slide reader (chunks of tifffile's Zarr store) and the chunk store's
writer (chunks of slidejob's own arrays).  zarr's own indexing does the same
work, but sends every chunk through its single event-loop thread.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt


def read_chunked(
    box: tuple[int | slice, ...],
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    read_chunk: Callable[[tuple[int, ...]], npt.NDArray[Any] | None],
    *,
    dtype: Any,
    fill_value: Any,
) -> npt.NDArray[Any]:
    """``array[box]`` of a chunked array, from ``read_chunk(chunk index)`` of each chunk the box overlaps.

    ``box`` holds an int (0 <= i < size) or a step-1 slice per axis (ints drop their axis).
    ``read_chunk`` returns the chunk (whole, or cut at the array's edge) or
    None where it is absent, which reads as ``fill_value``.

    >>> a = np.arange(30).reshape(5, 6)
    >>> chunk = lambda i: a[i[0] * 2 : i[0] * 2 + 2, i[1] * 4 : i[1] * 4 + 4] if i != (0, 0) else None
    >>> read_chunked((slice(1, 4), 3), a.shape, (2, 4), chunk, dtype=a.dtype, fill_value=-1).tolist()
    [-1, 15, 21]
    """
    if len(box) != len(shape):
        raise ValueError(f"box {box} does not have one entry per axis of shape {shape}")
    starts, stops, keep = [], [], []
    for sel, n in zip(box, shape):
        if isinstance(sel, slice):
            start, stop, step = sel.indices(n)
            if step != 1:
                raise ValueError("strided boxes are not supported")
            starts.append(start)
            stops.append(max(start, stop))
            keep.append(True)
        else:
            if not 0 <= int(sel) < n:
                raise IndexError(f"index {sel} is outside an axis of size {n}")
            starts.append(int(sel))
            stops.append(int(sel) + 1)
            keep.append(False)
    # The chunks tile the box, so every pixel is written once: no need to fill it first.
    out = np.empty([b - a for a, b in zip(starts, stops)], dtype=dtype)
    if out.size:
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(starts, stops, chunks)]
        for index in itertools.product(*ranges):
            lo = [max(a, i * c) for a, i, c in zip(starts, index, chunks)]
            hi = [min(b, (i + 1) * c) for b, i, c in zip(stops, index, chunks)]
            target = tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, starts))
            source = tuple(slice(l - i * c, h - i * c) for l, h, i, c in zip(lo, hi, index, chunks))
            chunk = read_chunk(index)
            out[target] = fill_value if chunk is None else chunk[source]
    return out[tuple(slice(None) if k else 0 for k in keep)]
