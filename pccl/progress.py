"""Progress for long work: tqdm bars on a terminal, and log lines for state transfers.

Bars (:func:`bar`) draw on stderr only when stderr is a TTY; elsewhere (tests, log files, CI)
they are disabled and cost one attribute check per update. Lines a tool prints while a bar is
drawn go through :func:`printing`, which lifts the bar for the write, so the printed text stays
exactly what it is without a bar.

:class:`TransferProgress` tracks one shared-state transfer: it is fed once per received data
frame (never per byte) from the peer's event-loop thread, logs
``state transfer: 96.0/256.0 MiB (37 %), 410 MB/s, ETA 0.4 s`` through the ``pccl.peer`` logger
at most every :data:`LOG_EVERY_S` seconds and once at the end (so a log file shows progress
too), and draws a byte bar with rate and ETA on a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

__all__ = ["LOG_EVERY_S", "MIN_TRANSFER_BYTES", "TransferProgress", "bar", "printing"]

#: Transfers smaller than this show no progress (they finish before anyone looks).
MIN_TRANSFER_BYTES = 64 << 20
#: Shortest interval between two progress log lines of one transfer.
LOG_EVERY_S = 1.0

_MIB = float(1 << 20)


def bar(total: float | None, desc: str, unit: str = "it", **kw: Any) -> tqdm:
    """A progress bar on stderr, drawn only when stderr is a terminal.

    Args:
        total: the count at completion (None: unknown).
        desc: the label in front of the bar.
        unit: what one count is.
        **kw: more :class:`tqdm.tqdm` options (``unit_scale``, ``leave``...).

    Returns:
        The bar; use it as a context manager, or ``close()`` it.
    """
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, unit=unit, disable=None, **kw)


@contextlib.contextmanager
def printing() -> Iterator[None]:
    """Lift every drawn bar while the block prints a line; redraw them after."""
    with tqdm.external_write_mode():
        yield


class TransferProgress:
    """Bytes received of one state transfer; see the module docstring.

    Not thread-safe: one transfer, fed from one event loop.
    """

    def __init__(
        self,
        total: int,
        log: logging.Logger,
        what: str = "state transfer",
        every_s: float = LOG_EVERY_S,
    ) -> None:
        self.total = total
        self.done = 0
        self.what = what
        self._log = log
        self._every = every_s
        self._t0 = time.monotonic()
        self._next = self._t0 + every_s
        self._closed = False
        self._bar = bar(total, what, unit="B", unit_scale=True, unit_divisor=1024)

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` more received (call once per data frame)."""
        self.done += nbytes
        self._bar.update(nbytes)
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._every
            self._log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``state transfer: 96.0/256.0 MiB (37 %), 410 MB/s, ETA 0.4 s``."""
        now = time.monotonic() if now is None else now
        dt = max(now - self._t0, 1e-9)
        rate = self.done / dt
        pct = 100 * self.done // self.total if self.total else 100
        head = f"{self.what}: {self.done / _MIB:.1f}/{self.total / _MIB:.1f} MiB ({pct} %)"
        if self.done >= self.total:
            return f"{head}, {rate / 1e6:.0f} MB/s, done in {dt:.1f} s"
        if self._closed:
            return f"{head}, {rate / 1e6:.0f} MB/s, stopped after {dt:.1f} s"
        eta = f"{(self.total - self.done) / rate:.1f} s" if rate > 0 else "?"
        return f"{head}, {rate / 1e6:.0f} MB/s, ETA {eta}"

    def close(self) -> None:
        """Log the final line (``done in``, or ``stopped after`` when bytes are missing) and
        remove the bar. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._next = float("inf")
        self._bar.close()
        self._log.info("%s", self.line())
