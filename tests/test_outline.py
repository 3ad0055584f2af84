"""Pixel-edge polygons and the outlines an inference task traces in its block."""

from __future__ import annotations

import json

import numpy as np
from scipy import ndimage

from slidejob import outline


def test_interior_outlines_are_the_lesions_touching_no_block_border_traced_in_place() -> None:
    rng = np.random.default_rng(3)
    block = (ndimage.uniform_filter(rng.random((300, 420)), 7) > 0.56).astype(np.uint8)
    block[0, :] = 0
    block[150:, 0] = 1  # a lesion on the border: left for the merge
    y0, x0 = 1024, 2048
    got = outline.interior_outlines(block, y0, x0, height_px=5000, width_px=6000)

    labels, n = ndimage.label(block, structure=np.ones((3, 3), bool))
    on_border = set(np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]]).tolist())
    expected = {}
    for k in range(1, n + 1):
        if k in on_border:
            continue
        ys, xs = np.nonzero(labels == k)
        first = (ys[0] + y0) * 6000 + xs[0] + x0  # raster order: nonzero's first hit
        polygons = outline.mask_polygons(labels == k)
        geometry = outline.geojson_geometry(polygons, origin_xy=(x0, y0), level=0, height_px=5000, width_px=6000)
        expected[int(first)] = json.dumps(geometry, separators=(",", ":"))
    assert len(expected) > 20 and n - len(expected) >= 1
    assert got == expected


def test_outlines_from_the_labels_of_the_small_lesion_removal_equal_those_traced_afresh() -> None:
    """An inference task labels its block once: removal of small lesions, then outlines from the same labels."""
    from slidejob import stats

    rng = np.random.default_rng(5)
    block = (ndimage.uniform_filter(rng.random((400, 380)), 5) > 0.55).astype(np.uint8)
    afresh = block.copy()
    n_removed = int(stats.remove_small_interior(afresh, 30).sum())
    expected = outline.interior_outlines(afresh, 512, 0, height_px=4000, width_px=4000)

    labelled = stats.label_components(block)
    removed = stats.remove_small_interior(block, 30, labelled=labelled)
    np.testing.assert_array_equal(block, afresh)
    got = outline.interior_outlines(block, 512, 0, height_px=4000, width_px=4000, labelled=labelled, removed=removed)
    assert int(removed.sum()) == n_removed > 10 and len(expected) > 10
    assert got == expected
