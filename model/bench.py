"""U-Net inference throughput per precision and memory layout: the evidence behind :func:`best_precision`.

Run ``python -m slidejob.model.bench`` (add ``--widths 16 32 --side-px 512``)
on the machine in question; it prints megapixels per second for fp32 / bf16 /
fp16 autocast, each with and without channels_last, and how far each
precision's probabilities and masks stray from fp32 on the same random weights.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from slidejob.errors import ModelError
from slidejob.model.runtime import PRECISIONS, best_precision, load_model
from slidejob.model.unet import UNet

__all__ = ["Measurement", "main", "measure"]


@dataclass(frozen=True)
class Measurement:
    """Throughput of one setting.

    Attributes
    ----------
    base_channels, precision, channels_last, side_px, batch
        The setting.
    megapixels_per_s
        Best of the timed repeats (the least disturbed by other processes).
    max_abs_diff
        Largest probability difference from fp32 on the same input.
    mask_flip_fraction
        Share of pixels whose 0.5-threshold call differs from fp32.
    """

    base_channels: int
    precision: str
    channels_last: bool
    side_px: int
    batch: int
    megapixels_per_s: float
    max_abs_diff: float
    mask_flip_fraction: float


def measure(
    base_channels: int,
    *,
    net: UNet | None = None,
    precisions: Sequence[str] = ("fp32", "bf16"),
    side_px: int = 512,
    batch: int = 4,
    repeats: int = 3,
    device: str = "cpu",
    seed: int = 0,
) -> list[Measurement]:
    """Time every (precision, channels_last) pair for ``net`` (or a random U-Net of ``base_channels``)."""
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, side_px, side_px, device=device)
    if net is None:
        net = UNet(base_channels=base_channels)
        # Fresh BatchNorm statistics are the identity; one pass in train mode
        # gives the activations a realistic scale in eval mode.
        with torch.no_grad():
            net.train()(x.cpu())
    net = net.to(device).eval()
    with torch.inference_mode():
        reference = torch.sigmoid(net(x).float())
    results = []
    for precision in precisions:
        for channels_last in (False, True):
            layout = torch.channels_last if channels_last else torch.contiguous_format
            model = net.to(memory_format=layout)
            inputs = x.contiguous(memory_format=layout)
            dtype = PRECISIONS[precision]
            device_type = torch.device(device).type
            autocast = torch.autocast(device_type=device_type, dtype=dtype) if dtype else nullcontext()
            timings = []
            with torch.inference_mode():
                for _ in range(repeats + 1):  # the first pass warms up oneDNN / cuDNN
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    with autocast:
                        probabilities = torch.sigmoid(model(inputs).float())
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    timings.append(time.perf_counter() - start)
            flips = ((probabilities >= 0.5) != (reference >= 0.5)).float().mean()
            results.append(
                Measurement(
                    base_channels=base_channels,
                    precision=precision,
                    channels_last=channels_last,
                    side_px=side_px,
                    batch=batch,
                    megapixels_per_s=batch * side_px * side_px / 1e6 / min(timings[1:]),
                    max_abs_diff=float((probabilities - reference).abs().max()),
                    mask_flip_fraction=float(flips),
                )
            )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Print a throughput table (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32],
                        help="random-weight U-Nets of these widths (besides the shipped model)")
    parser.add_argument("--side-px", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS))
    args = parser.parse_args(argv)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"best_precision -> {best_precision(args.device)}")
    print(f"{'width':>5} {'precision':>9} {'ch_last':>7} {'MP/s':>7} {'max|dp|':>8} {'mask flips':>10}")
    nets: list[tuple[int, UNet | None]] = [(w, None) for w in args.widths]
    try:
        shipped = load_model()
        nets.insert(0, (shipped.card.unet_config.base_channels, shipped.module))
        print(f"first rows: the shipped model {shipped.card.name}; then random weights")
    except ModelError:
        print("no shipped model; random weights only")
    for width, net in nets:
        for m in measure(width, net=net, precisions=args.precisions, side_px=args.side_px, batch=args.batch,
                         repeats=args.repeats, device=args.device):
            print(f"{m.base_channels:>5} {m.precision:>9} {m.channels_last!s:>7} {m.megapixels_per_s:>7.2f} "
                  f"{m.max_abs_diff:>8.4f} {m.mask_flip_fraction:>10.2e}")


if __name__ == "__main__":
    main()
