"""Weights on disk: safetensors only, checked by sha256, never unpickled.

A pickle (``torch.save``'s ``.pt``/``.pth``, ``.pkl``, Lightning's ``.ckpt``)
executes code from the file while it loads, so slidejob refuses to open one at
all.  Safetensors is a JSON header plus raw tensor bytes: reading it runs
nothing.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from slidejob.errors import ModelError, UnsafeWeights

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "PICKLE_SUFFIXES",
    "default_weights",
    "read_weights",
    "refuse_pickle",
    "resolve_model_paths",
    "sha256_bytes",
    "write_weights",
]

#: File suffixes that are (or usually are) Python pickles.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib")

#: Where the shipped weights live inside the package.
DEFAULT_WEIGHTS_DIR = Path(__file__).with_name("weights")
_DEFAULT_STEM = "default"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``.

    >>> sha256_bytes(b"")[:16]
    'e3b0c44298fc1c14'
    """
    return hashlib.sha256(data).hexdigest()


def refuse_pickle(path: Path) -> None:
    """Raise :class:`UnsafeWeights` if ``path`` names a pickle-based weights file.

    Raises
    ------
    UnsafeWeights
        The suffix is one of :data:`PICKLE_SUFFIXES`.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeWeights(
            f"refusing to load {path}: {path.suffix} files are Python pickles, and loading a pickle runs "
            "arbitrary code from the file. slidejob reads weights only from .safetensors files with a "
            "model card; convert trusted weights once with safetensors.torch.save_file(state_dict, ...) "
            "in an isolated environment, or retrain with `slidejob train`."
        )


def _looks_like_pickle(head: bytes) -> bool:
    # A safetensors file starts with its header's length (8 bytes, little
    # endian) and then the JSON header; that length's low byte may well be
    # 0x80, so recognise safetensors first (fixed by the lead: a tiny model's
    # 0x1e80-byte header was refused as a pickle).
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32):
        return False
    # Protocol-2+ pickles start with 0x80; torch.save's zip archives with "PK".
    return head[:1] == b"\x80" or head[:2] == b"PK"


def default_weights() -> tuple[Path, Path]:
    """Paths of the shipped default model: ``(card, safetensors)``.

    Raises
    ------
    ModelError
        The package was installed without its weights.
    """
    card = DEFAULT_WEIGHTS_DIR / f"{_DEFAULT_STEM}.json"
    weights = DEFAULT_WEIGHTS_DIR / f"{_DEFAULT_STEM}.safetensors"
    for path in (card, weights):
        if not path.is_file():
            raise ModelError(
                f"the default model file {path} is missing from the installed package; reinstall slidejob "
                "or pass --weights with a card/safetensors pair"
            )
    return card, weights


def resolve_model_paths(card_path: Path | None = None, weights_path: Path | None = None) -> tuple[Path, Path]:
    """Fill in whichever of the card and weights paths is missing.

    ``NAME.json`` pairs with ``NAME.safetensors`` in the same folder; both
    missing means the shipped default.  A ``.json`` passed as ``weights_path``
    is taken as the card, so a CLI option can accept either file.

    Raises
    ------
    UnsafeWeights
        Either path names a pickle.
    """
    if weights_path is not None and card_path is None and Path(weights_path).suffix.lower() == ".json":
        card_path, weights_path = Path(weights_path), None
    for path in (card_path, weights_path):
        if path is not None:
            refuse_pickle(Path(path))
    if card_path is None and weights_path is None:
        return default_weights()
    if weights_path is None:
        return Path(card_path), Path(card_path).with_suffix(".safetensors")  # type: ignore[arg-type]
    if card_path is None:
        return Path(weights_path).with_suffix(".json"), Path(weights_path)
    return Path(card_path), Path(weights_path)


def read_weights(path: Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read a safetensors file into CPU tensors, checking its sha256 first.

    The file is read once into memory, hashed, and parsed from those same
    bytes, so what is checked is what is loaded.

    Parameters
    ----------
    path
        A ``.safetensors`` file.
    expected_sha256
        Hex digest from the model card; ``None`` skips the check.

    Returns
    -------
    tuple
        ``(state_dict, sha256)``.

    Raises
    ------
    UnsafeWeights
        ``path`` is a pickle (by suffix or by content).
    ModelError
        Missing file, not safetensors, or sha256 mismatch.
    """
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} not found")
    data = path.read_bytes()
    if path.suffix.lower() != ".safetensors" or _looks_like_pickle(data[:16]):
        if _looks_like_pickle(data[:16]):
            raise UnsafeWeights(
                f"refusing to load {path}: its content is a Python pickle (or a torch.save zip holding one), "
                "and loading a pickle runs arbitrary code. Use a .safetensors file with a model card."
            )
        raise ModelError(f"weights file {path} should be a .safetensors file, found suffix {path.suffix!r}")
    found = sha256_bytes(data)
    if expected_sha256 is not None and found != expected_sha256:
        raise ModelError(
            f"weights file {path} does not match its model card: expected sha256 {expected_sha256}, "
            f"found {found}. The file was changed or belongs to another card; restore it or re-export "
            "the card and weights together."
        )
    # torch only here and in write_weights: finding and checking a model (paths, sha256) is done by
    # the Dask client too, which never runs it.
    from safetensors.torch import load as safetensors_load

    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(f"weights file {path} is not a readable safetensors file: {exc}") from exc
    return tensors, found


def write_weights(
    state_dict: Mapping[str, torch.Tensor], path: Path, *, float_dtype: torch.dtype | None = None
) -> str:
    """Write tensors to ``path`` as safetensors, atomically, and return the file's sha256.

    Parameters
    ----------
    state_dict
        Name → tensor (moved to CPU and made contiguous here).
    path
        Destination ``.safetensors`` file; written to a temporary name in the same
        folder and renamed, so a crash never leaves half a file under the real name.
    float_dtype
        Store floating-point tensors in this dtype (e.g. ``torch.float16`` to halve
        the size); integer tensors are kept as they are.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"weights must be written as .safetensors, not {path.name}")
    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu")
        if float_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(float_dtype)
        # clone: safetensors refuses tensors that share storage.
        tensors[name] = tensor.contiguous().clone()
    from safetensors.torch import save as safetensors_save

    data = safetensors_save(tensors, metadata={"format": "pt"})
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name opened with open(), not mkstemp(): mkstemp makes
    # the file owner-only (0600), and weights on a shared cluster filesystem
    # must stay readable by the group as the umask allows.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha256_bytes(data)
