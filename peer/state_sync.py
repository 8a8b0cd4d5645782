"""Shared-state transfer between peers: serving sources and the striped, verified fetch.

A requester opens one connection per source to its p2p listener, answers the source's challenge
with ``P2P_STATE_HELLO`` (who, for which sync, HMAC proof) and, back to back, ``P2P_STATE_REQUEST``
(byte ranges of entries); the source reads the request only after the hello verified
(:mod:`pccl.peer.rx_stream`) and answers with ``P2P_STATE_DATA`` frames
(range index, offset, raw bytes) straight from the entry's memory, honouring flow control. The
requester receives each frame directly into a staging buffer. Ranges are striped over every
source holding the elected hash; when a source fails, its unfinished ranges are re-requested from
the remaining ones. Only after every byte arrived and the XXH3-128 of the staging buffer equals
the elected hash is it copied into the user's tensor: nothing half-written is ever committed.

Runs on the peer's event-loop thread (hashing is pushed to a worker thread).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import xxhash

from pccl import messages as m
from pccl.auth import prove
from pccl.errors import ProtocolError, SharedStateError
from pccl.frame import (
    HEADER,
    MAGIC,
    PRE_AUTH_MAX_BODY,
    STATE_HEADER,
    VERSION,
    MsgType,
    parse_header,
)
from pccl.progress import MIN_TRANSFER_BYTES, TransferProgress
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
        self,
        transport: asyncio.Transport,
        writable: asyncio.Event,
        hello: m.StateHello,
        req: m.StateRequest,
        progress_timeout: float,
    ) -> bool:
        """Stream the requested ranges of an authenticated requester, then wait until the
        transport has handed every byte to the kernel (the caller then closes it). A request
        this peer cannot serve is answered with ``P2P_STATE_ERROR`` instead. Once the sync
        closes, no further byte is read from its entries.

        Args:
            transport, writable: the connection and its flow-control flag (set while the
                transport's buffer is below its high-water mark).
            hello: the verified ``StateHello`` (who asks, for which sync).
            req: the ranges asked for.
            progress_timeout: longest wait for the requester to drain the buffer.

        Returns:
            True when every range was sent; False when refused or the connection closed.

        Raises:
            TimeoutError: the requester drained not one byte for ``progress_timeout`` seconds
                (the caller aborts the connection).
            asyncio.CancelledError: cancelled (the connection was lost or the node closed).
        """
        snap = self.snapshot
        try:
            if snap is None or (snap.sync_id and snap.sync_id != hello.sync_id):
                raise SharedStateError(f"not serving sync {hello.sync_id}")
            for key, start, end in req.ranges:
                raw = snap.entries.get(key)
                if raw is None or not 0 <= start < end <= len(raw):
                    raise SharedStateError(f"bad range {key!r}[{start}:{end}]")
            for i, (key, start, end) in enumerate(req.ranges):
                raw = snap.entries[key]
                pos = start
                while pos < end:
                    await _writable(transport, writable, progress_timeout)
                    if transport.is_closing():
                        return False
                    if self.snapshot is not snap:
                        raise SharedStateError(f"sync {hello.sync_id} closed")
                    n = min(PIECE, end - pos)
                    hdr = HEADER.pack(
                        MAGIC, VERSION, MsgType.P2P_STATE_DATA, STATE_HEADER.size + n
                    ) + STATE_HEADER.pack(i, pos - start)
                    transport.writelines([hdr, raw[pos : pos + n]])
                    snap.tx_bytes += n
                    pos += n
            sent = True
        except SharedStateError as e:
            log.warning("refusing state request from peer %d: %s", hello.peer_id, e)
            transport.write(m.StateError(str(e)[:500]).encode())
            sent = False
        # Drained means empty: the next resume_writing comes when nothing is left buffered.
        transport.set_write_buffer_limits(high=0)
        await _writable(transport, writable, progress_timeout)
        return sent


async def _writable(transport: asyncio.Transport, writable: asyncio.Event, limit: float) -> None:
    """Wait until ``transport`` takes more bytes (or closes). A slow requester may take longer
    than ``limit`` to drain a piece, as long as its buffer shrinks within every ``limit``.

    Raises:
        TimeoutError: not one byte drained for ``limit`` seconds.
    """
    last = transport.get_write_buffer_size()
    while not writable.is_set() and not transport.is_closing():
        try:
            async with asyncio.timeout(limit):
                await writable.wait()
        except TimeoutError:
            now = transport.get_write_buffer_size()
            if now >= last:
                raise
            last = now


class FetchState(enum.Enum):
    """States of one requester connection to a state source."""

    CHALLENGE = "challenge"  #: connected; reading the source's challenge header
    CHALLENGE_BODY = "challenge_body"  #: reading the nonce (small, into a fixed buffer)
    FRAME_HDR = "frame_hdr"  #: hello and request sent; reading a frame header (data or refusal)
    DATA_HDR = "data_hdr"  #: reading a data frame's sub-header (range index, offset)
    PAYLOAD = "payload"  #: reading a data frame straight into its staging range
    ERROR_BODY = "error_body"  #: reading the source's refusal (small, into the fixed buffer)
    CLOSED = "closed"  #: every byte arrived, or failed, or lost: nothing more is written

    __hash__ = object.__hash__  # identity, in C: looked up for every frame received


_F = FetchState
_FETCH_NEXT: dict[FetchState, frozenset[FetchState]] = {
    _F.CHALLENGE: frozenset({_F.CHALLENGE_BODY, _F.CLOSED}),
    _F.CHALLENGE_BODY: frozenset({_F.FRAME_HDR, _F.CLOSED}),
    _F.FRAME_HDR: frozenset({_F.DATA_HDR, _F.ERROR_BODY, _F.CLOSED}),
    _F.DATA_HDR: frozenset({_F.PAYLOAD, _F.CLOSED}),
    _F.PAYLOAD: frozenset({_F.FRAME_HDR, _F.CLOSED}),
    _F.ERROR_BODY: frozenset({_F.CLOSED}),
    _F.CLOSED: frozenset(),
}


class _FetchStream(asyncio.BufferedProtocol):
    """Requester side of one source connection: challenge -> ``StateHello`` and
    ``StateRequest`` (back to back) -> data frames into the staging buffers."""

    def __init__(
        self,
        peer_id: int,
        sync_id: int,
        ranges: list[tuple[str, int, int]],
        staging: dict[str, np.ndarray],
        token: bytes | None,
        progress: TransferProgress | None = None,
    ) -> None:
        self.peer_id, self.sync_id, self.ranges = peer_id, sync_id, ranges
        self.token = token
        self.progress = progress
        self.targets = [staging[k].data[s:e] for k, s, e in ranges]
        self.got = [0] * len(ranges)
        self.left = sum(e - s for _, s, e in ranges)
        self.hdr = bytearray(HEADER.size + STATE_HEADER.size)
        self._hdr = memoryview(self.hdr)
        self._frame_hdr = self._hdr[: HEADER.size]
        self._sub_hdr = self._hdr[HEADER.size :]
        self._small = memoryview(bytearray(PRE_AUTH_MAX_BODY))
        self.state = FetchState.CHALLENGE
        self.view: memoryview = self._hdr[: HEADER.size]
        self.pos = 0
        self.cur = 0
        self.length = 0  # body length of the data frame being read
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.rx = 0

    def _to(self, state: FetchState, view: memoryview) -> None:
        """The one place the state changes (allowed moves: ``_FETCH_NEXT``)."""
        assert state in _FETCH_NEXT[self.state], f"fetch stream: {self.state} -> {state}"
        self.state = state
        self.view = view
        self.pos = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.pos :]

    def buffer_updated(self, nbytes: int) -> None:
        self.pos += nbytes
        if self.pos < len(self.view):
            return
        try:
            _FETCH_ON_FULL[self.state](self)
        except (ProtocolError, SharedStateError) as e:
            self._fail(e)

    def _on_challenge_header(self) -> None:
        mtype, length = parse_header(self.hdr)
        if mtype != MsgType.P2P_CHALLENGE or length > PRE_AUTH_MAX_BODY:
            raise ProtocolError(f"expected a challenge, got {mtype.name} of {length} bytes")
        self._to(FetchState.CHALLENGE_BODY, self._small[:length])
        if length == 0:
            self._on_challenge_body()

    def _on_challenge_body(self) -> None:
        ch = m.decode(MsgType.P2P_CHALLENGE, bytes(self.view))
        assert isinstance(ch, m.P2PChallenge) and self.transport is not None
        proof = prove(self.token, b"pccl-state", ch.nonce, self.peer_id, self.sync_id)
        hello = m.StateHello(self.peer_id, self.sync_id, proof).encode()
        self.transport.writelines([hello, m.StateRequest(self.ranges).encode()])
        self._to(FetchState.FRAME_HDR, self._frame_hdr)
        if self.left == 0:
            self._finish()

    def _on_frame_header(self) -> None:
        mtype, length = parse_header(self.hdr)
        if mtype == MsgType.P2P_STATE_ERROR:
            if length > PRE_AUTH_MAX_BODY:
                raise ProtocolError(f"state error of {length} bytes")
            self._to(FetchState.ERROR_BODY, self._small[:length])
            if length == 0:
                self._on_error_body()
            return
        if mtype != MsgType.P2P_STATE_DATA or length < STATE_HEADER.size:
            raise ProtocolError(f"unexpected {mtype.name} from a state source")
        self.length = length
        self._to(FetchState.DATA_HDR, self._sub_hdr)

    def _on_data_header(self) -> None:
        idx, off = STATE_HEADER.unpack_from(self.hdr, HEADER.size)
        n = self.length - STATE_HEADER.size
        if idx >= len(self.targets) or off != self.got[idx] or off + n > len(self.targets[idx]):
            raise ProtocolError(f"state frame out of order: range {idx} offset {off} +{n}")
        self.cur = idx
        self._to(FetchState.PAYLOAD, self.targets[idx][off : off + n])
        if n == 0:
            self._on_payload()

    def _on_payload(self) -> None:
        n = len(self.view)
        self.got[self.cur] += n
        self.left -= n
        self.rx += n
        if self.progress is not None:  # once per frame (up to PIECE bytes), never per byte
            self.progress.add(n)
        self._to(FetchState.FRAME_HDR, self._frame_hdr)
        if self.left == 0:
            self._finish()

    def _on_error_body(self) -> None:
        msg = m.decode(MsgType.P2P_STATE_ERROR, bytes(self.view))
        assert isinstance(msg, m.StateError)
        raise SharedStateError(f"source refused: {msg.reason}")

    def _on_closed(self) -> None:
        self.pos = 0  # the transport is closing; whatever still arrives is dropped

    def _finish(self) -> None:
        self._to(FetchState.CLOSED, self._hdr)
        if not self.done.done():
            self.done.set_result(None)
        assert self.transport is not None
        self.transport.close()

    def _fail(self, e: Exception) -> None:
        if self.state is not FetchState.CLOSED:
            self._to(FetchState.CLOSED, self._hdr)
        if not self.done.done():
            self.done.set_exception(e)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not FetchState.CLOSED:
            self._to(FetchState.CLOSED, self._hdr)
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"source connection lost ({exc or 'closed'})"))

    def leftovers(self) -> list[tuple[str, int, int]]:
        return [
            (k, s + self.got[i], e)
            for i, (k, s, e) in enumerate(self.ranges)
            if s + self.got[i] < e
        ]


#: What to do when the buffer of each state is full.
_FETCH_ON_FULL: dict[FetchState, Callable[[_FetchStream], None]] = {
    _F.CHALLENGE: _FetchStream._on_challenge_header,
    _F.CHALLENGE_BODY: _FetchStream._on_challenge_body,
    _F.FRAME_HDR: _FetchStream._on_frame_header,
    _F.DATA_HDR: _FetchStream._on_data_header,
    _F.PAYLOAD: _FetchStream._on_payload,
    _F.ERROR_BODY: _FetchStream._on_error_body,
    _F.CLOSED: _FetchStream._on_closed,
}


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

    A transfer of at least :data:`~pccl.progress.MIN_TRANSFER_BYTES` reports its progress
    (:class:`~pccl.progress.TransferProgress`: ``pccl.peer`` log lines, a bar on a terminal).

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
    total = sum(entries[key].nbytes for key, _, _ in fetch)
    progress = TransferProgress(total, log) if total >= MIN_TRANSFER_BYTES else None

    async def one(src: int, ranges: list[tuple[str, int, int]]) -> _FetchStream:
        host, port = addresses[src]
        async with asyncio.timeout(connect_timeout):
            _, proto = await loop.create_connection(
                lambda: _FetchStream(my_id, sync_id, ranges, staging, token, progress),
                host,
                port,
                ssl=ssl,
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

    try:
        while per_source:
            protos.clear()
            srcs = list(per_source)
            tasks = [asyncio.ensure_future(one(s, per_source[s])) for s in srcs]
            try:
                await asyncio.wait(tasks)
            except BaseException:
                # Cancelled (the sync's budget ran out): the caller hands ``staging`` back to a
                # pool shared with collectives, so no stream may write into it after we return.
                for t in tasks:
                    t.cancel()
                for p in protos.values():
                    p._fail(ConnectionError("fetch cancelled"))
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
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
    finally:
        if progress is not None:
            progress.close()

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
