"""Per-epoch history of a training run: CSV, JSON, and a PNG of the curves.

The PNG is drawn with pillow (a dependency), not matplotlib (which is not):
two panels, losses on the left, validation metrics on the right, the exported
epoch marked.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from slidejob.training.metrics import METRIC_NAMES

__all__ = ["HISTORY_COLUMNS", "draw_curves", "write_history"]

#: Columns of ``metrics.csv``, in order.
HISTORY_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "val_loss",
    *METRIC_NAMES,
    "best_threshold",
    "dice_at_best_threshold",
    "seconds",
)

_LOSS_SERIES = (("train_loss", (31, 119, 180)), ("val_loss", (255, 127, 14)))
_METRIC_SERIES = (
    ("dice", (214, 39, 40)),
    ("iou", (148, 103, 189)),
    ("pixel_accuracy", (44, 160, 44)),
    ("all_negative_accuracy", (127, 127, 127)),
    ("sensitivity", (23, 190, 207)),
    ("specificity", (188, 189, 34)),
)


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_history(history: Sequence[Mapping[str, Any]], out_dir: Path, *, best_epoch: int | None) -> None:
    """Write ``metrics.csv``, ``metrics.json`` and ``curves.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    rows = [{k: _finite_or_none(row.get(k)) for k in HISTORY_COLUMNS} for row in history]
    tmp = out_dir / ".metrics.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out_dir / "metrics.csv")
    _write_text_atomically(
        out_dir / "metrics.json", json.dumps({"best_epoch": best_epoch, "epochs": rows}, indent=2) + "\n"
    )
    draw_curves(history, best_epoch=best_epoch).save(out_dir / "curves.png")


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    history: Sequence[Mapping[str, Any]],
    series: Sequence[tuple[str, tuple[int, int, int]]],
    title: str,
    y_range: tuple[float, float] | None,
    best_epoch: int | None,
) -> None:
    font = ImageFont.load_default()
    left, top, right, bottom = box
    epochs = [int(row["epoch"]) for row in history]
    values = [
        float(row[name]) for row in history for name, _ in series
        if row.get(name) is not None and math.isfinite(float(row[name]))
    ]
    if y_range is None:
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        low = min(0.0, low)
        high = high if high > low else low + 1.0
    else:
        low, high = y_range
    first, last = (min(epochs), max(epochs)) if epochs else (0, 1)
    span = max(last - first, 1)
    margin = 0.03 * span  # keeps the first and last points off the frame

    def xy(epoch: float, value: float) -> tuple[float, float]:
        x = left + (epoch - first + margin) / (span + 2 * margin) * (right - left)
        return x, bottom - (value - low) / (high - low) * (bottom - top)

    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left, top - 16), title, fill=(0, 0, 0), font=font)
    for i in range(6):
        value = low + (high - low) * i / 5
        y = xy(first, value)[1]
        draw.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((left - 40, y - 5), f"{value:.2f}", fill=(0, 0, 0), font=font)
    step = max(1, math.ceil(span / 10))
    for epoch in range(first, last + 1, step):
        x = xy(epoch, low)[0]
        draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
        draw.text((x - 4, bottom + 6), str(epoch), fill=(0, 0, 0), font=font)
    draw.text(((left + right) / 2 - 15, bottom + 20), "epoch", fill=(0, 0, 0), font=font)
    if best_epoch is not None and first <= best_epoch <= last:
        x = xy(best_epoch, low)[0]
        for y in range(top, bottom, 8):
            draw.line([(x, y), (x, min(y + 4, bottom))], fill=(0, 0, 0))
    for index, (name, colour) in enumerate(series):
        points = [
            xy(int(row["epoch"]), float(row[name])) for row in history
            if row.get(name) is not None and math.isfinite(float(row[name]))
        ]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        # Legend under the panel, three entries a row, so it never hides a curve.
        legend_x = left + 155 * (index % 3)
        legend_y = bottom + 40 + 16 * (index // 3)
        draw.line([(legend_x, legend_y + 5), (legend_x + 20, legend_y + 5)], fill=colour, width=3)
        draw.text((legend_x + 25, legend_y), name, fill=(0, 0, 0), font=font)


def draw_curves(history: Sequence[Mapping[str, Any]], *, best_epoch: int | None = None) -> Image.Image:
    """Loss curves (left) and validation metrics (right) against epoch; the exported epoch dashed."""
    image = Image.new("RGB", (1100, 460), "white")
    draw = ImageDraw.Draw(image)
    _panel(draw, (60, 40, 520, 380), history, _LOSS_SERIES, "loss", None, best_epoch)
    title = "validation metrics"
    if best_epoch is not None:
        title += f" (dashed: exported epoch {best_epoch})"
    _panel(draw, (620, 40, 1080, 380), history, _METRIC_SERIES, title, (0.0, 1.0), best_epoch)
    return image
