"""The U-Net: 3 downsamplings, 3 upsamplings, skip connections, one logit per pixel.

Every 3×3 convolution is zero-padded, so an input of (8n)×(8n) pixels gives an
output of the same size.  The receptive radius is computed from the layer list
(:func:`receptive_radius_px`), never guessed, so that the inference halo can be
chosen to make tiled prediction equal to whole-image prediction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slidejob.model.layout import CONVS_PER_BLOCK, DEPTH, NORMS, UNetConfig, _groups, receptive_radius_px

__all__ = ["NORMS", "UNet", "UNetConfig", "receptive_radius_px"]


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(_groups(channels), channels)
    return nn.Identity()


class _Block(nn.Sequential):
    """``CONVS_PER_BLOCK`` × (3×3 padded conv → norm → ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        layers: list[nn.Module] = []
        for i in range(CONVS_PER_BLOCK):
            # A conv followed by a norm layer does not need its own bias.
            layers.append(
                nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1,
                          bias=norm == "none")
            )
            layers.append(_norm_layer(norm, out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _DecoderBlock(_Block):
    """A decoder block, fed the skip connection and the upsampled path (concatenated, in that order).

    After :meth:`split_first_conv` (inference only) the concatenation is not
    built: a convolution is linear in its input channels, so
    ``conv(cat(skip, up)) == conv_skip(skip) + conv_up(up)`` with the weight
    cut along its input channels.  In channels_last the concatenation
    interleaves both inputs pixel by pixel: 14 % of a CPU forward of the
    shipped model; with the split, 624² forwards ran 1.14× faster (median of
    six interleaved rounds, same masks).
    """

    #: the first convolution's weight cut along its input channels (buffers set by :meth:`split_first_conv`)
    weight_skip: torch.Tensor
    weight_up: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__(in_channels, out_channels, norm)
        self.split = False

    def _first_conv(self) -> nn.Conv2d:
        conv = self[0]
        assert isinstance(conv, nn.Conv2d)
        return conv

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """The block's output for ``inputs == [skip, up]``, which it empties.

        The list is the only holder of the two tensors (the caller keeps no name
        for them), so each is freed once read (split: by its convolution;
        otherwise by the concatenation): in a CPU forward of 1136² pixels the
        last decoder's full-size inputs were ~80 MB of a ~300 MB peak.  (Forward
        hooks on a decoder block see the list emptied.)
        """
        up = inputs.pop()
        skip = inputs.pop()
        if not self.split:
            x = torch.cat([skip, up], dim=1)
            del skip, up
            return super().forward(x)
        conv = self._first_conv()
        x = nn.functional.conv2d(skip, self.weight_skip, conv.bias, padding=conv.padding)
        del skip
        x = x.add_(nn.functional.conv2d(up, self.weight_up, None, padding=conv.padding))
        del up
        for layer in list(self)[1:]:
            x = layer(x)
        return x

    def split_first_conv(self) -> None:
        """Convolve the two inputs apart and add (for inference: training keeps the concatenation)."""
        conv = self._first_conv()
        skip_channels = conv.in_channels // 2
        weight = conv.weight.detach()
        # Buffers, so that .to(device / memory_format) moves them; not persistent: the state_dict
        # keeps the architecture's own keys.
        self.register_buffer("weight_skip", weight[:, :skip_channels].clone(), persistent=False)
        self.register_buffer("weight_up", weight[:, skip_channels:].clone(), persistent=False)
        self.split = True


class UNet(nn.Module):
    """U-Net with 3 downsamplings: (N, 3, 8n, 8n) RGB in, (N, 1, 8n, 8n) logits out.

    Parameters
    ----------
    base_channels
        Width of the first block (see :class:`UNetConfig`).
    norm
        ``"batch"``, ``"group"`` or ``"none"``.
    in_channels
        Input channels.

    Examples
    --------
    >>> net = UNet(base_channels=4).eval()
    >>> net(torch.zeros(2, 3, 24, 40)).shape
    torch.Size([2, 1, 24, 40])
    """

    def __init__(self, base_channels: int = 16, norm: str = "batch", in_channels: int = 3) -> None:
        super().__init__()
        self.config = UNetConfig(base_channels=base_channels, norm=norm, in_channels=in_channels)
        widths = [base_channels * 2**level for level in range(DEPTH + 1)]
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoders.append(_Block(previous, width, norm))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(DEPTH)):
            self.upsamplers.append(nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2))
            self.decoders.append(_DecoderBlock(2 * widths[level], widths[level], norm))
        self.head = nn.Conv2d(widths[0], 1, 1)

    @classmethod
    def from_config(cls, config: UNetConfig | Mapping[str, Any]) -> UNet:
        """Build from a :class:`UNetConfig` or its dict form."""
        if not isinstance(config, UNetConfig):
            config = UNetConfig.from_dict(config)
        return cls(**config.to_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, 1, H, W) for an input of shape (N, C, H, W), H and W multiples of 8."""
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        multiple = 2**DEPTH
        height, width = x.shape[-2:]
        if height % multiple or width % multiple:
            raise ValueError(
                f"input height and width must be multiples of {multiple} (the U-Net halves them "
                f"{DEPTH} times), got {height}×{width}; crop or pad the tile to "
                f"{height - height % multiple or multiple}×{width - width % multiple or multiple} or "
                f"{-(-height // multiple) * multiple}×{-(-width // multiple) * multiple}"
            )
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for upsampler, decoder in zip(self.upsamplers, self.decoders):
            inputs = [skips.pop(), upsampler(x)]
            del x  # the level below: freed before the block allocates its output
            x = decoder(inputs)
        return self.head(x)


