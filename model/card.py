"""The model card: a JSON file next to the weights that says what they are.

A card ``NAME.json`` belongs to the weights ``NAME.safetensors`` in the same
folder.  It is validated against the schema shipped in this package
(``card.schema.json``) on every load, so a hand-edited card with a typo fails
at load time with the path of the bad field, not halfway through a slide.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from slidejob.errors import ModelError
from slidejob.model._schema import schema_errors
from slidejob.model.layout import UNetConfig, receptive_radius_px

__all__ = ["CARD_SCHEMA_PATH", "ModelCard", "card_schema"]

#: The JSON schema every card must satisfy.
CARD_SCHEMA_PATH = Path(__file__).with_name("card.schema.json")


@lru_cache(maxsize=1)
def card_schema() -> dict[str, Any]:
    """The parsed card schema (read once)."""
    return json.loads(CARD_SCHEMA_PATH.read_text(encoding="utf-8"))


def _jsonable(value: Any) -> Any:
    # NaN is not JSON; a metric that is undefined (e.g. sensitivity without
    # positive pixels) is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelCard:
    """What a set of weights is, how to feed it, and how good it was on validation.

    Attributes
    ----------
    name
        Short identifier, e.g. ``"ebhi-seg-unet16"``.
    description
        One paragraph for humans: what the weights are and are not.
    architecture
        ``{"name": "unet", "config": UNetConfig.to_dict(), "receptive_radius_px": int}``.
    input_normalization
        ``{"space": "rgb_0_1", "mean": [r, g, b], "std": [r, g, b]}``: the network
        sees ``(rgb_uint8 / 255 - mean) / std`` per channel.
    mpp_um
        Micrometres per pixel of the training images, or ``None`` when unknown.
    magnification
        Magnification of the training images as text (``"400x microscope"``), or ``None``.
    threshold
        Probability at or above which a pixel is called cancer.
    training
        ``dataset``, ``data_rules`` (``mask_threshold``, ``negative_classes``,
        ``group_regex``: also the defaults of ``slidejob evaluate``), ``split``
        (``method``, ``seed``, ``val_fraction``, ``val_groups``) and the
        hyperparameters of the run.
    validation_metrics
        Pooled pixel metrics of the exported epoch on the validation split.
    weights_sha256
        Hex sha256 of the ``.safetensors`` file; checked on every load.
    weights_dtype
        Storage dtype of the floating-point tensors (loading upcasts to float32).
    slidejob_version
        Version of slidejob that wrote the weights.
    license, data_attribution
        Terms of the weights and credit for the training data.
    schema_version
        Version of the card schema.
    """

    name: str
    description: str
    architecture: dict[str, Any]
    input_normalization: dict[str, Any]
    mpp_um: float | None
    magnification: str | None
    threshold: float
    training: dict[str, Any]
    validation_metrics: dict[str, float | None]
    weights_sha256: str
    weights_dtype: str
    slidejob_version: str
    license: str | None = None
    data_attribution: str | None = None
    schema_version: int = 1
    # Not part of the JSON: where the card was read from, for error messages.
    source: Path | None = field(default=None, compare=False, repr=False)

    @property
    def unet_config(self) -> UNetConfig:
        """The architecture config as a :class:`~slidejob.model.unet.UNetConfig`."""
        return UNetConfig.from_dict(self.architecture["config"])

    @property
    def receptive_radius_px(self) -> int:
        """Receptive radius of the architecture in input pixels (computed, not read from the card)."""
        return receptive_radius_px(self.unet_config)

    @property
    def mask_threshold(self) -> int:
        """Grey level at or above which a training mask pixel counted as cancer."""
        return int(self.training["data_rules"]["mask_threshold"])

    @property
    def negative_classes(self) -> tuple[str, ...]:
        """Class folders whose tiles counted as all-negative in training."""
        return tuple(self.training["data_rules"]["negative_classes"])

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data (NaN metrics become ``null``)."""
        data = asdict(self)  # deep-copies the nested dicts, so the caller cannot mutate the card
        del data["source"]
        return _jsonable(data)

    def replace(self, **changes: Any) -> ModelCard:
        """A copy with some fields changed (the card is frozen)."""
        data = self.to_dict() | changes
        return ModelCard.from_dict(data, source=self.source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: Path | None = None) -> ModelCard:
        """Validate ``data`` against the card schema and build a card.

        Raises
        ------
        ModelError
            Listing every schema violation, naming ``source`` when given.
        """
        where = f"model card {source}" if source is not None else "model card"
        errors = schema_errors(data, card_schema())
        if not errors:
            try:
                UNetConfig.from_dict(data["architecture"]["config"])
            except ValueError as exc:
                errors.append(f"$.architecture.config: {exc}")
        if errors:
            raise ModelError(
                f"{where} does not match the card schema {CARD_SCHEMA_PATH.name}:\n  "
                + "\n  ".join(errors)
                + "\nFix the card (or re-export the weights with `slidejob train`)."
            )
        known = {f.name for f in fields(cls)} - {"source"}
        return cls(**{k: v for k, v in data.items() if k in known}, source=source)

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """Read and validate a card from ``path``.

        Raises
        ------
        ModelError
            The file is missing, not JSON, or does not match the schema.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model card {path} not found; a card NAME.json sits next to NAME.safetensors")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"model card {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, source=path)

    def save(self, path: Path) -> None:
        """Write the card as indented JSON (validated first, so no invalid card is ever written)."""
        data = self.to_dict()
        ModelCard.from_dict(data, source=Path(path))
        Path(path).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
