"""Tile geometry: windows, reflect padding, one read cut into many forwards."""

from __future__ import annotations

import numpy as np
import pytest

from slidejob import geometry


def _own_input(image: np.ndarray, win: geometry.Window) -> np.ndarray:
    return geometry.pad_window(image[win.read_y0 : win.read_y1, win.read_x0 : win.read_x1], win.pad)


@pytest.mark.parametrize("seed", range(4))
def test_cut_from_one_region_read_equals_the_one_pass_padding(seed: int) -> None:
    # Reflect padding belongs to the slide's border, so every forward's input is the
    # same slice of the whole slide padded once, as a one-pass forward sees it.
    # (A thin last piece's own read, e.g. a 1-px chunk column, would reflect twice.)
    rng = np.random.default_rng(seed)
    sizes = [(1, 1), (1, 700), (700, 1), (9, 1030), (520, 513), (512, 512), *rng.integers(1, 1800, (40, 2))]
    for h, w in sizes:
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        gh, gw = -(-h // 512), -(-w // 512)
        r0, c0 = rng.integers(0, gh), rng.integers(0, gw)
        rect = (int(r0), int(c0), int(rng.integers(r0 + 1, gh + 1)), int(rng.integers(c0 + 1, gw + 1)))
        halo = int(rng.choice([0, 8, 56, 64]))
        region_win = geometry.region_window(rect, halo_px=halo, shape_px=(h, w))
        region = _own_input(image, region_win)
        whole = geometry.pad_window(image, (halo, halo + 16, halo, halo + 16))
        for piece in geometry.split_rect(rect, int(rng.integers(1, 3))):
            win = geometry.rect_window(piece, halo_px=halo, shape_px=(h, w))
            cut = geometry.cut_window(region, region_win, win)
            assert cut.shape[:2] == win.input_shape and cut.shape[0] % 8 == 0 and cut.shape[1] % 8 == 0
            y, x = win.read_y0 - win.pad[0] + halo, win.read_x0 - win.pad[2] + halo
            expected = whole[y : y + cut.shape[0], x : x + cut.shape[1]]
            np.testing.assert_array_equal(cut, expected, err_msg=f"{(h, w)} {rect} {piece} {halo}")


def test_split_rect_covers_the_rect_once() -> None:
    pieces = geometry.split_rect((1, 2, 6, 5), 2)
    cover = np.zeros((8, 8), int)
    for r0, c0, r1, c1 in pieces:
        assert r1 - r0 <= 2 and c1 - c0 <= 2
        cover[r0:r1, c0:c1] += 1
    expected = np.zeros((8, 8), int)
    expected[1:6, 2:5] = 1
    np.testing.assert_array_equal(cover, expected)
    with pytest.raises(ValueError, match="at least 1"):
        geometry.split_rect((0, 0, 1, 1), 0)


@pytest.mark.parametrize("shape", ["1x2", "2x1", "3x1", (2, 3)])
def test_split_rect_with_oblong_pieces_covers_the_rect_once_in_the_fewest_pieces(shape) -> None:
    rows, cols = geometry.forward_shape(shape)
    for rect in [(0, 0, 4, 4), (1, 2, 6, 3), (0, 0, 1, 5), (2, 1, 3, 2)]:
        pieces = geometry.split_rect(rect, shape)
        cover = np.zeros((8, 8), int)
        for r0, c0, r1, c1 in pieces:
            assert (r1 - r0 <= rows and c1 - c0 <= cols) or (r1 - r0 <= cols and c1 - c0 <= rows)
            cover[r0:r1, c0:c1] += 1
        expected = np.zeros((8, 8), int)
        expected[rect[0] : rect[2], rect[1] : rect[3]] = 1
        np.testing.assert_array_equal(cover, expected)
        h, w = rect[2] - rect[0], rect[3] - rect[1]
        fewest = min(-(-h // rows) * -(-w // cols), -(-h // cols) * -(-w // rows))
        assert len(pieces) == fewest, (shape, rect)


@pytest.mark.parametrize("bad", ["0", "1x0", "x2", "2x2x2", "a", "-1"])
def test_forward_shape_rejects_what_is_not_n_or_rxc(bad: str) -> None:
    with pytest.raises(ValueError, match="forward chunks"):
        geometry.forward_shape(bad)


def test_cut_outside_the_region_is_refused() -> None:
    region_win = geometry.region_window((0, 0, 1, 1), halo_px=8, shape_px=(2000, 2000))
    region = np.zeros((*region_win.input_shape, 3), np.uint8)
    far = geometry.rect_window((2, 2, 3, 3), halo_px=8, shape_px=(2000, 2000))
    with pytest.raises(ValueError, match="does not lie inside"):
        geometry.cut_window(region, region_win, far)
