"""Same-host shared-memory ring links: payload bytes through a mapped ring, headers over TCP.

When a ring successor is on this host, the TCP stream to it still carries the handshake and
every frame header, but the payloads go through a shared-memory segment the sender creates
(``/dev/shm/pccl-<pid>-<random>``, mode 0600) and names in its authenticated ``P2P_HELLO``.
The receiver maps it only after the hello verified, only if the file is a regular file of
this user of exactly the announced size, unlinks it at once and says so in ``P2P_HELLO_ACK``;
otherwise the stream carries its payloads over TCP as before. This saves the kernel's TCP path
per byte (two socket copies, segmentation, softirq work) for one user-space copy on each side.

Ring rule, computed identically on both sides from the payload lengths in frame order (one
TCP stream per segment, so the order is the header order): a payload of L bytes starts at the
write position unless it would cross the ring's end, in which case it starts at the next
multiple of the capacity; positions are monotonic byte counts, the ring offset is the
position modulo the capacity. The writer waits (futex, :mod:`pccl._shm`) until the reader
has consumed up to ``end - capacity``; the reader publishes its consumed position after each
frame's bytes are out of the ring. Zero-length payloads take no ring space.

The writer reserves the segment's pages when it creates it (``posix_fallocate``): on a full
tmpfs the offer is simply not made, where a sparse file would fault (SIGBUS) mid-copy.

Invariants: the reader never reads outside the ring (every length is checked against the
capacity before it is used, a violation is a ``ProtocolError`` that breaks only this stream);
a writer never waits longer than ``_WAIT_SLICE_MS`` without checking that it was stopped.

:class:`ShmWriter` runs on the stream's sender thread; :class:`ShmReader` on the peer's event
loop thread.
"""

from __future__ import annotations

import contextlib
import importlib
import mmap
import os
import re
import secrets
import stat
from collections.abc import Callable
from typing import Any

import numpy as np

from pccl.errors import ProtocolError


def _load() -> Any:
    """The ``pccl._shm`` extension, or None where it was not built (then TCP only)."""
    try:
        return importlib.import_module("pccl._shm")
    except ImportError:  # pragma: no cover - built without the extension
        return None


_shm: Any = _load()
#: Whether this process can offer and map shared-memory links.
AVAILABLE: bool = _shm is not None and bool(_shm.AVAILABLE) and os.path.isdir("/dev/shm")

__all__ = ["AVAILABLE", "MAX_BYTES", "MIN_BYTES", "ShmReader", "ShmWriter"]

#: Bounds of a segment's ring capacity (the receiver refuses anything else).
MIN_BYTES = 1 << 20
MAX_BYTES = 1 << 30
_CTRL = 64
_DIR = "/dev/shm"
_NAME = re.compile(r"pccl-[0-9]{1,10}-[0-9a-f]{16}")
_WAIT_SLICE_MS = 100


def _place(pos: int, n: int, cap: int) -> tuple[int, int]:
    """(start, end) positions of an ``n``-byte payload written at ``pos`` (the ring rule)."""
    off = pos % cap
    if off + n > cap:
        pos += cap - off
    return pos, pos + n


class _Segment:
    """A mapped segment: a 64-byte control block, then ``cap`` ring bytes."""

    def __init__(self, fd: int, cap: int) -> None:
        try:
            self.map = mmap.mmap(fd, _CTRL + cap)
        finally:
            os.close(fd)
        self.cap = cap
        whole = np.frombuffer(self.map, dtype=np.uint8)
        self.ctrl = whole[:_CTRL]
        self.data = whole[_CTRL:]


class ShmWriter:
    """Sending end of a link: creates the segment; :meth:`write` copies one payload in."""

    def __init__(self, cap: int) -> None:
        if not MIN_BYTES <= cap <= MAX_BYTES:
            raise ValueError(f"ring of {cap} bytes: not in [{MIN_BYTES}, {MAX_BYTES}]")
        self.name = f"pccl-{os.getpid()}-{secrets.token_hex(8)}"
        self.path = os.path.join(_DIR, self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Reserve every page now: a sparse file on a full tmpfs (a container's 64 MiB
            # /dev/shm) would turn a later copy into SIGBUS; here it is ENOSPC, and TCP.
            os.posix_fallocate(fd, 0, _CTRL + cap)
        except OSError:
            os.close(fd)
            self.unlink()
            raise
        self.seg = _Segment(fd, cap)
        self.pos = 0

    def unlink(self) -> None:
        """Remove the name (the receiver unlinks it first when it maps it); idempotent."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def write(self, payload: memoryview, stopped: Callable[[], bool]) -> bool:
        """Copy ``payload`` into the ring once the reader has made room (GIL released while
        waiting and copying). False if ``stopped()`` turned true while waiting."""
        n = len(payload)
        if n == 0:
            return True
        seg = self.seg
        if n > seg.cap:
            raise ValueError(f"payload of {n} bytes exceeds the {seg.cap}-byte ring")
        start, end = _place(self.pos, n, seg.cap)
        need = max(0, end - seg.cap)
        while not _shm.wait(seg.ctrl, need, _WAIT_SLICE_MS):
            if stopped():
                return False
        off = start % seg.cap
        _shm.copy(seg.data[off : off + n], payload)
        self.pos = end
        return True


class ShmReader:
    """Receiving end of a link, mapped from a verified hello's name (see :meth:`attach`)."""

    def __init__(self, seg: _Segment) -> None:
        self.seg = seg
        self.pos = 0
        self._end = 0

    @classmethod
    def attach(cls, name: str, cap: int) -> ShmReader:
        """Map the segment ``name`` of ring capacity ``cap`` and unlink it.

        Raises:
            ValueError: the name, size, owner or file type is not what a pccl peer creates.
            OSError: the file cannot be opened or mapped (another host, another /dev/shm).
        """
        if not _NAME.fullmatch(name) or not MIN_BYTES <= cap <= MAX_BYTES:
            raise ValueError(f"not a pccl segment: {name!r} of {cap} bytes")
        path = os.path.join(_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise ValueError(f"{path}: not a regular file of this user")
            if st.st_size != _CTRL + cap:
                raise ValueError(f"{path}: {st.st_size} bytes, expected {_CTRL + cap}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except BaseException:
            os.close(fd)
            raise
        return cls(_Segment(fd, cap))

    def take(self, n: int) -> np.ndarray:
        """The ring bytes of the next ``n``-byte payload (call :meth:`release` when done).

        Raises:
            ProtocolError: ``n`` cannot be a payload of this ring.
        """
        cap = self.seg.cap
        if n > cap:
            raise ProtocolError(f"payload of {n} bytes exceeds the {cap}-byte shared ring")
        start, self._end = _place(self.pos, n, cap)
        off = start % cap
        return self.seg.data[off : off + n]

    def release(self) -> None:
        """The payload of the last :meth:`take` is out of the ring: let the writer reuse it."""
        if self._end != self.pos:
            self.pos = self._end
            _shm.publish(self.seg.ctrl, self.pos)

    def copy_out(self, dst: memoryview, src: np.ndarray) -> None:
        """Copy a payload out of the ring (GIL released)."""
        _shm.copy(dst, src)
