"""Errors that slidejob raises on purpose.

Each subclass also inherits the built-in type a caller would expect, so code
that catches ``FileNotFoundError`` or ``ValueError`` keeps working.  Messages
name the file, say what was expected and what was found, and the fix.
"""

from __future__ import annotations

import errno

#: Exit statuses the CLI uses, so that a scheduler can tell "fix the input"
#: from "retry": 1 = a deliberate error of ours, 2 = usage (click), 3 = bad
#: input (slide missing, unreadable, unsupported), 4 = output already exists,
#: 5 = the Dask cluster cannot be reached (retry when it is up), 6 = the output's
#: file system is full or over quota (rerun after freeing space).
EXIT_ERROR = 1
EXIT_BAD_INPUT = 3
EXIT_OUTPUT_EXISTS = 4
EXIT_CLUSTER_UNREACHABLE = 5
EXIT_STORAGE_FULL = 6

#: ``OSError.errno`` values that say the file system is full or over quota (:class:`OutputStorageFull`).
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class SlidejobError(Exception):
    """Base of every error slidejob raises deliberately."""

    exit_code = EXIT_ERROR


class SlideNotFound(SlidejobError, FileNotFoundError):
    """The slide path does not exist or is not a file."""

    exit_code = EXIT_BAD_INPUT


class UnsupportedSlide(SlidejobError, ValueError):
    """The file is not a slide slidejob can read (format, pixel type, size)."""

    exit_code = EXIT_BAD_INPUT


class CorruptSlide(SlidejobError, ValueError):
    """The file claims to be a slide but its content cannot be decoded."""

    exit_code = EXIT_BAD_INPUT


class OutputExists(SlidejobError, FileExistsError):
    """The output already exists and overwriting was not asked for."""

    exit_code = EXIT_OUTPUT_EXISTS


class ClusterUnreachable(SlidejobError, ConnectionError):
    """The Dask scheduler given by address or scheduler file cannot be reached."""

    exit_code = EXIT_CLUSTER_UNREACHABLE


class OutputStorageFull(SlidejobError, OSError):
    """The output's file system is full or over quota: every further slide would fail too, so the batch stops."""

    exit_code = EXIT_STORAGE_FULL


class ModelError(SlidejobError, ValueError):
    """Weights or model card are missing, tampered with or inconsistent."""


class UnsafeWeights(ModelError):
    """A pickle-based weights file was offered; loading it would run arbitrary code."""


class DataError(SlidejobError, ValueError):
    """Training or evaluation data is missing or inconsistent."""
