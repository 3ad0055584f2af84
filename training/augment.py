"""Augmentations that suit H&E tiles: random crops, the 8 flips/rotations, stain and colour jitter.

Pure numpy on one tile at a time, every random draw from the ``Generator``
passed in, so a seeded run augments identically every time.

Tissue has no up or down, so all 8 symmetries of the square are free extra
data.  Colour varies between labs and scanners far more than shape does
(EBHI-Seg alone runs from pale pink to deep violet): the stain jitter scales
and shifts the haematoxylin and eosin amounts in optical-density space
(Tellez et al., 2018), and a small hue/saturation/brightness/contrast jitter
covers what the stain model misses.  No elastic or scale changes: the cells'
size is information at a fixed magnification.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Augmentation", "augment", "dihedral", "random_crop"]

# Ruifrok & Johnston (2001) stain vectors, rows: haematoxylin, eosin, DAB (as in scikit-image).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
# YIQ separates brightness (Y) from chroma (I, Q): hue is a rotation of (I, Q),
# saturation a scaling of it; both stay linear in RGB.
_YIQ_FROM_RGB = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB_FROM_YIQ = np.linalg.inv(_YIQ_FROM_RGB)
# Optical density of an empty (white) pixel is 0; 1/256 keeps log() finite for black.
_OD_FLOOR = 1.0 / 256.0


@dataclass(frozen=True)
class Augmentation:
    """Strength of each augmentation (0 turns one off).

    Attributes
    ----------
    flips
        Apply a random one of the 8 flips/90° rotations.
    stain_sigma
        H and E amounts are scaled by U(1 - σ, 1 + σ) and shifted by U(-σ, σ).
    hue_turns
        Hue rotated by U(-h, h) turns (0.04 ≈ ±14°).
    saturation
        Chroma scaled by U(1 - s, 1 + s).
    brightness
        U(-b, b) added (in 0..1 units).
    contrast
        Scaled by U(1 - c, 1 + c) around the tile's mean.
    """

    flips: bool = True
    stain_sigma: float = 0.05
    hue_turns: float = 0.04
    saturation: float = 0.15
    brightness: float = 0.08
    contrast: float = 0.15

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, recorded in the model card."""
        return asdict(self)


def random_crop(
    image: npt.NDArray[Any], mask: npt.NDArray[Any], size_px: int, rng: np.random.Generator
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """The same random ``size_px`` × ``size_px`` window of ``image`` (H, W, C) and ``mask`` (H, W).

    Raises
    ------
    ValueError
        The tile is smaller than the crop.
    """
    height, width = mask.shape
    if height < size_px or width < size_px:
        raise ValueError(f"tile of {width}×{height} px is smaller than the {size_px} px training crop")
    top = int(rng.integers(0, height - size_px + 1))
    left = int(rng.integers(0, width - size_px + 1))
    window = np.s_[top : top + size_px, left : left + size_px]
    return image[window], mask[window]


def dihedral(array: npt.NDArray[Any], k: int) -> npt.NDArray[Any]:
    """Symmetry ``k`` (0…7) of the square: ``k % 4`` quarter turns, then a left-right flip if ``k >= 4``.

    >>> a = np.arange(4).reshape(2, 2)
    >>> [dihedral(a, k).tolist() for k in (0, 1, 4)]
    [[[0, 1], [2, 3]], [[1, 3], [0, 2]], [[1, 0], [3, 2]]]
    """
    array = np.rot90(array, k % 4, axes=(0, 1))
    return array[:, ::-1] if k >= 4 else array


def _stain_jitter(
    rgb01: npt.NDArray[np.float32], sigma: float, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-sigma, sigma, size=3)
    # HED amounts are linear in optical density, so scale-and-shift of the
    # amounts is one 3×3 matrix and one offset in OD space.
    transform = _HED_FROM_RGB @ np.diag(alpha) @ _RGB_FROM_HED
    offset = beta @ _RGB_FROM_HED
    density = -np.log(np.maximum(rgb01, _OD_FLOOR))
    density = density @ transform.astype(np.float32) + offset.astype(np.float32)
    return np.exp(-np.maximum(density, 0.0)).astype(np.float32)


def _colour_matrix(aug: Augmentation, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    angle = 2 * np.pi * rng.uniform(-aug.hue_turns, aug.hue_turns)
    chroma = rng.uniform(1 - aug.saturation, 1 + aug.saturation)
    cos, sin = np.cos(angle) * chroma, np.sin(angle) * chroma
    in_yiq = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    return _RGB_FROM_YIQ @ in_yiq @ _YIQ_FROM_RGB


def augment(
    image: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_],
    *,
    crop_px: int,
    aug: Augmentation,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """One augmented training crop.

    Parameters
    ----------
    image
        uint8 RGB tile (H, W, 3).
    mask
        bool truth (H, W).
    crop_px
        Side of the square crop.
    aug
        Augmentation strengths.
    rng
        Source of every random draw.

    Returns
    -------
    tuple
        float32 RGB in 0..1 of shape (crop_px, crop_px, 3), and the bool mask (crop_px, crop_px).
    """
    image, mask = random_crop(image, mask, crop_px, rng)
    if aug.flips:
        k = int(rng.integers(0, 8))
        image, mask = dihedral(image, k), dihedral(mask, k)
    rgb = image.astype(np.float32) / 255.0
    if aug.stain_sigma > 0:
        rgb = _stain_jitter(rgb, aug.stain_sigma, rng)
    matrix = _colour_matrix(aug, rng)
    gain = rng.uniform(1 - aug.contrast, 1 + aug.contrast)
    shift = rng.uniform(-aug.brightness, aug.brightness)
    rgb = rgb @ matrix.T.astype(np.float32)
    mean = float(rgb.mean(dtype=np.float64))
    rgb = (rgb - mean) * gain + mean + shift
    return np.clip(rgb, 0.0, 1.0, out=rgb), np.ascontiguousarray(mask)
