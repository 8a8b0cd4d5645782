"""The master's small key-value channel: run settings and coordination that are not tensors.

Peers set, read and wait for short values (``P2M_KV_SET``, ``P2M_KV_GET``; the master answers
each with one ``M2P_KV_REPLY`` carrying the request's id). Keys live in one of two scopes: the
run (every peer sees them) or the requesting peer's group. Only authenticated connections can
send these messages (the daemon's ``ACCEPTS`` table), and every bound is enforced here, before
anything is stored: a key is at most :data:`~pccl.config.MAX_KV_KEY` bytes of UTF-8, a value at
most :data:`~pccl.config.MAX_KV_VALUE` bytes, all entries together at most ``max_bytes``
(each charged its key, its value and :data:`ENTRY_OVERHEAD`), and a peer waits on at most
:data:`MAX_WAITS_PER_PEER` keys at once. A request beyond a bound is refused with a reason; the
connection stays up.

Durability: with a path (the master's ``--state-file`` plus ``.kv``), every change is written
to that file (msgpack, replaced atomically: temporary file, fsync, rename) *before* the set is
acknowledged, so an acknowledged value survives a master crash and is there when the master
restarts. Writes are grouped: the sets that arrive while one write runs are acknowledged
together after the next (the write runs in a worker thread; the loop only snapshots the entry
table, which holds immutable bytes). Without a path the store lives in memory and a restart
empties it.

Waiting: a get with ``wait_ms`` and no value (or no value newer than ``after_version``) parks
until a set of that key or its deadline (answered ``TIMEOUT``); a waiter whose peer leaves is
dropped. Versions increase over the store's whole life (persisted), so a waiter can ask for
the next value after one it has seen. Runs on the master's event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from pccl.master.store import StoreError, write_atomic

from pccl import messages as m
from pccl.config import MAX_KV_KEY, MAX_KV_VALUE
from pccl.messages import KvScope, KvStatus

log = logging.getLogger("pccl.master")

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ENTRY_OVERHEAD",
    "MAX_WAITS_PER_PEER",
    "KvScope",
    "KvStatus",
    "KvStore",
    "KvStoreError",
]

#: Default bound on all entries together (keys, values and :data:`ENTRY_OVERHEAD` each).
DEFAULT_MAX_BYTES = 16 << 20
#: What each entry is charged beyond its key and value (its bookkeeping in the master).
ENTRY_OVERHEAD = 128
#: Keys one peer may wait on at once; one more is refused.
MAX_WAITS_PER_PEER = 64
#: Longest wait a request may ask for.
MAX_WAIT_MS = 24 * 3600 * 1000
FORMAT = 1


class KvStoreError(StoreError):
    """The key-value file exists but cannot be read or parsed (refuse to start)."""


@dataclass(slots=True)
class Entry:
    value: bytes
    version: int
    set_by: int
    set_at: float  # wall clock (persisted: shown as an age after a restart too)


@dataclass(slots=True)
class _Waiter:
    peer_id: int
    req: int
    after: int
    deadline: float  # monotonic


Key = tuple[int, str]  # (-1 for the run or the group id, key)


class KvStore:
    """See the module docstring.

    Args:
        send: ``send(peer_id, message)`` to a connected peer (a no-op for a gone one).
        path: the file that makes acknowledged values durable (None: memory only).
        max_bytes: bound on all entries together.
    """

    def __init__(
        self,
        send: Callable[[int, m.Message], None],
        path: str | os.PathLike[str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_bytes < MAX_KV_VALUE + MAX_KV_KEY + ENTRY_OVERHEAD:
            raise ValueError(f"kv max_bytes must hold at least one full entry, got {max_bytes}")
        self._send = send
        self.path = Path(path) if path is not None else None
        self.max_bytes = max_bytes
        self.entries: dict[Key, Entry] = {}
        self.bytes = 0
        self.version = 0  # the last version issued
        self.waiters: dict[Key, list[_Waiter]] = {}
        self._waits_by_peer: dict[int, int] = {}
        self.requests: dict[tuple[str, str], int] = {}  # (op, status) -> count, for /metrics
        # Group commit: acks of changes not yet on disk, and the write task.
        self._unsynced: list[list[tuple[int, m.KvReply]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._dirty = False
        self.write_errors = 0
        if self.path is not None:
            self._load()

    # ------------------------------------------------------------------ persistence

    def _load(self) -> None:
        assert self.path is not None
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise KvStoreError(f"cannot read the key-value store {self.path}: {e}") from None
        limit = self.max_bytes * 2 + (1 << 20)
        if len(raw) > limit:
            raise KvStoreError(f"key-value store {self.path} is larger than {limit} bytes")
        try:
            doc = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_KV_VALUE, strict_map_key=True)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError("unknown format")
            version = int(doc["version"])
            for gid, key, value, ver, by, at in doc["entries"]:
                if not (isinstance(key, str) and isinstance(value, bytes)):
                    raise ValueError(f"bad entry {key!r}")
                if len(key.encode()) > MAX_KV_KEY or not 0 < int(ver) <= version:
                    raise ValueError(f"entry {key!r} out of bounds")
                self.entries[(int(gid), key)] = Entry(value, int(ver), int(by), float(at))
                self.bytes += _charge(key, value)
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
            raise KvStoreError(f"key-value store {self.path} is not valid: {e}") from None
        self.version = version
        log.info(
            "key-value store: %d entries (%d bytes) restored from %s",
            len(self.entries),
            self.bytes,
            self.path,
        )

    def _snapshot(self) -> bytes:
        return msgpack.packb(
            {
                "format": FORMAT,
                "version": self.version,
                "entries": [
                    [gid, key, e.value, e.version, e.set_by, e.set_at]
                    for (gid, key), e in self.entries.items()
                ],
            },
            use_bin_type=True,
        )

    def _write(self, data: bytes) -> None:
        assert self.path is not None
        write_atomic(self.path, data)

    def _changed(self, replies: list[tuple[int, m.KvReply]]) -> None:
        """A change was made: send ``replies`` (the changer's acknowledgement first, then the
        waiters it woke) once it is durable, so that no peer acts on a value a crash loses."""
        if self.path is None:
            for pid, msg in replies:
                self._send(pid, msg)
            return
        self._unsynced.append(replies)
        self._dirty = True
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        try:
            while self._dirty:
                self._dirty = False
                batch, self._unsynced = self._unsynced, []
                data = self._snapshot()  # on the loop: the table cannot change under it
                failed = ""
                try:
                    await asyncio.to_thread(self._write, data)
                except OSError as e:
                    self.write_errors += 1
                    log.error("cannot write the key-value store %s: %s", self.path, e)
                    failed = f"stored, but the master could not persist it: {e}"[:200]
                for replies in batch:
                    for i, (pid, msg) in enumerate(replies):
                        if failed and i == 0:  # the changer learns; readers get the value
                            msg = m.KvReply(msg.req, KvStatus.REFUSED, reason=failed)
                        self._send(pid, msg)
        finally:
            self._writer = None

    async def flush(self) -> None:
        """Wait until every change so far is on disk (and acknowledged)."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

    # ------------------------------------------------------------------ requests

    def _scope(self, peer_id: int, scope: int, group: int) -> int | None:
        if scope == KvScope.RUN:
            return -1
        if scope == KvScope.GROUP:
            return group
        return None

    def _count(self, op: str, status: KvStatus) -> None:
        k = (op, status.name.lower())
        self.requests[k] = self.requests.get(k, 0) + 1

    def _refuse(self, peer_id: int, req: int, op: str, why: str) -> None:
        self._count(op, KvStatus.REFUSED)
        self._send(peer_id, m.KvReply(req, KvStatus.REFUSED, reason=why[:200]))

    def on_set(self, peer_id: int, group: int, msg: m.KvSet) -> None:
        """``P2M_KV_SET`` from an authenticated peer of ``group``."""
        op = "delete" if msg.delete else "set"
        gid = self._scope(peer_id, msg.scope, group)
        if gid is None:
            self._refuse(peer_id, msg.req, op, f"unknown scope {msg.scope}")
            return
        why = _bad_key(msg.key)
        if why:
            self._refuse(peer_id, msg.req, op, why)
            return
        k = (gid, msg.key)
        old = self.entries.get(k)
        if msg.delete:
            if old is None:
                self._count(op, KvStatus.NOT_FOUND)
                self._send(peer_id, m.KvReply(msg.req, KvStatus.NOT_FOUND))
                return
            del self.entries[k]
            self.bytes -= _charge(msg.key, old.value)
            self.version += 1
            self._count(op, KvStatus.OK)
            self._changed([(peer_id, m.KvReply(msg.req, KvStatus.OK, version=self.version))])
            return
        grow = _charge(msg.key, msg.value) - (_charge(msg.key, old.value) if old else 0)
        if self.bytes + grow > self.max_bytes:
            self._refuse(
                peer_id,
                msg.req,
                op,
                f"the key-value store is full ({self.bytes} of {self.max_bytes} bytes used)",
            )
            return
        self.version += 1
        self.entries[k] = Entry(msg.value, self.version, peer_id, time.time())
        self.bytes += grow
        self._count(op, KvStatus.OK)
        replies = [(peer_id, m.KvReply(msg.req, KvStatus.OK, version=self.version))]
        waiting = self.waiters.pop(k, None) or []
        later = [w for w in waiting if w.after >= self.version]  # asked past this one
        if later:
            self.waiters[k] = later
        for w in waiting:
            if w.after >= self.version:
                continue
            self._unwait(w)
            self._count("get", KvStatus.OK)
            replies.append((w.peer_id, m.KvReply(w.req, KvStatus.OK, msg.value, self.version)))
        self._changed(replies)

    def on_get(self, peer_id: int, group: int, msg: m.KvGet, now: float) -> None:
        """``P2M_KV_GET`` from an authenticated peer of ``group`` (``now``: monotonic)."""
        gid = self._scope(peer_id, msg.scope, group)
        if gid is None:
            self._refuse(peer_id, msg.req, "get", f"unknown scope {msg.scope}")
            return
        why = _bad_key(msg.key)
        if why:
            self._refuse(peer_id, msg.req, "get", why)
            return
        k = (gid, msg.key)
        e = self.entries.get(k)
        if e is not None and e.version > msg.after_version:
            self._count("get", KvStatus.OK)
            self._send(peer_id, m.KvReply(msg.req, KvStatus.OK, e.value, e.version))
            return
        if msg.wait_ms == 0:
            self._count("get", KvStatus.NOT_FOUND)
            self._send(peer_id, m.KvReply(msg.req, KvStatus.NOT_FOUND))
            return
        if self._waits_by_peer.get(peer_id, 0) >= MAX_WAITS_PER_PEER:
            self._refuse(peer_id, msg.req, "get", f"already waiting on {MAX_WAITS_PER_PEER} keys")
            return
        w = _Waiter(peer_id, msg.req, msg.after_version, now + min(msg.wait_ms, MAX_WAIT_MS) / 1e3)
        self.waiters.setdefault(k, []).append(w)
        self._waits_by_peer[peer_id] = self._waits_by_peer.get(peer_id, 0) + 1

    def _unwait(self, w: _Waiter) -> None:
        n = self._waits_by_peer.get(w.peer_id, 0) - 1
        if n > 0:
            self._waits_by_peer[w.peer_id] = n
        else:
            self._waits_by_peer.pop(w.peer_id, None)

    def tick(self, now: float) -> None:
        """Answer waiters whose deadline passed (``now``: monotonic)."""
        if not self.waiters:
            return
        for k in list(self.waiters):
            ws = self.waiters[k]
            due = [w for w in ws if w.deadline <= now]
            if not due:
                continue
            keep = [w for w in ws if w.deadline > now]
            if keep:
                self.waiters[k] = keep
            else:
                del self.waiters[k]
            for w in due:
                self._unwait(w)
                self._count("get", KvStatus.TIMEOUT)
                self._send(w.peer_id, m.KvReply(w.req, KvStatus.TIMEOUT))

    def peer_gone(self, peer_id: int) -> None:
        """Drop the waits of a peer that left (nobody to answer)."""
        if peer_id not in self._waits_by_peer:
            return
        for k in list(self.waiters):
            keep = [w for w in self.waiters[k] if w.peer_id != peer_id]
            if keep:
                self.waiters[k] = keep
            else:
                del self.waiters[k]
        self._waits_by_peer.pop(peer_id, None)

    # ------------------------------------------------------------------ reporting

    def describe(self, now_wall: float, limit: int = 1000) -> dict[str, Any]:
        """The ``kv`` section of ``/status`` (keys, sizes, versions; values only as a short
        UTF-8 preview)."""
        keys = []
        # The first ``limit`` keys in order without sorting the whole store (up to ~130,000
        # small entries fit in the default bound).
        for (gid, key), e in heapq.nsmallest(limit, self.entries.items(), key=lambda kv: kv[0]):
            keys.append(
                {
                    "scope": "run" if gid < 0 else "group",
                    "group": None if gid < 0 else gid,
                    "key": key,
                    "bytes": len(e.value),
                    "version": e.version,
                    "set_by": e.set_by,
                    "age_s": round(max(0.0, now_wall - e.set_at), 3),
                    "preview": _preview(e.value),
                }
            )
        return {
            "entries": len(self.entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "version": self.version,
            "waiters": sum(len(ws) for ws in self.waiters.values()),
            "durable": self.path is not None,
            "path": str(self.path) if self.path is not None else None,
            "write_errors": self.write_errors,
            "keys": keys,
            "keys_truncated": len(self.entries) > limit,
        }


def _charge(key: str, value: bytes) -> int:
    return len(key.encode()) + len(value) + ENTRY_OVERHEAD


def _bad_key(key: str) -> str:
    if not key:
        return "empty key"
    if len(key.encode()) > MAX_KV_KEY:
        return f"key longer than {MAX_KV_KEY} bytes of UTF-8"
    return ""


def _preview(value: bytes, n: int = 64) -> str | None:
    try:
        text = value[: 4 * n].decode()
    except UnicodeDecodeError:
        return None
    return text[:n] + ("..." if len(value) > len(text[:n].encode()) else "")
