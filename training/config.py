"""The settings of a training run, importable without torch (the CLI builds its options from them).

A frozen dataclass because the same bundle travels far: CLI → :func:`~slidejob.training.train.train_model`
→ ``run.json`` (checked again on ``--resume``) → the model card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slidejob.training.augment import Augmentation
from slidejob.training.data import DEFAULT_GROUP_REGEX

__all__ = ["EXPORT_DTYPES", "LOSSES", "TrainConfig"]

#: Loss names (see :func:`~slidejob.training.losses.make_loss`).
LOSSES = ("bce-dice", "focal-dice", "bce", "focal")
#: Storage dtypes of exported weights.
EXPORT_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run's result (recorded in ``run.json`` and the card).

    Attributes
    ----------
    data_dir
        Folder of labelled tiles (see :mod:`slidejob.training.data`).
    epochs
        Passes over the training split.
    batch_size
        Crops per optimizer step.
    crop_px
        Side of the random training crops; a multiple of 8.
    base_channels, norm
        U-Net width and normalization.
    lr, weight_decay
        AdamW peak learning rate and decoupled weight decay.
    warmup_epochs
        Linear warm-up length before the cosine decay.
    seed
        Seed of the split, the weight init, the data order and the augmentation.
    group_regex, negative_classes, mask_threshold, val_fraction
        Data rules (see :func:`~slidejob.training.data.discover_samples`,
        :func:`~slidejob.training.data.split_by_group`).
    loss, pos_weight
        Loss name (:data:`~slidejob.training.losses.LOSSES`) and positive-pixel
        weight; ``None`` means negatives / positives of the training split.
    augmentation
        Augmentation strengths.
    export_dtype
        ``"float32"`` or ``"float16"`` storage of the exported weights.
    name, description, magnification, mpp_um, license, data_attribution
        Copied into the model card.
    """

    data_dir: str
    epochs: int = 40
    batch_size: int = 8
    crop_px: int = 192
    base_channels: int = 16
    norm: str = "batch"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    group_regex: str = DEFAULT_GROUP_REGEX
    negative_classes: tuple[str, ...] = ()
    mask_threshold: int = 128
    val_fraction: float = 0.2
    loss: str = "bce-dice"
    pos_weight: float | None = None
    augmentation: Augmentation = field(default_factory=Augmentation)
    export_dtype: str = "float32"
    name: str | None = None
    description: str | None = None
    magnification: str | None = None
    mpp_um: float | None = None
    license: str | None = None
    data_attribution: str | None = None

    def __post_init__(self) -> None:
        if self.crop_px < 8 or self.crop_px % 8:
            raise ValueError(f"crop_px must be a positive multiple of 8, got {self.crop_px}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be float32 or float16, got {self.export_dtype!r}")
        if not 1 <= self.mask_threshold <= 255:
            raise ValueError(f"mask_threshold must be in 1..255, got {self.mask_threshold}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``run.json`` holds)."""
        data = asdict(self)
        data["negative_classes"] = list(self.negative_classes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["negative_classes"] = tuple(data.get("negative_classes", ()))
        data["augmentation"] = Augmentation(**data.get("augmentation", {}))
        return cls(**data)
