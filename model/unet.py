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


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2×2 max pooling with stride 2, ``torch.max_pool2d(x, 2)``, faster for CPU inference in channels_last.

    ATen's CPU max_pool2d ran 2-4× slower than two elementwise maxima over views
    of the NHWC memory: first of each pixel pair's two rows, then of its two
    columns, which sit side by side once a row pair is viewed as
    ``(W/2, 2·C)`` (8 × 1136², one thread: 9.4 against 2.2 ms in fp32, 8.5
    against 2.3 in bf16; the U-Net's first pooling was 12 % of a CPU forward):
    a 1136² forward of the shipped model with a 56-px margin, one thread, ran
    90.7 instead of 97.9 ms in bf16 and 150.6 instead of 156.2 in fp32.
    A max is exact, so the result is the same bits.  The ATen op serves every
    other case: CUDA (cuDNN), NCHW memory, odd sides, and autograd (the
    gradient of ``torch.maximum`` splits ties, max_pool2d's does not).
    """
    n, c, h, w = x.shape
    if (
        x.device.type != "cpu"
        or h % 2
        or w % 2
        or (x.requires_grad and torch.is_grad_enabled())
        or not x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.max_pool2d(x, 2)
    pairs = x.permute(0, 2, 3, 1).reshape(n, h // 2, 2, w // 2, 2 * c)  # a view: NHWC memory is contiguous
    rows = torch.maximum(pairs[:, :, 0], pairs[:, :, 1])  # (N, H/2, W/2, 2C): each pair's columns side by side
    return torch.maximum(rows[..., :c], rows[..., c:]).permute(0, 3, 1, 2)  # NCHW, channels_last memory


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


def _decoder_span(size_px: int, margin_px: int) -> tuple[int, int]:
    """The pixels ``[start, stop)`` of a decoder level ``size_px`` long to compute when ``margin_px`` of each side is not wanted.

    A ring of ``2 * CONVS_PER_BLOCK`` around the wanted centre: the block's
    zero-padded convolutions spoil its outer ``CONVS_PER_BLOCK`` pixels, and
    the level above needs ``CONVS_PER_BLOCK`` of context at its own scale,
    half that here.  Even where the margin is, so the upsampled level lines up.

    >>> _decoder_span(1136, 56), _decoder_span(284, 14), _decoder_span(64, 2)
    ((52, 1084), (10, 274), (0, 64))
    """
    ring = 2 * CONVS_PER_BLOCK
    return max(margin_px - ring, 0), min(size_px - margin_px + ring, size_px)


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

    def forward(self, x: torch.Tensor, margin_px: int = 0) -> torch.Tensor:
        """Logits for an input of shape (N, C, H, W), H and W multiples of 8.

        Of shape (N, 1, H, W); with ``margin_px`` (a multiple of 8) only the
        centre, (N, 1, H - 2 margin, W - 2 margin), the same values as the
        full output's centre (bit for bit in fp32; reduced precision may round
        differently for the smaller shapes).  The decoders then run on the centre and a
        thin ring only ("overlap-tile": the margin is a halo whose outputs
        are thrown away): they are about 60 % of the work, and a forward of
        1024² with a 56-px halo took 0.33 instead of 0.38 s (shipped model,
        fp32, channels_last, one CPU thread).
        """
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
        if margin_px < 0 or margin_px % multiple or 2 * margin_px >= min(height, width):
            raise ValueError(f"margin must be a multiple of {multiple} leaving some centre of the "
                             f"{height}×{width} input, got {margin_px}")
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else max_pool_2x2(x))  # what self.pool does, faster on CPU
            skips.append(x)
        x = skips.pop()
        # Group norm's statistics span the whole input (as batch norm's do while training), so a
        # cropped decoder would see others: the centre is then cut from the full output.
        crop = margin_px if self.config.norm != "group" and not self.training else 0
        below = (0, 0)  # where the level below's tensor starts, in its own pixels
        for upsampler, decoder in zip(self.upsamplers, self.decoders):
            skip = skips.pop()
            scale = height // skip.shape[-2]
            rows, cols = (_decoder_span(n, crop // scale) for n in skip.shape[-2:])
            inputs = [skip[:, :, rows[0] : rows[1], cols[0] : cols[1]],
                      upsampler(x[:, :, rows[0] // 2 - below[0] : rows[1] // 2 - below[0],
                                  cols[0] // 2 - below[1] : cols[1] // 2 - below[1]])]
            del x, skip  # the level below: freed before the block allocates its output
            x = decoder(inputs)
            below = (rows[0], cols[0])
        x = self.head(x)
        return x[:, :, margin_px - below[0] : height - margin_px - below[0],
                 margin_px - below[1] : width - margin_px - below[1]]


