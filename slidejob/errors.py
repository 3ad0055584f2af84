"""Errors that slidejob raises on purpose.

Each subclass also inherits the built-in type a caller would expect, so code
that catches ``FileNotFoundError`` or ``ValueError`` keeps working.  Messages
name the file, say what was expected and what was found, and the fix.
"""

from __future__ import annotations


class SlidejobError(Exception):
    """Base of every error slidejob raises deliberately."""


class SlideNotFound(SlidejobError, FileNotFoundError):
    """The slide path does not exist or is not a file."""


class UnsupportedSlide(SlidejobError, ValueError):
    """The file is not a slide slidejob can read (format, pixel type, size)."""


class CorruptSlide(SlidejobError, ValueError):
    """The file claims to be a slide but its content cannot be decoded."""


class OutputExists(SlidejobError, FileExistsError):
    """The output already exists and overwriting was not asked for."""


class ModelError(SlidejobError, ValueError):
    """Weights or model card are missing, tampered with or inconsistent."""


class UnsafeWeights(ModelError):
    """A pickle-based weights file was offered; loading it would run arbitrary code."""


class DataError(SlidejobError, ValueError):
    """Training or evaluation data is missing or inconsistent."""
