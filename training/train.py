"""Train the U-Net on a folder of labelled tiles and export the best epoch as safetensors + card.

A run folder holds::

    run.json                  the TrainConfig of the run (checked again on --resume)
    checkpoint.safetensors    model + optimizer tensors after the last finished epoch
    checkpoint.json           optimizer hyperparameters, loop state, history
    metrics.csv, metrics.json per-epoch validation figures
    curves.png                loss and metric curves
    model.safetensors         weights of the best epoch by validation Dice
    model.json                their model card

Reproducibility: every random draw comes from ``seed`` (weight init from
``torch.manual_seed(seed)``, the data order and augmentation of epoch ``e``
from ``numpy.random.default_rng([seed, e])``), so on CPU the same command gives
the same weights bit for bit (with the same torch build and thread count), and
a run resumed from a checkpoint ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from slidejob import __version__
from slidejob.errors import DataError, OutputExists
from slidejob.model.card import ModelCard
from slidejob.model.runtime import save_model
from slidejob.model.unet import UNet, UNetConfig, receptive_radius_px
from slidejob.training.augment import augment
from slidejob.training.checkpoint import CHECKPOINT_JSON, load_checkpoint, save_checkpoint
from slidejob.training.config import TrainConfig
from slidejob.training.data import (
    LabelledTiles,
    discover_samples,
    fingerprint,
    load_tiles,
    split_by_group,
)
from slidejob.training.losses import make_loss
from slidejob.training.progress import Progress
from slidejob.training.report import write_history
from slidejob.training.scoring import score_tiles

__all__ = ["EXPORT_STEM", "TrainResult", "lr_at", "train_model"]

logger = logging.getLogger(__name__)

#: File stem of the exported best model in the run folder (``model.json`` + ``model.safetensors``).
EXPORT_STEM = "model"
_RUN_JSON = "run.json"
#: Fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = {"epochs"}


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced.

    Attributes
    ----------
    out_dir
        The run folder.
    card_path, weights_path
        The exported best model.
    best_epoch
        Epoch exported (best validation Dice).
    metrics
        Validation metrics of that epoch.
    history
        One row per epoch (see :data:`~slidejob.training.report.HISTORY_COLUMNS`).
    """

    out_dir: Path
    card_path: Path
    weights_path: Path
    best_epoch: int
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def lr_at(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, cosine decay to 1 % of the peak.

    A pure function of the step, so resuming needs no scheduler state.

    >>> [round(lr_at(s, total_steps=10, warmup_steps=2, peak_lr=1.0), 3) for s in (0, 1, 2, 9)]
    [0.5, 1.0, 1.0, 0.048]
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    floor = 0.01 * peak_lr
    return floor + (peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _channel_stats(tiles: LabelledTiles) -> tuple[list[float], list[float]]:
    # Exact pooled mean/std per channel in float64 over every training pixel.
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for image in tiles.images:
        pixels = image.reshape(-1, 3).astype(np.float64) / 255.0
        total += pixels.sum(axis=0)
        squares += (pixels**2).sum(axis=0)
        count += pixels.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _amp_settings(device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    # Mixed precision only on CUDA: bf16 where supported (no loss scaling needed),
    # fp16 with a GradScaler otherwise.  On CPU, bf16 training was measured no
    # faster than fp32 for these widths, and fp32 keeps runs bit-reproducible.
    if device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def _batch(
    tiles: LabelledTiles, indices: npt.NDArray[np.int64], config: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    crops = [
        augment(tiles.images[i], tiles.masks[i], crop_px=config.crop_px, aug=config.augmentation, rng=rng)
        for i in indices
    ]
    images = torch.from_numpy(np.stack([c[0] for c in crops])).permute(0, 3, 1, 2)
    masks = torch.from_numpy(np.stack([c[1] for c in crops]))[:, None].float()
    return images, masks


def _check_run_dir(out_dir: Path, config: TrainConfig, resume: bool) -> None:
    # A run exists once it has a checkpoint; a run.json alone (a run that failed
    # before its first epoch ended) is simply overwritten.
    run_json = out_dir / _RUN_JSON
    if resume:
        if not (out_dir / CHECKPOINT_JSON).is_file() or not run_json.is_file():
            raise DataError(
                f"--resume: {out_dir} holds no checkpoint ({CHECKPOINT_JSON}, {_RUN_JSON}) to resume from"
            )
        recorded = json.loads(run_json.read_text(encoding="utf-8"))
        wanted = config.to_dict()
        changed = sorted(k for k in wanted if k not in _RESUMABLE_CHANGES and recorded.get(k) != wanted[k])
        if changed:
            details = "; ".join(f"{k}: run has {recorded.get(k)!r}, now {wanted[k]!r}" for k in changed)
            raise DataError(
                f"--resume: options differ from the run in {out_dir} ({details}); resume with the same "
                "options (only --epochs may change), or start a new run with another --out"
            )
    elif (out_dir / CHECKPOINT_JSON).exists():
        raise OutputExists(
            f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out"
        )


def _write_run_json(out_dir: Path, config: TrainConfig) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    run_json = out_dir / _RUN_JSON
    tmp = run_json.with_name(f".{run_json.name}.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_json)


def _make_card(
    config: TrainConfig,
    *,
    mean: list[float],
    std: list[float],
    metrics: dict[str, Any],
    training: dict[str, Any],
) -> ModelCard:
    unet = UNetConfig(base_channels=config.base_channels, norm=config.norm)
    name = config.name or f"unet{config.base_channels}-{Path(config.data_dir).name}"
    description = config.description or (
        f"U-Net (base width {config.base_channels}) trained by slidejob on {Path(config.data_dir).name}. "
        "Research weights, not a diagnostic device."
    )
    return ModelCard(
        name=name,
        description=description,
        architecture={
            "name": "unet", "config": unet.to_dict(), "receptive_radius_px": receptive_radius_px(unet)
        },
        input_normalization={"space": "rgb_0_1", "mean": mean, "std": std},
        mpp_um=config.mpp_um,
        magnification=config.magnification,
        threshold=0.5,
        training=training,
        validation_metrics=metrics,
        # Filled in by save_model from the file it writes.
        weights_sha256="0" * 64,
        weights_dtype=config.export_dtype,
        slidejob_version=__version__,
        license=config.license,
        data_attribution=config.data_attribution,
    )


def train_model(
    config: TrainConfig,
    *,
    out_dir: Path,
    resume: bool = False,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train a U-Net as ``config`` says, checkpointing every epoch into ``out_dir``.

    Parameters
    ----------
    config
        The run's settings.
    out_dir
        Run folder (created).  Must not hold a run unless ``resume``.
    resume
        Continue the run in ``out_dir`` from its last checkpoint; ``config`` must
        match the recorded one except ``epochs``.
    device
        ``None`` picks CUDA when available, else CPU.
    show_progress
        Progress bar (TTY) or periodic log lines; ``False`` for silence.

    Returns
    -------
    TrainResult

    Raises
    ------
    DataError
        Bad data folder, split, or a ``resume`` that does not match.
    OutputExists
        ``out_dir`` holds a run and ``resume`` is false.
    """
    out_dir = Path(out_dir)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    _check_run_dir(out_dir, config, resume)
    data_dir = Path(config.data_dir)

    samples = discover_samples(
        data_dir, negative_classes=config.negative_classes, group_regex=config.group_regex
    )
    train_samples, val_samples = split_by_group(samples, val_fraction=config.val_fraction, seed=config.seed)
    train_tiles = load_tiles(train_samples, mask_threshold=config.mask_threshold)
    val_tiles = load_tiles(val_samples, mask_threshold=config.mask_threshold)
    smallest = min(min(m.shape) for m in train_tiles.masks)
    if smallest < config.crop_px:
        raise DataError(
            f"--crop-px {config.crop_px} is larger than the smallest training tile ({smallest} px)"
        )
    positives = train_tiles.positive_pixels()
    if positives == 0:
        raise DataError(
            f"the training split of {data_dir} has no cancer pixels; check the masks and --mask-threshold"
        )
    pos_weight = config.pos_weight or (train_tiles.total_pixels() - positives) / positives
    mean, std = _channel_stats(train_tiles)
    val_groups = sorted({s.group for s in val_samples})
    logger.info(
        "%s: %d tiles in %d groups; training on %d tiles, validating on %d tiles from %d groups; "
        "cancer %.1f%% of training pixels (pos_weight %.3f); device %s",
        data_dir, len(samples), len({s.group for s in samples}), len(train_tiles), len(val_tiles),
        len(val_groups), 100 * positives / train_tiles.total_pixels(), pos_weight, device,
    )

    _write_run_json(out_dir, config)  # only once the data is known to be usable

    torch.manual_seed(config.seed)
    model = UNet(base_channels=config.base_channels, norm=config.norm).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    autocast_dtype, scaler = _amp_settings(device)
    loss_fn = make_loss(config.loss, pos_weight=pos_weight)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    # Drop the last partial batch: a batch of one would give BatchNorm no statistics.
    steps_per_epoch = max(1, len(train_tiles) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps // 2)

    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_dice": None, "best_epoch": None, "history": []}
    if resume:
        state = load_checkpoint(out_dir, model=model, optimizer=optimizer, scaler=scaler)
        logger.info("resuming %s after epoch %d", out_dir, state["epoch"])
    training_record = {
        "dataset": str(config.data_dir),
        "dataset_sha256": fingerprint(samples, data_dir),
        "data_rules": {
            "mask_threshold": config.mask_threshold,
            "negative_classes": list(config.negative_classes),
            "group_regex": config.group_regex,
            "classes": sorted({s.class_name for s in samples}),
        },
        "split": {
            "method": "group",
            "seed": config.seed,
            "val_fraction": config.val_fraction,
            "n_train_tiles": len(train_tiles),
            "n_val_tiles": len(val_tiles),
            "n_train_groups": len({s.group for s in train_samples}),
            "n_val_groups": len(val_groups),
            "val_groups": val_groups,
        },
        "config": config.to_dict(),
        "pos_weight": pos_weight,
        "device": str(device),
        "torch_version": torch.__version__,
        "platform": platform.platform(),
    }

    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        started = time.monotonic()
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(len(train_tiles))
        model.train()
        loss_total = 0.0
        with Progress(steps_per_epoch, f"epoch {epoch}/{config.epochs}", enabled=show_progress) as bar:
            for batch_index in range(steps_per_epoch):
                indices = order[batch_index * config.batch_size : (batch_index + 1) * config.batch_size]
                images, masks = _batch(train_tiles, indices, config, rng)
                x = ((images.to(device) - mean_t) / std_t).contiguous()
                y = masks.to(device)
                lr = lr_at(
                    state["step"], total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=config.lr
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    logits = model(x)
                loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                state["step"] += 1
                loss_total += float(loss.detach())
                bar.update(loss=loss_total / (batch_index + 1))
        scores = score_tiles(
            model, val_tiles, mean=mean, std=std, device=device, threshold=0.5,
            batch_size=2 * config.batch_size, loss_fn=loss_fn, autocast_dtype=autocast_dtype,
        )
        metrics = scores.metrics()
        row = {"epoch": epoch, "lr": lr, "train_loss": loss_total / steps_per_epoch,
               "val_loss": metrics["loss"],
               **{k: v for k, v in metrics.items() if k not in ("loss", "threshold", "n_tiles", "n_pixels")},
               "seconds": round(time.monotonic() - started, 2)}
        state["history"].append(row)
        state["epoch"] = epoch
        if state["best_dice"] is None or metrics["dice"] > state["best_dice"]:
            state["best_dice"], state["best_epoch"] = metrics["dice"], epoch
            card = _make_card(
                config, mean=mean, std=std, metrics={"epoch": epoch, **metrics},
                training=training_record | {"best_epoch": epoch},
            )
            dtype = torch.float16 if config.export_dtype == "float16" else None
            save_model(model, card, out_dir / f"{EXPORT_STEM}.safetensors", float_dtype=dtype)
        save_checkpoint(out_dir, model=model, optimizer=optimizer, scaler=scaler, state=state)
        write_history(state["history"], out_dir, best_epoch=state["best_epoch"])
        logger.info(
            "epoch %d/%d: train loss %.4f | val loss %.4f, Dice %.4f, IoU %.4f, pixel accuracy %.4f "
            "(all-negative %.4f), sensitivity %.4f, specificity %.4f | best Dice %.4f (epoch %d) | %.0f s",
            epoch, config.epochs, row["train_loss"], row["val_loss"], row["dice"], row["iou"],
            row["pixel_accuracy"], row["all_negative_accuracy"], row["sensitivity"], row["specificity"],
            state["best_dice"], state["best_epoch"], row["seconds"],
        )

    card_path = out_dir / f"{EXPORT_STEM}.json"
    card = ModelCard.load(card_path)
    # Record how many epochs the run has now had, without touching the weights or their metrics.
    card = card.replace(training=card.training | {"epochs_run": state["epoch"]})
    card.save(card_path)
    return TrainResult(
        out_dir=out_dir,
        card_path=card_path,
        weights_path=out_dir / f"{EXPORT_STEM}.safetensors",
        best_epoch=int(state["best_epoch"]),
        metrics=dict(card.validation_metrics),
        history=list(state["history"]),
    )

