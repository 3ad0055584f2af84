"""slidejob: find cancer in whole-slide images, in batch, on Dask."""

from __future__ import annotations

from slidejob._version import __version__

__all__ = ["__version__"]
