"""The U-Net's configuration and geometry, without torch: what a model card and a Dask client need.

:mod:`slidejob.model.unet` builds the network from :class:`UNetConfig`; the
receptive radius is computed here from the same layer layout (3 levels, 2
convolutions per block), so reading a card or planning a run's halo does not
import torch (~180 MB in the client process).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CONVS_PER_BLOCK", "DEPTH", "NORMS", "UNetConfig", "receptive_radius_px"]

#: Normalization layers a :class:`UNet` can be built with.
NORMS = ("batch", "group", "none")

#: Number of 2× downsamplings (and upsamplings); the input side must be a multiple of ``2**DEPTH``.
DEPTH = 3
#: 3×3 convolutions per block, on both the encoder and the decoder side.
CONVS_PER_BLOCK = 2


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a :class:`UNet` with matching weights.

    Parameters
    ----------
    base_channels
        Channels of the first block; each downsampling doubles them.  The
        compute cost grows with its square (width 16 is about 4× cheaper than 32).
    norm
        ``"batch"`` (BatchNorm; in eval mode a per-channel affine map, so tiled
        inference is exact), ``"group"`` (GroupNorm; statistics over the whole
        tile, so tiled output depends on the tile, see :func:`receptive_radius_px`)
        or ``"none"``.
    in_channels
        Input channels (3 for RGB).
    """

    base_channels: int = 16
    norm: str = "batch"
    in_channels: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.base_channels, int) or self.base_channels < 1:
            raise ValueError(f"base_channels must be a positive integer, got {self.base_channels!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.norm == "group" and self.base_channels % _groups(self.base_channels) != 0:
            raise ValueError(f"base_channels={self.base_channels} does not split into GroupNorm groups")
        if not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {self.in_channels!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (what the model card stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> UNetConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error, not silently dropped."""
        unknown = set(config) - {"base_channels", "norm", "in_channels"}
        if unknown:
            raise ValueError(
                f"unknown U-Net config keys {sorted(unknown)}; expected base_channels, norm, in_channels"
            )
        return cls(**dict(config))


def _groups(channels: int) -> int:
    # 8 groups is the usual GroupNorm choice; narrower layers fall back to
    # fewer groups so that every width from 1 up builds.
    for groups in (8, 4, 2, 1):
        if channels % groups == 0:
            return groups
    return 1


def _decoder_interval(lo: int, hi: int, level: int) -> tuple[int, int]:
    """Input pixels [lo', hi'] that decoder-block output pixels [lo, hi] at ``level`` depend on.

    Walks the layers backwards with interval arithmetic: a padded 3×3 conv
    widens an interval by one on each side, a 2×2/2 max-pool maps output i to
    input [2i, 2i+1], a 2×2/2 transposed conv maps output o to input o // 2,
    and a concatenation takes the union of its branches.
    """
    lo, hi = lo - CONVS_PER_BLOCK, hi + CONVS_PER_BLOCK
    skip = _encoder_interval(lo, hi, level)
    # The transposed conv reads the level below: the bottleneck encoder block
    # under the deepest decoder, another decoder block otherwise.
    below = lo // 2, hi // 2
    up = _encoder_interval(*below, DEPTH) if level + 1 == DEPTH else _decoder_interval(*below, level + 1)
    return min(skip[0], up[0]), max(skip[1], up[1])


def _encoder_interval(lo: int, hi: int, level: int) -> tuple[int, int]:
    """Input pixels that encoder-block output pixels [lo, hi] at ``level`` depend on."""
    lo, hi = lo - CONVS_PER_BLOCK, hi + CONVS_PER_BLOCK
    if level == 0:
        return lo, hi
    # Max-pool from the level above, then that level's encoder block.
    return _encoder_interval(2 * lo, 2 * hi + 1, level - 1)


def receptive_radius_px(config: UNetConfig | Any | Mapping[str, Any] | None = None) -> int:
    """Exact receptive radius of the U-Net in input pixels.

    The largest distance, along one axis, between an output pixel and an input
    pixel that can change it, over every output position (pooling makes the
    field depend on the position modulo 8, so all 8 phases are checked).  A tile
    cut with a halo of at least this many pixels, at offsets that are multiples
    of 8, gives the same centre as the whole image, provided the normalization
    is per-pixel at inference: true for ``"batch"`` (eval mode) and ``"none"``,
    **not** for ``"group"``, whose statistics span the whole tile.

    The radius depends only on the layer layout (3 levels, 2 convs per block),
    not on the width; ``config`` is accepted so callers need not know that.

    Parameters
    ----------
    config
        A :class:`UNetConfig`, its dict, a :class:`UNet`, or ``None``.

    Returns
    -------
    int
        The radius in input pixels.

    Examples
    --------
    >>> receptive_radius_px(UNetConfig(base_channels=16))
    51
    """
    if isinstance(getattr(config, "config", None), UNetConfig):  # a UNet (not imported here: it needs torch)
        config = config.config  # type: ignore[union-attr]
    elif isinstance(config, Mapping):
        config = UNetConfig.from_dict(config)
    radius = 0
    period = 2**DEPTH
    for x in range(period, 2 * period):  # one full period, away from the border
        lo, hi = _decoder_interval(x, x, 0)
        # The head is a 1×1 conv: it adds nothing.
        radius = max(radius, x - lo, hi - x)
    return radius
