"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

``checkpoint.safetensors`` holds the model's state (``model.*``) and the
optimizer's per-parameter tensors (``optimizer.<index>.<name>``);
``checkpoint.json`` holds the optimizer's hyperparameters, the loop counters,
the history so far and the sha256 of the tensor file, so a checkpoint whose two
halves come from different epochs (a crash between the two writes) is
detected instead of silently resumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from slidejob.errors import ModelError
from slidejob.model.weights_io import read_weights, write_weights

__all__ = ["CHECKPOINT_JSON", "CHECKPOINT_TENSORS", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
_FORMAT = 1


def save_checkpoint(
    out_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
) -> None:
    """Write the checkpoint pair into ``out_dir`` (tensors first, then the JSON that vouches for them).

    Parameters
    ----------
    out_dir
        Run folder.
    model, optimizer, scaler
        What to save (``scaler`` only exists for fp16 training on CUDA).
    state
        JSON-ready loop state (epoch, step, best Dice, history, …).
    """
    tensors = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in optimizer_state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    sha256 = write_weights(tensors, Path(out_dir) / CHECKPOINT_TENSORS)
    document = {
        "format": _FORMAT,
        "tensors_sha256": sha256,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "state": state,
    }
    path = Path(out_dir) / CHECKPOINT_JSON
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_checkpoint(
    out_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore model, optimizer and scaler from ``out_dir`` in place and return the loop state.

    Raises
    ------
    ModelError
        No checkpoint, or its halves do not belong together, or they do not fit the model.
    """
    path = Path(out_dir) / CHECKPOINT_JSON
    if not path.is_file():
        raise ModelError(f"no checkpoint to resume from: {path} does not exist")
    document = json.loads(path.read_text(encoding="utf-8"))
    if document.get("format") != _FORMAT:
        raise ModelError(f"checkpoint {path} has format {document.get('format')!r}, expected {_FORMAT}")
    tensors, _ = read_weights(Path(out_dir) / CHECKPOINT_TENSORS, expected_sha256=document["tensors_sha256"])
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint {path} does not fit the model being trained: {exc}") from exc
    per_param: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = tensor
    for index, values in document["optimizer_scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": document["optimizer_param_groups"]})
    if scaler is not None and document["grad_scaler"] is not None:
        scaler.load_state_dict(document["grad_scaler"])
    return dict(document["state"])
