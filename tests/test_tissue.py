from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from slidejob import tissue
from slidejob.synthetic import GLASS_RGB, render_block


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A 200x300 thumbnail: H&E tissue, pale tissue, green pen, a black border; with the true tissue mask."""
    img = render_block(0, 0, 200, 300, tissue_boxes=[(20, 20, 120, 120)], pale_boxes=[(130, 20, 190, 120)])
    truth = np.zeros((200, 300), bool)
    truth[20:120, 20:120] = True
    truth[130:190, 20:120] = True
    img[40:160, 180:190] = (40, 160, 60)  # green marker stroke on glass
    img[:, 285:] = (5, 5, 5)  # black scanner border
    return img, truth


def test_detects_tissue_keeps_pale_drops_pen_and_border() -> None:
    img, truth = _scene()
    mask = tissue.detect_tissue(img)
    assert mask[truth].mean() > 0.99  # pale tissue included
    near = ndimage.binary_dilation(truth, iterations=1)  # the 3x3 smoothing may grow edges by a pixel
    assert not mask[~near].any()  # glass, pen and border excluded
    assert not mask[40:160, 180:190].any()
    assert not mask[:, 285:].any()


def test_glass_only_is_empty() -> None:
    img = np.empty((64, 64, 3), np.uint8)
    img[...] = GLASS_RGB
    img = (img.astype(int) + np.random.default_rng(0).integers(-3, 4, img.shape)).clip(0, 255).astype(np.uint8)
    assert not tissue.detect_tissue(img).any()


def test_small_holes_filled_large_holes_kept() -> None:
    img = render_block(0, 0, 400, 400, tissue_boxes=[(0, 0, 400, 400)])
    img[100:103, 100:103] = GLASS_RGB  # a 9 px lumen: filled
    img[200:350, 200:350] = GLASS_RGB  # a large gap: stays glass
    mask = tissue.detect_tissue(img)
    assert mask[100:103, 100:103].all()
    assert not mask[210:340, 210:340].any()


def test_otsu_separates_two_modes() -> None:
    values = np.concatenate([np.full(100, 0.02), np.full(100, 0.4)])
    assert 0.02 < tissue.otsu_threshold(values) <= 0.4


@pytest.mark.parametrize(("h", "w"), [(1, 700), (700, 1), (300, 200), (1024, 1024), (1500, 1100)])
def test_chunk_fraction_exact_on_integer_downsample(h: int, w: int) -> None:
    rng = np.random.default_rng(h * 7 + w)
    level0 = rng.random((h, w)) > 0.7
    ds = 4
    # Thumbnail pixel = "any tissue" would bias; use a level-0 mask that is constant on 4x4 blocks.
    thumb = level0[::ds, ::ds]
    level0 = np.repeat(np.repeat(thumb, ds, 0), ds, 1)[:h, :w]
    frac = tissue.chunk_tissue_fraction(thumb, downsample_yx=(ds, ds), level0_shape_px=(h, w))
    assert frac.shape == (-(-h // 512), -(-w // 512))
    for cy in range(frac.shape[0]):
        for cx in range(frac.shape[1]):
            c = level0[cy * 512 : (cy + 1) * 512, cx * 512 : (cx + 1) * 512]
            t = thumb[cy * 128 : cy * 128 + -(-c.shape[0] // ds), cx * 128 : cx * 128 + -(-c.shape[1] // ds)]
            assert frac[cy, cx] == pytest.approx(t.mean(), abs=1e-6)


def test_grid_text_roundtrip() -> None:
    g = np.random.default_rng(1).random((7, 5)) > 0.5
    np.testing.assert_array_equal(tissue.text_to_grid(tissue.grid_to_text(g)), g)


@pytest.mark.parametrize(("h", "w", "factor"),
                         [(64, 48, 4), (61, 50, 8), (5, 4, 2), (1, 7, 32), (100, 33, 3), (40, 50, 16), (33, 17, 17)])
def test_block_mean_downsample_matches_numpy(h: int, w: int, factor: int) -> None:
    # Coarse values make exact halves common: they round to even, as np.round does.
    rng = np.random.default_rng(h * w)
    # All-white boxes: the largest sums (16² x 255 is the most a uint16 sum holds; 17 takes uint32).
    for img in (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (rng.integers(0, 5, (h, w, 3)) * 63).astype(np.uint8),
                np.full((h, w, 3), 255, np.uint8)):
        out = tissue.block_mean_downsample(img, factor)
        oh, ow = -(-h // factor), -(-w // factor)
        padded = np.pad(img, ((0, oh * factor - h), (0, ow * factor - w), (0, 0)), mode="edge")
        ref = np.round(padded.reshape(oh, factor, ow, factor, 3).astype(np.float64).mean(axis=(1, 3)))
        np.testing.assert_array_equal(out, ref.astype(np.uint8))


def test_glass_mask_marks_glass_not_tissue_edges() -> None:
    img = render_block(0, 0, 256, 256, tissue_boxes=[(0, 0, 256, 128)], pale_boxes=[(0, 128, 64, 256)])
    glass = tissue.glass_mask(img)
    assert glass.shape == (256, 256)
    assert not glass[:, :128].any() and not glass[:64, 128:].any()  # tissue, pale tissue kept
    assert glass[120:, 160:].all()  # glass well away from tissue
    assert not glass[:, 128:140].any()  # tissue edges are grown, never cut


def test_saturation_value_is_hsv_without_the_hue_for_every_colour() -> None:
    # Glass clipping on the inference path uses it; any difference would move the mask.
    from slidejob.tissue import hsv, saturation_value

    rg = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1).reshape(-1, 2)
    for blue in np.array_split(np.arange(256), 8):
        rgb = np.concatenate([np.repeat(rg, len(blue), 0), np.tile(blue, len(rg))[:, None]], 1)
        rgb = rgb.astype(np.uint8)[:, None, :]
        _, sat, val = hsv(rgb)
        sat2, val2 = saturation_value(rgb)
        np.testing.assert_array_equal(sat2, sat)
        np.testing.assert_array_equal(val2, val)


@pytest.mark.parametrize("shape", [(512, 512), (33, 65), (1, 7), (7, 1), (2, 2), (1, 1)])
def test_median3x3_equals_scipys_median_filter(shape: tuple[int, int]) -> None:
    from scipy import ndimage

    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    # Continuous values, and values with many ties (a median network must still pick the right one).
    for image in (rng.random(shape, dtype=np.float32), rng.integers(0, 3, shape).astype(np.float32)):
        np.testing.assert_array_equal(tissue.median3x3(image), ndimage.median_filter(image, size=3, mode="nearest"))
