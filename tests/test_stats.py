"""Lesion statistics: chunk partials merged across chunk borders equal labelling the whole mask."""

from __future__ import annotations

import math
from pathlib import Path

import dask
import numpy as np
import numpy.typing as npt
import pytest
import zarr
from scipy import ndimage
from scipy.spatial import ConvexHull

from slidejob import maskstore, stats
from slidejob.stats import (
    CONNECTIVITY_8,
    merge_partials,
    partial_from_array,
    present_chunks,
    statistics_graph,
)

CHUNK = 512


def write_mask_store(
    path: Path,
    mask: npt.NDArray[np.uint8],
    *,
    mpp_um: float | None = 0.5,
    present: npt.NDArray[np.bool_] | None = None,
    tissue_fraction: npt.NDArray[np.float32] | None = None,
) -> Path:
    """A mask store as `slidejob run` writes it: level 0 chunk by chunk (``present``), then the pyramid."""
    h, w = mask.shape
    grid = (-(-h // CHUNK), -(-w // CHUNK))
    present = np.ones(grid, bool) if present is None else present
    tf = np.asarray(present, np.float32) if tissue_fraction is None else tissue_fraction
    attrs = {
        "slide": {"mpp_um": mpp_um, "fingerprint": "f" * 16, "path": "s.tif", "height_px": h, "width_px": w},
        "slide_id": path.parent.name,
        "threshold": 0.5,
    }
    root = maskstore.create_mask_store(
        path, height_px=h, width_px=w, mpp_um=mpp_um, attributes=attrs, tissue_fraction=tf
    )
    level0 = zarr.open_array(path / "0", mode="r+")
    for cy, cx in zip(*np.nonzero(present)):
        sl = np.s_[cy * CHUNK : (cy + 1) * CHUNK, cx * CHUNK : (cx + 1) * CHUNK]
        level0[sl] = mask[sl]
    level = np.where(np.kron(present, np.ones((CHUNK, CHUNK), bool))[:h, :w], mask, 0).astype(np.uint8)
    for i in range(1, maskstore.n_levels_for(h, w)):
        level = maskstore.downsample_max(level)
        root[str(i)][...] = level
    return path


def known_lesions_mask() -> tuple[npt.NDArray[np.uint8], list[int]]:
    """1300×1100 px (not a multiple of 512) with lesions placed on chunk borders; returns mask and areas."""
    m = np.zeros((1300, 1100), np.uint8)
    areas = []
    m[100:200, 450:600] = 1  # crosses the vertical border x = 512
    areas.append(100 * 150)
    m[480:560, 480:560] = 1  # cut by four chunk borders at the corner (512, 512)
    areas.append(80 * 80)
    m[700:750, 100:150] = 1  # two squares touching only at a corner: one lesion under 8-connectivity
    m[750:800, 150:200] = 1
    areas.append(2 * 50 * 50)
    m[1000:1024, 490:512] = 1  # squares meeting only at the chunk corner (1024, 512): diagonal chunks
    m[1024:1050, 512:540] = 1
    areas.append(24 * 22 + 26 * 28)
    m[490:512, 1024:1050] = 1  # ... and at (512, 1024) the other way: anti-diagonal chunks
    m[512:540, 1000:1024] = 1
    areas.append(22 * 26 + 28 * 24)
    m[300:400, 700:800] = 1  # a lesion with a hole
    m[330:370, 730:770] = 0
    areas.append(100 * 100 - 40 * 40)
    m[350, 750] = 1  # an island inside the hole: its own lesion
    areas.append(1)
    m[1299, 1099] = 1  # the slide's last pixel
    areas.append(1)
    return m, areas


def reference(mask: npt.NDArray[np.uint8]) -> list[dict[str, object]]:
    """Lesions of the whole mask by scipy.ndimage.label with the same 8-connectivity structure."""
    labels, _ = ndimage.label(mask, structure=CONNECTIVITY_8)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        own = labels[sl] == i
        rows, cols = np.nonzero(own)
        corners = np.concatenate([np.stack([rows + dy, cols + dx], 1) for dy in (0, 1) for dx in (0, 1)])
        corners = np.unique(corners, axis=0)
        if len(corners) > 4 and np.linalg.matrix_rank(corners - corners[0]) == 2:
            corners = corners[ConvexHull(corners).vertices]
        d = corners[:, None, :] - corners[None, :, :]
        out.append(
            {
                "area_px": int(own.sum()),
                "bbox_px": (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop),
                "centroid_yx_px": (rows.mean() + sl[0].start + 0.5, cols.mean() + sl[1].start + 0.5),
                "diameter_px": math.sqrt(int((d * d).sum(-1).max())),
            }
        )
    return out


def assert_matches_reference(stats, mask: npt.NDArray[np.uint8]) -> None:  # type: ignore[no-untyped-def]
    ref = reference(mask)
    assert stats.lesion_count == len(ref) == len(stats.lesions)
    assert stats.cancer_area_px == int((mask != 0).sum())
    for lesion, expected in zip(stats.lesions, ref):
        assert lesion.area_px == expected["area_px"]
        assert lesion.bbox_px == expected["bbox_px"]
        assert lesion.centroid_yx_px == pytest.approx(expected["centroid_yx_px"], abs=1e-9)
        assert lesion.diameter_px == pytest.approx(expected["diameter_px"], abs=1e-9)


def compute(mask_path: Path):  # type: ignore[no-untyped-def]
    return dask.compute(statistics_graph(mask_path))[0]


def test_known_lesions_exact(tmp_path: Path) -> None:
    mask, areas = known_lesions_mask()
    path = write_mask_store(tmp_path / "s" / "mask.ome.zarr", mask, mpp_um=0.25)
    stats = compute(path)
    assert stats.lesion_count == 8
    assert sorted(les.area_px for les in stats.lesions) == sorted(areas)
    assert stats.cancer_area_px == sum(areas)
    by_bbox = {les.bbox_px: les for les in stats.lesions}
    assert by_bbox[(480, 480, 560, 560)].area_px == 6400
    assert by_bbox[(480, 480, 560, 560)].diameter_px == pytest.approx(80 * math.sqrt(2))
    assert by_bbox[(100, 450, 200, 600)].diameter_px == pytest.approx(math.hypot(100, 150))
    assert by_bbox[(700, 100, 800, 200)].area_px == 5000
    assert by_bbox[(1000, 490, 1050, 540)].area_px == 1256
    assert by_bbox[(490, 1000, 540, 1050)].area_px == 1244
    assert by_bbox[(300, 700, 400, 800)].area_px == 8400
    assert by_bbox[(1299, 1099, 1300, 1100)].diameter_px == pytest.approx(math.sqrt(2))
    # 0.25 µm/px: the largest diameter is the 100×150 px lesion's, 180 px = 0.045 mm: isolated tumour cells.
    assert stats.largest_diameter_px == pytest.approx(math.hypot(100, 150))
    assert stats.largest_diameter_mm == pytest.approx(math.hypot(100, 150) * 0.25e-3)
    assert stats.size_category == "itc"
    assert stats.largest_lesion_area_px == 15000
    assert stats.largest_lesion_area_mm2 == pytest.approx(15000 * 0.25e-3**2)
    assert stats.tissue_area_px == 1300 * 1100
    assert stats.cancer_fraction == pytest.approx(sum(areas) / (1300 * 1100))
    assert [les.lesion_id for les in stats.lesions] == list(range(1, 9))
    assert_matches_reference(stats, mask)


@pytest.mark.parametrize(
    ("target_mm", "category"),
    [
        (0.1, "itc"),
        (0.2, "micrometastasis"),
        (1.0, "micrometastasis"),
        (2.0, "micrometastasis"),
        (2.5, "macrometastasis"),
    ],
)
def test_size_category_thresholds(tmp_path: Path, target_mm: float, category: str) -> None:
    mask = np.zeros((600, 600), np.uint8)
    mask[10:310, 10:410] = 1  # diameter 500 px
    mpp_um = target_mm * 1000 / 500
    stats = compute(write_mask_store(tmp_path / "m.ome.zarr", mask, mpp_um=mpp_um))
    assert stats.largest_diameter_mm == pytest.approx(target_mm)
    assert stats.size_category == category


def test_unknown_mpp_gives_null_mm_never_a_guess(tmp_path: Path) -> None:
    mask, areas = known_lesions_mask()
    stats = compute(write_mask_store(tmp_path / "m.ome.zarr", mask, mpp_um=None))
    assert stats.mpp_um is None
    assert stats.size_category is None
    assert stats.cancer_area_px == sum(areas)
    for value in (
        stats.tissue_area_mm2,
        stats.cancer_area_mm2,
        stats.largest_diameter_mm,
        stats.largest_lesion_area_mm2,
    ):
        assert value is None
    assert all(les.area_mm2 is None and les.diameter_mm is None for les in stats.lesions)


def test_no_lesion_is_category_none(tmp_path: Path) -> None:
    stats = compute(write_mask_store(tmp_path / "m.ome.zarr", np.zeros((700, 900), np.uint8), mpp_um=None))
    assert (stats.lesion_count, stats.cancer_area_px, stats.size_category) == (0, 0, "none")
    assert stats.cancer_fraction == 0.0


def blobs(shape: tuple[int, int], seed: int) -> npt.NDArray[np.uint8]:
    """Irregular lesions of all sizes (a few hundred per megapixel), many crossing chunk borders."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), 8)
    return (smooth > np.quantile(smooth, 0.75)).astype(np.uint8)


@pytest.mark.parametrize(
    "shape", [(1300, 1100), (1024, 1536), (300, 200), (1, 1500), (1500, 1), (513, 1)], ids=str
)
def test_graph_equals_whole_mask_label(tmp_path: Path, shape: tuple[int, int]) -> None:
    mask = blobs(shape, seed=sum(shape))
    if 1 in shape:
        mask = (np.arange(mask.size).reshape(shape) % 7 < 4).astype(np.uint8)
        mask[(510, 0) if shape[1] == 1 else (0, 510)] = 1  # a run across the chunk border at 512
    stats = compute(write_mask_store(tmp_path / "m.ome.zarr", mask))
    assert_matches_reference(stats, mask)


def test_only_tissue_chunks_present(tmp_path: Path) -> None:
    mask = blobs((1200, 1600), seed=3)
    present = np.array([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]], bool)
    mask[~np.kron(present, np.ones((CHUNK, CHUNK), bool))[:1200, :1600]] = 0  # background chunks read 0
    fraction = np.where(present, 0.5, 0.0).astype(np.float32)
    path = write_mask_store(tmp_path / "m.ome.zarr", mask, present=present, tissue_fraction=fraction)
    assert present_chunks(path) == sorted(zip(*map(list, np.nonzero(present))))
    stats = compute(path)
    assert_matches_reference(stats, mask)
    # Σ fraction × chunk area, the last row and column clipped at the slide's edge (1200 = 2·512 + 176).
    rows, cols = np.array([512, 512, 176]), np.array([512, 512, 512, 64])
    assert stats.tissue_area_px == round(float((fraction * np.outer(rows, cols)).sum()))


def test_on_a_real_local_cluster(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    mask, _ = known_lesions_mask()
    path = write_mask_store(tmp_path / "m.ome.zarr", mask, mpp_um=0.25)
    graph = statistics_graph(path)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        stats = dask.compute(graph)[0]
    assert stats == compute(path)
    assert_matches_reference(stats, mask)


def test_partials_in_memory_any_chunk_size() -> None:
    # The pure core does not care about the chunk size: a 7-px grid puts borders everywhere.
    mask = blobs((61, 47), seed=7)
    parts = [
        partial_from_array(mask[y : y + 7, x : x + 7], y, x) for y in range(0, 61, 7) for x in range(0, 47, 7)
    ]
    stats = merge_partials(parts, height_px=61, width_px=47, mpp_um=None, tissue_area_px=61 * 47)
    assert_matches_reference(stats, mask)


def test_partials_of_empty_chunks_are_tiny_and_merge_the_same() -> None:
    # A slide's partials all reach the client: a chunk without cancer keeps no edges, and
    # edges are stored in the narrowest type; the merge is exact with such chunks anywhere.
    import pickle

    empty = partial_from_array(np.zeros((512, 512), np.uint8), 0, 512)
    assert empty.n_components == 0 and empty.top.size == empty.left.size == 0
    assert len(pickle.dumps(empty)) < 1024
    mask = blobs((61, 47), seed=3)
    mask[14:28, :] = 0  # two rows of 7-px chunks without cancer
    mask[:, 21:28] = 0
    parts = [
        partial_from_array(mask[y : y + 7, x : x + 7], y, x) for y in range(0, 61, 7) for x in range(0, 47, 7)
    ]
    assert any(p.n_components == 0 for p in parts) and all(p.top.dtype == np.uint8 for p in parts)
    stats = merge_partials(parts, height_px=61, width_px=47, mpp_um=None, tissue_area_px=61 * 47)
    assert_matches_reference(stats, mask)


@pytest.mark.parametrize("block_px", [512, 1024])
def test_small_lesions_removed_by_blocks_then_merge_equal_removing_them_from_the_whole_mask(
    tmp_path: Path, block_px: int
) -> None:
    # How `slidejob run` removes small lesions: each task drops the small ones inside its
    # block, the merge finds those across block borders, and they are erased from the store.
    rng = np.random.default_rng(7)
    mask = (ndimage.uniform_filter(rng.random((1100, 1300)), 9) > 0.52).astype(np.uint8)
    min_px = 60
    h, w = mask.shape
    blocks = mask.copy()
    removed_in_blocks = sum(
        int(stats.remove_small_interior(blocks[y : y + block_px, x : x + block_px], min_px).sum())
        for y in range(0, h, block_px)
        for x in range(0, w, block_px)
    )
    path = write_mask_store(tmp_path / "s" / "mask.ome.zarr", blocks)
    chunks = [(y, x) for y in range(0, h, CHUNK) for x in range(0, w, CHUNK)]
    merged = stats.statistics_from_partials(
        path, [stats.partial_from_array(blocks[y : y + CHUNK, x : x + CHUNK], y, x) for y, x in chunks]
    )
    kept, small = stats.drop_small_lesions(merged, min_px)
    rewritten = maskstore.erase_components(path, [(les.bbox_px, les.first_pixel_yx) for les in small], levels=2)

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    too_small = np.bincount(labels.ravel()) < min_px
    too_small[0] = False
    expected = np.where(too_small[labels], 0, mask).astype(np.uint8)
    assert removed_in_blocks > 1000 and len(small) > 10 and len(rewritten) > 1  # both paths taken
    assert removed_in_blocks + len(small) == int(too_small.sum())
    np.testing.assert_array_equal(zarr.open_array(path / "0", mode="r")[...], expected)
    # Levels 1 and 2 above the rewritten chunks follow (3 is the caller's next pass).
    level = expected
    for lv in (1, 2):
        level = maskstore.downsample_max(level)
        np.testing.assert_array_equal(zarr.open_array(path / str(lv), mode="r")[...], level)
    fresh = stats.statistics_from_partials(
        path, [stats.partial_from_array(expected[y : y + CHUNK, x : x + CHUNK], y, x) for y, x in chunks]
    )
    assert kept == fresh
    assert [les.lesion_id for les in kept.lesions] == list(range(1, kept.lesion_count + 1))
    assert min(les.area_px for les in kept.lesions) >= min_px


def test_remove_small_interior_is_the_same_for_any_layout_and_call_value() -> None:
    # The 0/1 contiguous block of an inference task takes the fast path (a bool view, flat clearing);
    # a strided view or a 0/255 mask the general one; all must clear the same pixels.
    rng = np.random.default_rng(3)
    mask = (ndimage.uniform_filter(rng.random((300, 400)), 5) > 0.53).astype(np.uint8)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel())
    expected = mask.copy()
    stats.remove_small_interior(expected, 25)
    assert 0 < int(expected.sum()) < int(mask.sum()) and (sizes[1:] < 25).sum() > 10
    scaled = mask * np.uint8(255)
    stats.remove_small_interior(scaled, 25)
    np.testing.assert_array_equal(scaled, expected * 255)
    wide = np.zeros((300, 800), np.uint8)
    wide[:, ::2] = mask
    strided = wide[:, ::2]
    stats.remove_small_interior(strided, 25)
    np.testing.assert_array_equal(strided, expected)


@pytest.mark.parametrize(("chunk_px", "block_px", "min_px"), [(7, 21, 0), (7, 28, 5), (64, 256, 40)])
def test_partials_from_the_blocks_labels_merge_the_same(chunk_px: int, block_px: int, min_px: int) -> None:
    # An inference task labels its block once; each chunk's partial reuses those labels, under which a
    # lesion may fall into several pieces in one chunk (a U leaving and re-entering it).  The merge must
    # not see the difference, with small lesions removed inside the blocks first.
    rng = np.random.default_rng(chunk_px + block_px)
    h, w = 3 * block_px + 5, 2 * block_px + 3
    mask = (ndimage.uniform_filter(rng.random((h, w)), 3) > 0.5).astype(np.uint8)
    u = mask[:block_px, :block_px]
    u[:] = 0
    u[1:chunk_px, 1] = u[1:chunk_px, 3] = 1  # two bars down to the first chunk's last row...
    u[chunk_px : chunk_px + 2, 1:4] = 1  # ...joined in the chunk below: one lesion, two pieces above
    own, shared = [], []
    n_removed = 0
    for by in range(0, h, block_px):
        for bx in range(0, w, block_px):
            block = mask[by : by + block_px, bx : bx + block_px]
            labelled = stats.label_components(block)
            removed = stats.remove_small_interior(block, min_px, labelled=labelled)
            n_removed += int(removed.sum())
            for y in range(0, block.shape[0], chunk_px):
                for x in range(0, block.shape[1], chunk_px):
                    cut = (slice(y, y + chunk_px), slice(x, x + chunk_px))
                    own.append(partial_from_array(block[cut], by + y, bx + x))
                    shared.append(partial_from_array(block[cut], by + y, bx + x, block_labels=labelled[0][cut],
                                                     removed=removed))
    assert (n_removed > 10) == (min_px > 0)
    pieces = shared[0]
    assert pieces.n_components == 1 and own[0].n_components == 2  # the U's two bars: one label, two pieces
    merge = {"height_px": h, "width_px": w, "mpp_um": 0.5, "tissue_area_px": h * w}
    assert merge_partials(shared, **merge) == merge_partials(own, **merge)
    assert_matches_reference(merge_partials(shared, **merge), mask)


def test_label_components_labels_only_the_box_around_the_calls_and_equals_ndimage() -> None:
    rng = np.random.default_rng(11)
    masks = [np.zeros((64, 80), np.uint8), np.ones((64, 80), np.uint8)]
    for box in [(slice(10, 30), slice(40, 75)), (slice(0, 5), slice(0, 80)), (slice(63, 64), slice(79, 80))]:
        m = np.zeros((64, 80), np.uint8)
        m[box] = rng.random(m[box].shape) > 0.6
        masks.append(m * rng.integers(1, 3))  # any non-zero value is a call
    for m in masks:
        labels, n = stats.label_components(m)
        want, n_want = ndimage.label(m != 0, structure=np.ones((3, 3), bool))
        assert n == n_want and labels.dtype == np.int32 and labels.shape == m.shape
        np.testing.assert_array_equal(labels, want)
