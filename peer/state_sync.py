"""Shared-state transfer between peers: serving sources and the striped, verified fetch.

A requester opens one connection per source to its p2p listener and sends
``P2P_STATE_REQUEST`` (byte ranges of entries); the source answers with ``P2P_STATE_DATA`` frames
(range index, offset, raw bytes) straight from the entry's memory, honouring flow control. The
requester receives each frame directly into a staging buffer. Ranges are striped over every
source holding the elected hash; when a source fails, its unfinished ranges are re-requested from
the remaining ones. Only after every byte arrived and the XXH3-128 of the staging buffer equals
the elected hash is it copied into the user's tensor: nothing half-written is ever committed.

Runs on the peer's event-loop thread (hashing is pushed to a worker thread).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import xxhash

from pccl import messages as m
from pccl.auth import prove
from pccl.errors import ProtocolError, SharedStateError
from pccl.frame import HEADER, MAGIC, STATE_HEADER, VERSION, MsgType, parse_header
from pccl.shared_state import SharedState

log = logging.getLogger("pccl.peer")

__all__ = ["FetchResult", "StateServer", "fetch_entries"]

PIECE = 4 << 20  # bytes per data frame
MIN_STRIPE = 1 << 20  # do not split an entry into ranges smaller than this


@dataclass
class Snapshot:
    """What this peer serves during one sync: entry memory by key."""

    entries: dict[str, memoryview]
    sync_id: int = 0  # 0 until our plan arrived
    tx_bytes: int = 0


class StateServer:
    """Serves state requests arriving on the p2p listener while a sync is open."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def open(self, state: SharedState) -> Snapshot:
        snap = Snapshot({k: e.raw() for k, e in state.entries.items()})
        self.snapshot = snap
        return snap

    def close(self) -> None:
        self.snapshot = None

    async def serve(
        self, transport: asyncio.Transport, writable: asyncio.Event, req: m.StateRequest
    ) -> None:
        """Stream the requested ranges; errors are reported to the requester, then close."""
        snap = self.snapshot
        try:
            if snap is None or (snap.sync_id and snap.sync_id != req.sync_id):
                raise SharedStateError(f"not serving sync {req.sync_id}")
            for key, start, end in req.ranges:
                raw = snap.entries.get(key)
                if raw is None or not 0 <= start < end <= len(raw):
                    raise SharedStateError(f"bad range {key!r}[{start}:{end}]")
            for i, (key, start, end) in enumerate(req.ranges):
                raw = snap.entries[key]
                pos = start
                while pos < end:
                    if transport.is_closing():
                        return
                    if not writable.is_set():
                        await writable.wait()
                    n = min(PIECE, end - pos)
                    hdr = HEADER.pack(
                        MAGIC, VERSION, MsgType.P2P_STATE_DATA, STATE_HEADER.size + n
                    ) + STATE_HEADER.pack(i, pos - start)
                    transport.writelines([hdr, raw[pos : pos + n]])
                    snap.tx_bytes += n
                    pos += n
        except SharedStateError as e:
            log.warning("refusing state request from peer %d: %s", req.peer_id, e)
            transport.write(m.StateError(str(e)[:500]).encode())
            transport.close()


class _FetchStream(asyncio.BufferedProtocol):
    """Requester side of one source connection."""

    def __init__(
        self, req: m.StateRequest, staging: dict[str, np.ndarray], token: bytes | None
    ) -> None:
        self.req = req
        self.token = token
        self.targets = [staging[k].data[s:e] for k, s, e in req.ranges]
        self.got = [0] * len(req.ranges)
        self.left = sum(e - s for _, s, e in req.ranges)
        self.hdr = bytearray(HEADER.size + STATE_HEADER.size)
        self.view: memoryview = memoryview(self.hdr)
        self.pos = 0
        self.state = 3  # 3 challenge header, 4 challenge body, 0 header, 1 payload, 2 error body
        self.view = memoryview(self.hdr)[: HEADER.size]
        self.cur = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.rx = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.pos :]

    def buffer_updated(self, nbytes: int) -> None:
        self.pos += nbytes
        if self.pos < len(self.view):
            return
        try:
            self._advance()
        except (ProtocolError, SharedStateError) as e:
            self._fail(e)

    def _advance(self) -> None:
        if self.state == 3:
            mtype, length = parse_header(self.hdr)
            if mtype != MsgType.P2P_CHALLENGE or length > 256:
                raise ProtocolError(f"expected a challenge, got {mtype.name}")
            self.state = 4
            self.view = memoryview(bytearray(length))
            self.pos = 0
            return
        if self.state == 4:
            ch = m.decode(MsgType.P2P_CHALLENGE, bytes(self.view))
            assert isinstance(ch, m.P2PChallenge) and self.transport is not None
            r = self.req
            proof = prove(self.token, b"pccl-state", ch.nonce, r.peer_id, r.sync_id)
            self.transport.write(m.StateRequest(r.peer_id, r.sync_id, r.ranges, proof).encode())
            self.state = 0
            self.view = memoryview(self.hdr)
            self.pos = 0
            if self.left == 0 and not self.done.done():
                self.done.set_result(None)
            return
        if self.state == 0:
            mtype, length = parse_header(self.hdr)
            if mtype == MsgType.P2P_STATE_ERROR:
                if length > 4096:
                    raise ProtocolError("oversized state error")
                self.state = 2
                self.view = memoryview(bytearray(length))
                self.pos = 0
                return
            if mtype != MsgType.P2P_STATE_DATA or length < STATE_HEADER.size:
                raise ProtocolError(f"unexpected {mtype.name} from a state source")
            idx, off = STATE_HEADER.unpack_from(self.hdr, HEADER.size)
            n = length - STATE_HEADER.size
            if idx >= len(self.targets) or off != self.got[idx] or off + n > len(self.targets[idx]):
                raise ProtocolError(f"state frame out of order: range {idx} offset {off} +{n}")
            self.cur = idx
            self.state = 1
            self.view = self.targets[idx][off : off + n]
            self.pos = 0
            if n == 0:
                self._advance()
        elif self.state == 1:
            n = len(self.view)
            self.got[self.cur] += n
            self.left -= n
            self.rx += n
            self.state = 0
            self.view = memoryview(self.hdr)
            self.pos = 0
            if self.left == 0 and not self.done.done():
                self.done.set_result(None)
                assert self.transport is not None
                self.transport.close()
        else:
            msg = m.decode(MsgType.P2P_STATE_ERROR, bytes(self.view))
            assert isinstance(msg, m.StateError)
            raise SharedStateError(f"source refused: {msg.reason}")

    def _fail(self, e: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(e)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"source connection lost ({exc or 'closed'})"))

    def leftovers(self) -> list[tuple[str, int, int]]:
        return [
            (k, s + self.got[i], e)
            for i, (k, s, e) in enumerate(self.req.ranges)
            if s + self.got[i] < e
        ]


@dataclass
class FetchResult:
    rx_bytes: int = 0
    failed_sources: list[int] = field(default_factory=list)


def _stripe(
    nbytes: int,
    key: str,
    sources: list[int],
    per_source: dict[int, list[tuple[str, int, int]]],
    rotation: int = 0,
) -> int:
    """Assign ``key``'s ranges round-robin over ``sources``, continuing at ``rotation`` so many
    small entries spread over all sources too. Returns the next rotation."""
    n = max(1, len(sources))
    piece = max(MIN_STRIPE, -(-nbytes // n))
    j = rotation
    for start in range(0, nbytes, piece):
        per_source.setdefault(sources[j % n], []).append((key, start, min(nbytes, start + piece)))
        j += 1
    return j


async def fetch_entries(
    *,
    my_id: int,
    sync_id: int,
    fetch: list[tuple[str, bytes, list[int]]],
    addresses: dict[int, tuple[str, int]],
    state: SharedState,
    staging: dict[str, np.ndarray],
    connect_timeout: float,
    token: bytes | None = None,
    ssl: Any = None,
    progress_timeout: float = 10.0,
) -> FetchResult:
    """Fetch, verify and commit the entries of ``fetch`` into ``state``.

    Raises:
        SharedStateError: every source of some entry failed, or the received bytes do not hash
            to the elected value (nothing is committed then).
    """
    loop = asyncio.get_running_loop()
    result = FetchResult()
    entries = state.entries
    sources_of = {k: list(ids) for k, _, ids in fetch}
    dead: set[int] = set()
    per_source: dict[int, list[tuple[str, int, int]]] = {}
    rotation = 0
    for key, _, ids in fetch:
        if not ids:
            raise SharedStateError(f"no source holds the elected content of {key!r}")
        rotation = _stripe(entries[key].nbytes, key, ids, per_source, rotation)

    protos: dict[int, _FetchStream] = {}

    async def one(src: int, ranges: list[tuple[str, int, int]]) -> _FetchStream:
        host, port = addresses[src]
        req = m.StateRequest(my_id, sync_id, ranges)
        async with asyncio.timeout(connect_timeout):
            _, proto = await loop.create_connection(
                lambda: _FetchStream(req, staging, token), host, port, ssl=ssl
            )
        assert isinstance(proto, _FetchStream)
        protos[src] = proto
        try:
            seen = -1
            while True:  # a source that stops sending (hung) fails after progress_timeout_s
                try:
                    await asyncio.wait_for(asyncio.shield(proto.done), progress_timeout)
                    break
                except TimeoutError:
                    if proto.rx == seen:
                        err = TimeoutError(f"source {src} sent nothing for {progress_timeout}s")
                        proto._fail(err)
                        raise err from None
                    seen = proto.rx
        finally:
            if proto.transport is not None:
                proto.transport.close()
        return proto

    while per_source:
        protos.clear()
        srcs = list(per_source)
        tasks = [asyncio.ensure_future(one(s, per_source[s])) for s in srcs]
        await asyncio.wait(tasks)
        retry: dict[int, list[tuple[str, int, int]]] = {}
        for src, task in zip(srcs, tasks):
            exc = task.exception()
            if exc is None:
                result.rx_bytes += task.result().rx
                continue
            log.warning("state source %d failed: %s", src, exc)
            dead.add(src)
            result.failed_sources.append(src)
            # Whatever arrived stays; only the missing tails are asked again elsewhere.
            proto = protos.get(src)
            left = proto.leftovers() if proto is not None else per_source[src]
            for key, start, end in left:
                alive = [s for s in sources_of[key] if s not in dead]
                if not alive:
                    raise SharedStateError(
                        f"every source of {key!r} failed ({sorted(dead)}); retry the sync"
                    )
                _stripe_range(key, start, end, alive, retry)
            result.rx_bytes += proto.rx if proto is not None else 0
        per_source = retry

    # Verify every entry before committing any of them.
    for key, digest, _ in fetch:
        got = await asyncio.to_thread(_digest, staging[key])
        if got != digest:
            raise SharedStateError(f"entry {key!r} does not match the elected hash; retry")
    for key, _, _ in fetch:
        np.copyto(entries[key].array.view(np.uint8), staging[key])
    return result


def _digest(buf: np.ndarray) -> bytes:
    return xxhash.xxh3_128(buf.data).digest()


def _stripe_range(
    key: str, start: int, end: int, alive: list[int], out: dict[int, list[tuple[str, int, int]]]
) -> None:
    n = len(alive)
    piece = max(MIN_STRIPE, -(-(end - start) // n))
    for j, s in enumerate(range(start, end, piece)):
        out.setdefault(alive[j % n], []).append((key, s, min(end, s + piece)))
