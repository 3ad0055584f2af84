"""Packaged defaults in ``dask.config`` (the dask-jobqueue pattern)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.config
import yaml

_DEFAULTS = Path(__file__).with_name("slidejob.yaml")

with open(_DEFAULTS) as fh:
    dask.config.update_defaults(yaml.safe_load(fh))


def get(key: str, value: Any = None) -> Any:
    """``value`` if given, else ``dask.config.get("slidejob." + key)``.

    >>> get("tile.block-chunks", 8)
    8
    >>> get("tile.block-chunks")
    4
    """
    return value if value is not None else dask.config.get("slidejob." + key)
