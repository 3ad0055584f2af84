"""Turn a card + weights into a ready-to-run model on a device, in a chosen precision and layout."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from slidejob.errors import ModelError
from slidejob.model.card import ModelCard
from slidejob.model.unet import UNet
from slidejob.model.weights_io import read_weights, resolve_model_paths, write_weights

__all__ = [
    "PRECISIONS",
    "LoadedModel",
    "best_precision",
    "build_module",
    "load_model",
    "normalization_affine",
    "normalization_tensors",
    "prepare_batch",
    "save_model",
]

logger = logging.getLogger(__name__)

#: Precision names accepted by :func:`load_model`, and the autocast dtype of each.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: One lock per CUDA device of this process: its forwards take turns (see LoadedModel.predict_proba).
_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_LOCK = threading.Lock()


def _device_turn(device: torch.device) -> Any:
    """The lock this process's forwards on ``device`` take turns with (CUDA); none on CPU."""
    if device.type != "cuda":
        return nullcontext()
    key = str(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()))
    with _DEVICE_LOCKS_LOCK:
        return _DEVICE_LOCKS.setdefault(key, threading.Lock())


def normalization_affine(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of shape (1, C, 1, 1) with ``(uint8 / 255 - mean) / std == uint8 * scale + shift``.

    Folding ``/ 255``, ``- mean`` and ``/ std`` into one multiply-add saves two
    passes over every tile.
    """
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=device)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=device)
    scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
    shift = (-mean_t / std_t).view(1, -1, 1, 1)
    return scale, shift


def prepare_batch(
    batch_uint8_nhwc: npt.NDArray[np.uint8],
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    device: torch.device,
    channels_last: bool,
) -> torch.Tensor:
    """uint8 (N, H, W, 3) tiles → normalized float32 (N, 3, H, W) on ``device`` in the requested layout."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.from_numpy(np.ascontiguousarray(batch_uint8_nhwc)).to(device)
    # NHWC memory permuted to NCHW is already channels_last in memory;
    # .contiguous() only copies when contiguous NCHW was asked for.
    # In place on the fresh float copy: one allocation instead of three (~1 ms of a 624² tile).
    return x.permute(0, 3, 1, 2).to(torch.float32, copy=True).mul_(scale).add_(shift).contiguous(memory_format=layout)


def normalization_tensors(
    card: ModelCard, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`normalization_affine` of the card's ``input_normalization``."""
    return normalization_affine(card.input_normalization["mean"], card.input_normalization["std"], device)


def _cpu_has_amx() -> bool:
    # torch.cpu._is_amx_tile_supported is private, hence the getattr and the
    # fallback: without it we cannot tell, and fp32 is the safe answer.
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:  # pragma: no cover - defensive: the helper is private
        return False


#: On a CPU without AMX, ``auto`` picks bf16 when a measured bf16 forward runs at least this many times
#: as fast as fp32 (:func:`cpu_bf16_speedup`): a margin wide enough that timing noise cannot flip the
#: choice on the machines measured (1.5-1.6× on a Zen 5 EPYC; 0.8-1.16× on a Xeon with AVX512-BF16).
CPU_BF16_MIN_SPEEDUP = 1.25


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times as fast a bf16-autocast forward runs as an fp32 one on this CPU, measured once a process.

    CPUs differ too much to decide from their flags: oneDNN's bf16 convolutions
    ran 1.5-1.6× the fp32 speed on a Zen 5 EPYC (AVX512-BF16, no AMX) and
    0.8-1.16× on a Xeon with the same flag.  Both in channels_last, on a
    random-weight U-Net of the shipped width (8) with its BatchNorm folded, a
    512² input, this process's torch threads (set them first), best of three
    interleaved forwards each (~0.3 s).  1.0 where the CPU has no bf16 at all.
    """
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        if has_bf16 is None or not has_bf16():
            return 1.0
    except RuntimeError:  # pragma: no cover - defensive: the helper is private
        return 1.0
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = fold_batch_norm(UNet(base_channels=8).eval()).to(memory_format=torch.channels_last)
        x = torch.rand(1, 3, 512, 512).contiguous(memory_format=torch.channels_last)
    best = {"fp32": float("inf"), "bf16": float("inf")}
    with torch.inference_mode():
        for _round in range(4):  # the first round warms both up and is not counted
            for name, context in (("fp32", nullcontext()), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
                t0 = time.perf_counter()
                with context:
                    module(x)
                if _round:
                    best[name] = min(best[name], time.perf_counter() - t0)
    return best["fp32"] / best["bf16"]


def best_precision(device: str | torch.device) -> tuple[str, bool]:
    """The fastest precision and memory layout that is safe for this model on ``device``.

    Rule (measured; see ``docs/training.md`` and ``python -m slidejob.model.bench``):

    - CUDA: ``("bf16", True)`` where the GPU supports bf16 (Ampere and later), else
      ``("fp16", True)``: tensor cores want a 16-bit dtype and NHWC; the network is
      batch-normalized, so its activations stay far inside fp16's range.
    - CPU with AMX (Sapphire Rapids and later): ``("bf16", True)``: oneDNN runs bf16
      convolutions on the AMX tiles.
    - CPU with AVX512-BF16 but no AMX: ``("bf16", True)`` when a bf16 forward measures
      at least :data:`CPU_BF16_MIN_SPEEDUP` times as fast (:func:`cpu_bf16_speedup`,
      once a process), else ``("fp32", True)``.
    - Other CPUs: ``("fp32", True)``.  channels_last alone gives oneDNN's convolutions
      1.5-2× the plain-fp32 speed with the same mask.

    bf16 autocast may flip a few mask pixels; the tests hold ``auto``'s mask to
    Dice ≥ 0.99 against fp32's (0 pixels flipped on the shipped model's test tiles).

    Parameters
    ----------
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or a :class:`torch.device`.

    Returns
    -------
    tuple
        ``(precision, channels_last)`` to pass to :func:`load_model`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), True
    if device.type == "cpu":
        fast_bf16 = _cpu_has_amx() or cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP
        return ("bf16" if fast_bf16 else "fp32"), True
    return "fp32", False


@dataclass(eq=False)
class LoadedModel:
    """An eval-mode U-Net with its card, ready to turn RGB tiles into probabilities.

    Build it with :func:`load_model`.

    Attributes
    ----------
    module
        The network, in eval mode, on ``device``, in the requested memory layout.
    card
        The validated model card.
    weights_sha256
        sha256 of the weights file that was loaded (equal to the card's).
    device, precision, channels_last
        How :meth:`predict_proba` runs.
    card_path, weights_path
        Where the card and weights were read from.
    """

    module: UNet
    card: ModelCard
    weights_sha256: str
    device: torch.device
    precision: str
    channels_last: bool
    card_path: Path
    weights_path: Path
    _scale: torch.Tensor = field(init=False, repr=False)
    _shift: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._scale, self._shift = normalization_tensors(self.card, self.device)

    @property
    def threshold(self) -> float:
        """The card's decision threshold on probabilities."""
        return float(self.card.threshold)

    @property
    def receptive_radius_px(self) -> int:
        """Receptive radius of the network in input pixels."""
        return self.card.receptive_radius_px

    def _autocast(self) -> Any:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def predict_proba(self, batch_uint8_nhwc: npt.NDArray[np.uint8], margin_px: int = 0) -> npt.NDArray[np.float32]:
        """Cancer probability per pixel.

        Parameters
        ----------
        batch_uint8_nhwc
            RGB tiles, shape (N, H, W, 3), dtype uint8, H and W multiples of 8.
        margin_px
            Pixels of each side not wanted (a halo), a multiple of 8: they are
            not returned and cost less to compute (:meth:`UNet.forward`).

        Returns
        -------
        numpy.ndarray
            float32 probabilities of shape (N, H - 2 margin, W - 2 margin).

        Raises
        ------
        ValueError
            Wrong dtype, rank, channel count, sides not multiples of 8, or a bad margin.
        """
        batch = np.asarray(batch_uint8_nhwc)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 RGB tiles of shape (N, H, W, 3), got dtype {batch.dtype} shape {batch.shape}"
            )
        # On a GPU, threads of one process (a worker's task threads) take turns: their kernels would
        # queue on the device's one default stream anyway, and one batch's activations at a time
        # bound the process's GPU memory whatever its number of threads (several worker processes
        # sharing a GPU each hold their own).  Their CPU work (reading, thresholding, writing) runs
        # outside and overlaps.  CPU forwards run side by side.
        with _device_turn(self.device), torch.inference_mode():
            x = prepare_batch(
                batch, self._scale, self._shift, device=self.device, channels_last=self.channels_last
            )
            with self._autocast():
                logits = self.module(x, margin_px)
            probabilities = torch.sigmoid(logits.float())[:, 0]
            return probabilities.cpu().numpy()


def build_module(card: ModelCard, state_dict: dict[str, torch.Tensor], *, source: Path | None = None) -> UNet:
    """A :class:`UNet` built from the card's config with ``state_dict`` loaded (float32, eval mode).

    Raises
    ------
    ModelError
        The tensors do not fit the architecture the card describes.
    """
    module = UNet.from_config(card.unet_config)
    # Weights may be stored in fp16 to halve the file; compute starts from fp32.
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"weights file {source} does not fit the architecture in its card "
            f"({card.architecture['config']}): {exc}"
        ) from exc
    return module.eval()


def save_model(
    module: torch.nn.Module, card: ModelCard, weights_path: Path, *, float_dtype: torch.dtype | None = None
) -> ModelCard:
    """Write ``module``'s weights to ``weights_path`` and its card next to it (same stem, ``.json``).

    The card's ``weights_sha256`` and ``weights_dtype`` are filled in from
    what was written; everything else is taken from ``card`` as given.

    Parameters
    ----------
    module
        The trained U-Net.
    card
        Card to store (its sha256/dtype fields are overwritten).
    weights_path
        Destination ``.safetensors`` file.
    float_dtype
        ``torch.float16`` halves the file; ``None`` keeps float32.

    Returns
    -------
    ModelCard
        The card as written.
    """
    weights_path = Path(weights_path)
    sha256 = write_weights(module.state_dict(), weights_path, float_dtype=float_dtype)
    dtype_name = str(float_dtype or torch.float32).removeprefix("torch.")
    card = card.replace(weights_sha256=sha256, weights_dtype=dtype_name)
    card.save(weights_path.with_suffix(".json"))
    return card


def fold_batch_norm(module: UNet) -> UNet:
    """Fold each eval-mode BatchNorm into the convolution before it, in place, for inference.

    In eval mode a BatchNorm is a per-channel affine map, so ``conv → norm``
    equals one convolution with scaled weights and a bias (equal up to float
    rounding).  It removes a full pass over every activation: 15 % of a CPU
    forward of the shipped model.  The module's ``state_dict`` then no longer
    matches the card's architecture: save the trained module, not this one.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module.eval()
    for block in [*module.encoders, *module.decoders]:
        for i in range(len(block) - 1):
            conv, norm = block[i], block[i + 1]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d):
                block[i] = fuse_conv_bn_eval(conv, norm)
                block[i + 1] = torch.nn.Identity()
    return module


def load_model(
    card_path: Path | None = None,
    weights_path: Path | None = None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
) -> LoadedModel:
    """Load weights + card into an eval-mode model on ``device``.

    With no paths, loads the shipped default (:func:`~slidejob.model.default_weights`).
    With one path, the other is the same name with ``.json`` / ``.safetensors``.

    Parameters
    ----------
    card_path, weights_path
        The model card and the safetensors file.
    device
        Torch device to run on.
    precision
        ``"fp32"``, or ``"bf16"`` / ``"fp16"`` autocast (weights stay float32).
        :func:`best_precision` picks one.
    channels_last
        Run convolutions in NHWC memory layout.

    Returns
    -------
    LoadedModel

    Raises
    ------
    UnsafeWeights
        A pickle file was offered.
    ModelError
        Missing files, a card that breaks the schema, a sha256 mismatch, or
        tensors that do not fit the card's architecture.
    ValueError
        Unknown precision, or a precision the device cannot run.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{device} does not support bf16; use precision='fp16' or best_precision(device)")
    card_path, weights_path = resolve_model_paths(card_path, weights_path)
    card = ModelCard.load(card_path)
    state_dict, sha256 = read_weights(weights_path, expected_sha256=card.weights_sha256)
    module = fold_batch_norm(build_module(card, state_dict, source=weights_path))
    for decoder in module.decoders:
        decoder.split_first_conv()  # after the fold: the split takes the folded weights
    module = module.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    logger.debug("loaded %s (%s) on %s, %s, channels_last=%s", weights_path, card.name, device, precision,
                 channels_last)
    return LoadedModel(
        module=module,
        card=card,
        weights_sha256=sha256,
        device=device,
        precision=precision,
        channels_last=channels_last,
        card_path=card_path,
        weights_path=weights_path,
    )
