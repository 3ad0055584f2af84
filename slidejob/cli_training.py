"""``slidejob train`` and ``slidejob evaluate``: parse, validate, call one :mod:`slidejob.training` function.

torch is imported inside the commands, not here: ``slidejob.cli`` imports this
module, and every other command (``info``, ``tissue``, …) would otherwise pay
torch's import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import click

from slidejob.errors import SlidejobError
from slidejob.training.config import EXPORT_DTYPES, LOSSES, TrainConfig

__all__ = ["evaluate", "train"]

_DEFAULTS = TrainConfig(data_dir=".")
# Copies of slidejob.model's NORMS and PRECISIONS (that package imports torch);
# tests/training/test_cli.py checks that they agree.
_NORMS = ("batch", "group", "none")
_PRECISIONS = ("bf16", "fp16", "fp32")


def _fail(exc: SlidejobError) -> NoReturn:
    # Same shape as slidejob.cli's one-line errors: one line on stderr, the error's exit status.
    click.echo(f"slidejob: error: {exc}", err=True)
    raise SystemExit(getattr(exc, "exit_code", 1))


def _crop_multiple_of_8(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value % 8:
        raise click.BadParameter(f"must be a multiple of 8 (the U-Net halves it 3 times), got {value}")
    return value


@click.command(
    "train",
    epilog="""\b
Examples:
  slidejob train ../shared/data/annotated/ebhi-seg --out training-runs/ebhi --negative-class Normal
  slidejob train DATA --out RUN ...same options... --resume   (continue an interrupted run)
  (docs/training.md has the exact command behind the shipped weights)
""",
)
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoints, metrics.csv/json, curves.png, model.safetensors + model.json.")
@click.option("--epochs", type=click.IntRange(min=1), default=_DEFAULTS.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=_DEFAULTS.batch_size, show_default=True,
              help="Crops per step (at least 2: BatchNorm needs a batch).")
@click.option("--crop-px", type=click.IntRange(min=8), default=_DEFAULTS.crop_px, show_default=True,
              callback=_crop_multiple_of_8, help="Side of the random training crops, a multiple of 8.")
@click.option("--base-channels", type=click.IntRange(min=1), default=_DEFAULTS.base_channels,
              show_default=True,
              help="U-Net width; inference cost grows with its square.")
@click.option("--norm", type=click.Choice(_NORMS), default=_DEFAULTS.norm, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.lr, show_default=True,
              help="Peak AdamW learning rate (linear warm-up, then cosine decay).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=_DEFAULTS.weight_decay,
              show_default=True)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
              help="Seeds the split, weight init, data order and augmentation.")
@click.option("--group-regex", default=_DEFAULTS.group_regex, show_default=True,
              help="Regex on the file name; its first group is the patient/slide the split keeps together.")
@click.option("--negative-class", "negative_classes", multiple=True,
              help="Class folder whose tiles are all background whatever its masks mark (repeatable).")
@click.option("--mask-threshold", type=click.IntRange(1, 255), default=_DEFAULTS.mask_threshold,
              show_default=True, help="Mask grey level at or above which a pixel is cancer.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=_DEFAULTS.val_fraction, show_default=True,
              help="Share of tiles (whole groups) for validation.")
@click.option("--loss", type=click.Choice(LOSSES), default=_DEFAULTS.loss, show_default=True)
@click.option("--pos-weight", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Weight of cancer pixels in the loss  "
                   "[default: negatives/positives of the training split]")
@click.option("--export-dtype", type=click.Choice(EXPORT_DTYPES), default=_DEFAULTS.export_dtype,
              show_default=True, help="Storage dtype of the exported weights (loading upcasts).")
@click.option("--device", default=None, help="torch device  [default: cuda if available, else cpu]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--card-name", default=None, help="Model card name  [default: unet<width>-<data folder>]")
@click.option("--card-description", default=None, help="What the weights are, for the model card.")
@click.option("--card-magnification", default=None, help='Magnification of the data, e.g. "400x microscope".')
@click.option("--card-mpp-um", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Micrometres per pixel of the data, when known.")
@click.option("--card-license", default=None, help="License of the weights.")
@click.option("--card-data-attribution", default=None, help="Credit line for the training data.")
@click.option("--quiet", is_flag=True, help="No progress bar or progress lines.")
def train(
    data: Path,
    out_dir: Path,
    epochs: int,
    batch_size: int,
    crop_px: int,
    base_channels: int,
    norm: str,
    lr: float,
    weight_decay: float,
    seed: int,
    group_regex: str,
    negative_classes: tuple[str, ...],
    mask_threshold: int,
    val_fraction: float,
    loss: str,
    pos_weight: float | None,
    export_dtype: str,
    device: str | None,
    resume: bool,
    card_name: str | None,
    card_description: str | None,
    card_magnification: str | None,
    card_mpp_um: float | None,
    card_license: str | None,
    card_data_attribution: str | None,
    quiet: bool,
) -> None:
    """Train the U-Net on labelled tiles in DATA and export the best epoch (by validation Dice).

    DATA holds image/ + label/ folders, or class folders that each hold them
    (EBHI-Seg's layout).  The split is by group (--group-regex), never by tile.
    """
    config = TrainConfig(
        data_dir=str(data),
        epochs=epochs,
        batch_size=batch_size,
        crop_px=crop_px,
        base_channels=base_channels,
        norm=norm,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        group_regex=group_regex,
        negative_classes=tuple(negative_classes),
        mask_threshold=mask_threshold,
        val_fraction=val_fraction,
        loss=loss,
        pos_weight=pos_weight,
        export_dtype=export_dtype,
        name=card_name,
        description=card_description,
        magnification=card_magnification,
        mpp_um=card_mpp_um,
        license=card_license,
        data_attribution=card_data_attribution,
    )
    from slidejob.training.train import train_model

    try:
        result = train_model(config, out_dir=out_dir, resume=resume, device=device, show_progress=not quiet)
    except SlidejobError as exc:
        _fail(exc)
    metrics = result.metrics
    click.echo(
        f"best epoch {result.best_epoch}: validation Dice {metrics['dice']:.4f}, IoU {metrics['iou']:.4f}, "
        f"pixel accuracy {metrics['pixel_accuracy']:.4f} "
        f"(all-negative {metrics['all_negative_accuracy']:.4f})\n"
        f"model card {result.card_path}\nweights    {result.weights_path}"
    )


@click.command(
    "evaluate",
    epilog="""\b
Examples:
  slidejob evaluate ../shared/data/annotated/ebhi-seg            (the shipped model)
  slidejob evaluate --weights RUN/model.json DATA --format json
""",
)
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Model card (.json) or weights (.safetensors)  [default: the shipped model]")
@click.option("--mask-threshold", type=click.IntRange(1, 255), default=None,
              help="Mask grey level at or above which a pixel is cancer  [default: from the card]")
@click.option("--negative-class", "negative_classes", multiple=True,
              help="All-background class folder (repeatable)  [default: from the card]")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Probability decision threshold  [default: from the card]")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--device", default=None, help="torch device  [default: cuda if available, else cpu]")
@click.option("--precision", type=click.Choice(_PRECISIONS), default="fp32", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
def evaluate(
    data: Path,
    weights: Path | None,
    mask_threshold: int | None,
    negative_classes: tuple[str, ...],
    threshold: float | None,
    output_format: str,
    device: str | None,
    precision: str,
    batch_size: int,
) -> None:
    """Print pooled pixel metrics of a model on labelled tiles in DATA, and the Dice-maximising threshold."""
    from slidejob.training.evaluate import evaluate_model, format_table

    try:
        result = evaluate_model(
            data,
            weights=weights,
            mask_threshold=mask_threshold,
            negative_classes=tuple(negative_classes) or None,
            threshold=threshold,
            device=device,
            precision=precision,
            batch_size=batch_size,
        )
    except SlidejobError as exc:
        _fail(exc)
    click.echo(result.to_json() if output_format == "json" else format_table(result))
