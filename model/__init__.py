"""The U-Net, its weight format (safetensors + JSON card) and the shipped default weights.

Public API::

    UNet, UNetConfig, receptive_radius_px     # the network and its geometry
    ModelCard                                 # the JSON card next to the weights
    default_weights, load_model, LoadedModel  # ready-to-run model
    save_model                                # weights + card, written together
    best_precision                            # fastest safe (precision, channels_last) per device
    read_weights, write_weights               # safetensors I/O with sha256, pickles refused
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slidejob.model.card import CARD_SCHEMA_PATH, ModelCard
from slidejob.model.layout import UNetConfig, receptive_radius_px
from slidejob.model.weights_io import (
    PICKLE_SUFFIXES,
    default_weights,
    read_weights,
    refuse_pickle,
    resolve_model_paths,
    write_weights,
)

if TYPE_CHECKING:
    from slidejob.model.runtime import (
        PRECISIONS,
        LoadedModel,
        best_precision,
        build_module,
        load_model,
        save_model,
    )
    from slidejob.model.unet import UNet

# The names that need torch are imported on first use (PEP 562): a Dask client reads the model
# card and finds the weights without torch (~180 MB); workers and training import them.
_LAZY = {
    "PRECISIONS": "slidejob.model.runtime",
    "LoadedModel": "slidejob.model.runtime",
    "best_precision": "slidejob.model.runtime",
    "build_module": "slidejob.model.runtime",
    "load_model": "slidejob.model.runtime",
    "save_model": "slidejob.model.runtime",
    "UNet": "slidejob.model.unet",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CARD_SCHEMA_PATH",
    "PICKLE_SUFFIXES",
    "PRECISIONS",
    "LoadedModel",
    "ModelCard",
    "UNet",
    "UNetConfig",
    "best_precision",
    "build_module",
    "default_weights",
    "load_model",
    "read_weights",
    "receptive_radius_px",
    "refuse_pickle",
    "resolve_model_paths",
    "save_model",
    "write_weights",
]
