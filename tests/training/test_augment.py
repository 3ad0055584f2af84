from __future__ import annotations

import numpy as np
import pytest

from slidejob.training.augment import Augmentation, augment, dihedral, random_crop


def _tile(side_px: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(side_px, side_px, 3), dtype=np.uint8)
    mask = image[..., 0] > 128  # the mask is a function of the pixels, so alignment is checkable
    return image, mask


def test_crop_flip_rotate_keep_mask_aligned_with_image() -> None:
    image, mask = _tile()
    no_colour = Augmentation(stain_sigma=0, hue_turns=0, saturation=0, brightness=0, contrast=0)
    for seed in range(16):
        out, out_mask = augment(image, mask, crop_px=24, aug=no_colour, rng=np.random.default_rng(seed))
        assert out.shape == (24, 24, 3) and out.dtype == np.float32 and out_mask.shape == (24, 24)
        np.testing.assert_array_equal(out_mask, np.round(out[..., 0] * 255) > 128)


def test_colour_jitter_changes_colour_not_mask_and_stays_in_range() -> None:
    image, mask = _tile()
    plain = Augmentation(flips=False, stain_sigma=0, hue_turns=0, saturation=0, brightness=0, contrast=0)
    reference, reference_mask = augment(image, mask, crop_px=40, aug=plain, rng=np.random.default_rng(1))
    jittered, jittered_mask = augment(image, mask, crop_px=40, aug=Augmentation(flips=False),
                                      rng=np.random.default_rng(1))
    np.testing.assert_array_equal(jittered_mask, reference_mask)
    assert 0.0 <= jittered.min() and jittered.max() <= 1.0
    difference = np.abs(jittered - reference).mean()
    assert 0.001 < difference < 0.15  # visible, but still the same tissue


def test_same_seed_same_crop() -> None:
    image, mask = _tile()
    a = augment(image, mask, crop_px=16, aug=Augmentation(), rng=np.random.default_rng(7))
    b = augment(image, mask, crop_px=16, aug=Augmentation(), rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_white_stays_nearly_white_under_stain_jitter() -> None:
    # Background glass has no stain; scaling stain amounts must not tint it much.
    white = np.full((8, 8, 3), 255, np.uint8)
    out, _ = augment(white, np.zeros((8, 8), bool), crop_px=8,
                     aug=Augmentation(hue_turns=0, saturation=0, brightness=0, contrast=0),
                     rng=np.random.default_rng(0))
    assert out.min() > 0.8


def test_eight_distinct_symmetries() -> None:
    a = np.arange(9).reshape(3, 3)
    assert len({dihedral(a, k).tobytes() for k in range(8)}) == 8


def test_crop_larger_than_tile_raises() -> None:
    image, mask = _tile(16)
    with pytest.raises(ValueError, match="smaller than the 24 px"):
        random_crop(image, mask, 24, np.random.default_rng(0))
