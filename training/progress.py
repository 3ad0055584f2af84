"""A progress bar on a terminal, plain periodic log lines elsewhere (cluster logs, CI, pipes)."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11; requires-python is 3.10

__all__ = ["Progress"]

logger = logging.getLogger(__name__)


class Progress:
    """Counts steps of one phase and shows them with a running figure (e.g. loss).

    On a TTY, one line redrawn in place at most 10 times a second; otherwise a
    log line every ``interval_s`` seconds and one at the end, so a batch job's
    log gets a heartbeat without thousands of lines.

    Parameters
    ----------
    total
        Number of steps expected.
    description
        Prefix of every line, e.g. ``"epoch 3/40"``.
    stream
        Where a TTY bar is drawn (stderr by default).
    interval_s
        Seconds between plain lines when ``stream`` is not a terminal.
    enabled
        ``False`` shows nothing (used by tests and library callers).
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        stream: IO[str] | None = None,
        interval_s: float = 30.0,
        enabled: bool = True,
    ) -> None:
        self.total = total
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.enabled = enabled
        self.tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.postfix = ""
        self._start = time.monotonic()
        self._last_shown = self._start

    def _line(self) -> str:
        elapsed_s = time.monotonic() - self._start
        rate = self.done / elapsed_s if elapsed_s > 0 else 0.0
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        counts = f"{self.done}/{self.total}"
        return f"{self.description} [{bar}] {counts} {self.postfix} {rate:.2f} it/s {elapsed_s:.0f}s"

    def update(self, steps: int = 1, **figures: float) -> None:
        """Advance by ``steps``; ``figures`` (e.g. ``loss=0.31``) replace the shown ones."""
        self.done += steps
        if figures:
            self.postfix = " ".join(f"{k}={v:.4f}" for k, v in figures.items())
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty and (now - self._last_shown >= 0.1 or self.done >= self.total):
            self.stream.write("\r" + self._line())
            self.stream.flush()
            self._last_shown = now
        elif not self.tty and now - self._last_shown >= self.interval_s:
            logger.info("%s", self._line())
            self._last_shown = now

    def close(self) -> None:
        """Finish the bar's line (TTY) or log the final count (otherwise)."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self._line() + "\n")
            self.stream.flush()
        else:
            logger.info("%s", self._line())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
