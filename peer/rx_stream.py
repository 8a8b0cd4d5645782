"""Accepted p2p connections: the :class:`RxStream` state machine (:class:`RxState`).

Every connection accepted by a peer's p2p listener (:class:`pccl.peer.p2p.P2PNode`) is a stranger
until it proves the token:

* pre-auth (``PRE_AUTH``): we send a challenge; the only frame accepted is a ``P2P_HELLO`` or
  ``P2P_STATE_HELLO`` of at most ``PRE_AUTH_MAX_BODY`` bytes, judged from its header before
  anything is read for it and read into a small buffer allocated with the connection. Any error
  closes that connection and touches nothing else; the node caps how many such connections
  exist and a handshake deadline closes them.
* authenticated, one role: a ring stream from our predecessor for the announced epoch
  (``RING_DATA``: ``P2P_DATA`` frames only), or a state requester (one ``P2P_STATE_REQUEST``,
  read only after its hello verified, then served by the node under a progress deadline).
* authenticated link prober (``PROBE``, after a ``P2P_PROBE_HELLO``): timed transfers answered
  by :class:`pccl.peer.probe.ProbeResponder`, under the handshake deadline.
* ``CLOSED``: nothing it sends reaches an operation, a buffer or another connection.

Only an accepted ring stream may fail operations: its loss or a protocol error on it breaks the
ring. Each state names the buffer being filled (``target``); when it is full, the state's entry in
``_ON_FULL`` says what comes next (one dict lookup per event), and :meth:`RxStream._to` is the
one place the state moves, checked against ``_NEXT``. Ring data is received zero-copy: each frame
header goes into a fixed buffer, each payload straight into the memory its operation named
(:meth:`pccl.peer.ring.RingOp.recv_target`); nothing is allocated per frame.

Routing invariants: frames of an operation already finished or aborted are discarded; frames of an
operation this peer has not registered yet park the stream (reading paused) until it is; once an
operation is finished no further byte is written into its buffers.

Runs on the peer's event-loop thread.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from pccl.peer import shm_link
from pccl.peer.probe import PURPOSE as PROBE_PURPOSE
from pccl.peer.probe import ProbeResponder
from pccl.peer.shm_link import ShmReader

from pccl import messages as m
from pccl.auth import new_nonce, verify
from pccl.errors import ProtocolError
from pccl.frame import (
    DATA_HEADER,
    HEADER,
    PRE_AUTH_MAX_BODY,
    DataHeader,
    MsgType,
    parse_data_header,
    parse_header,
)

if TYPE_CHECKING:
    from pccl.peer.p2p import P2PNode
    from pccl.peer.ring import RingOp

log = logging.getLogger("pccl.peer")

__all__ = ["PRE_AUTH", "RING_DATA", "RxState", "RxStream"]

_FULL_HEADER = HEADER.size + DATA_HEADER.size
_DISCARD = memoryview(bytearray(1 << 20))  # shared sink for skipped payloads
_NO_HEADER = DataHeader(0, 0, 0, 0, 0, 0, 0)
#: Longest run of shared-memory frames handled before the loop gets a turn (see _breathe).
_BREATHE_S = 0.02
_HELLOS = frozenset({MsgType.P2P_HELLO, MsgType.P2P_STATE_HELLO, MsgType.P2P_PROBE_HELLO})


class RxState(enum.Enum):
    """States of one accepted p2p connection; ``_NEXT`` lists the allowed moves."""

    # -- pre-auth: a stranger
    HELLO_HDR = "hello_hdr"  #: challenge sent; reading the first header (only a small hello)
    HELLO_BODY = "hello_body"  #: reading that hello into the connection's small buffer
    # -- authenticated ring stream, not accepted yet
    PARKED_HELLO = "parked_hello"  #: verified hello for an epoch not announced to us yet; paused
    # -- authenticated and accepted: ring data from our predecessor
    FRAME_HDR = "frame_hdr"  #: reading a data frame header
    PAYLOAD = "payload"  #: reading a payload into the memory its operation named
    DISCARD = "discard"  #: skipping the payload of a frame of a finished operation
    PARKED = "parked"  #: holding the header of a frame of an unregistered operation; paused
    # -- authenticated state requester
    STATE_REQUEST = "state_request"  #: state hello verified; reading the request header
    STATE_REQUEST_BODY = "state_request_body"  #: reading the request (bounded by its max_body)
    SERVING = "serving"  #: streaming the ranges; the requester may send nothing more
    # -- authenticated link prober (pccl.peer.probe)
    PROBE = "probe"  #: probe hello verified: timed transfers, closed at the handshake deadline
    # --
    CLOSED = "closed"  #: closed by us or gone; nothing it sends reaches anything

    # Members are singletons: hash by identity in C. Enum's own __hash__ is a Python call,
    # and the receive loop looks a state up in ``_ON_FULL`` for every buffer it fills.
    __hash__ = object.__hash__


_S = RxState
#: Pre-auth states: an error closes the connection and touches nothing else.
PRE_AUTH = frozenset({_S.HELLO_HDR, _S.HELLO_BODY})
#: Accepted ring-stream states: only here may an error or a loss fail operations.
RING_DATA = frozenset({_S.FRAME_HDR, _S.PAYLOAD, _S.DISCARD, _S.PARKED})
#: Authenticated but not yet in its steady role: still under the handshake deadline.
_HANDSHAKE = PRE_AUTH | {_S.PARKED_HELLO, _S.STATE_REQUEST, _S.STATE_REQUEST_BODY, _S.PROBE}

_NEXT: dict[RxState, frozenset[RxState]] = {
    _S.HELLO_HDR: frozenset({_S.HELLO_BODY, _S.CLOSED}),
    _S.HELLO_BODY: frozenset(
        {_S.PARKED_HELLO, _S.FRAME_HDR, _S.STATE_REQUEST, _S.PROBE, _S.CLOSED}
    ),
    _S.PARKED_HELLO: frozenset({_S.FRAME_HDR, _S.CLOSED}),
    _S.FRAME_HDR: frozenset({_S.FRAME_HDR, _S.PAYLOAD, _S.DISCARD, _S.PARKED, _S.CLOSED}),
    _S.PAYLOAD: frozenset({_S.FRAME_HDR, _S.DISCARD, _S.CLOSED}),
    _S.DISCARD: frozenset({_S.FRAME_HDR, _S.DISCARD, _S.CLOSED}),
    _S.PARKED: frozenset({_S.FRAME_HDR, _S.PAYLOAD, _S.DISCARD, _S.CLOSED}),
    _S.STATE_REQUEST: frozenset({_S.STATE_REQUEST_BODY, _S.CLOSED}),
    _S.STATE_REQUEST_BODY: frozenset({_S.SERVING, _S.CLOSED}),
    _S.SERVING: frozenset({_S.CLOSED}),
    _S.PROBE: frozenset({_S.PROBE, _S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class RxStream(asyncio.BufferedProtocol):
    """One accepted p2p connection: a ring stream from our predecessor or a state requester.

    Each state names the buffer being filled (``target``); when it is full, the state's entry
    in ``_ON_FULL`` decides what comes next, and :meth:`_to` is the one place the state moves.
    """

    def __init__(self, node: P2PNode) -> None:
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.hdr = bytearray(_FULL_HEADER)
        self._hdr = memoryview(self.hdr)
        self._small = memoryview(bytearray(PRE_AUTH_MAX_BODY))  # the hello lands here
        self.state = RxState.HELLO_HDR
        self.target = self._hdr[: HEADER.size]
        self.pos = 0
        self.remaining = 0  # payload bytes left to discard
        self.host = "?"
        self.peer_id = 0
        self.epoch = 0
        self.nonce = b""
        self.hello_type = MsgType.P2P_HELLO
        self.state_hello: m.StateHello | None = None
        self.probe: ProbeResponder | None = None
        self.op: RingOp | None = None  # set only in PAYLOAD
        self.shm_offer: tuple[str, int] = ("", 0)  # segment named by a verified ring hello
        self.shm: ShmReader | None = None  # mapped: payloads come through it, not the socket
        self._breathing = False  # reading paused until the loop has run once (see _breathe)
        self._breathed = 0.0
        self.header: DataHeader = _NO_HEADER
        self.opened = time.monotonic()
        self.parked_since = 0.0
        self.deadline: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.writable = asyncio.Event()
        self.writable.set()

    @property
    def closed(self) -> bool:
        return self.state is RxState.CLOSED

    def _to(self, state: RxState, target: memoryview) -> None:
        """The one place the state changes: move to ``state``, filling ``target`` from 0."""
        assert state in _NEXT[self.state], f"p2p stream: {self.state} -> {state}"
        self.state = state
        self.target = target
        self.pos = 0

    # ---------------------------------------------------------------- transport callbacks

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.host = str(peer[0]) if peer else "?"
        self.node.admit(self)  # may evict older strangers, never this one
        self.nonce = new_nonce()
        limit = self.node.config.handshake_timeout_s
        self.deadline = asyncio.get_running_loop().call_later(limit, self._handshake_expired)
        self.transport.write(m.P2PChallenge(self.nonce).encode())

    def get_buffer(self, sizehint: int) -> memoryview:
        op = self.op
        if op is not None and op.finished:
            # The operation ended (aborted): never write into its memory again.
            self.op = None
            self.remaining = len(self.target) - self.pos
            self._discard_next()
        return self.target[self.pos :]

    def buffer_updated(self, nbytes: int) -> None:
        self.pos += nbytes
        if self.pos < len(self.target):
            if self.op is not None:
                self.op.last_progress = time.monotonic()
            return
        try:
            _ON_FULL[self.state](self)
        except ProtocolError as e:
            self._error(e)

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost judges what that means

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        if was is RxState.CLOSED:
            return  # closed by us: already accounted for
        why = f"connection lost ({exc or 'closed'})"
        if was in RING_DATA and not self.node.closing:
            self.fail(f"stream from peer {self.peer_id} {why}")  # the ring is broken
        else:
            self.close("", why, quiet=True)

    # ---------------------------------------------------------------- pre-auth

    def _on_hello_header(self) -> None:
        mtype, length = parse_header(self.hdr)
        if mtype not in _HELLOS or length > PRE_AUTH_MAX_BODY:
            raise ProtocolError(f"expected a hello, got {mtype.name} of {length} bytes")
        self.hello_type = mtype
        self._to(RxState.HELLO_BODY, self._small[:length])
        if length == 0:
            self._on_hello_body()

    def _on_hello_body(self) -> None:
        msg = m.decode(self.hello_type, bytes(self.target))
        if isinstance(msg, m.P2PHello):
            self._on_ring_hello(msg)
        elif isinstance(msg, m.ProbeHello):
            self._on_probe_hello(msg)
        else:
            assert isinstance(msg, m.StateHello)
            self._on_state_hello(msg)

    def _on_ring_hello(self, msg: m.P2PHello) -> None:
        self.peer_id, self.epoch = msg.peer_id, msg.epoch
        parts = (self.nonce, msg.peer_id, msg.epoch, msg.stream, msg.shm.encode(), msg.shm_bytes)
        if not verify(self.node.token, msg.auth, b"pccl-p2p", *parts):
            self.reject("hello failed authentication")
            return
        self.shm_offer = (msg.shm, msg.shm_bytes)
        self.node.authenticated(self)
        self.node.judge_hello(self)

    def _on_state_hello(self, msg: m.StateHello) -> None:
        self.peer_id = msg.peer_id
        parts = (self.nonce, msg.peer_id, msg.sync_id)
        if not verify(self.node.token, msg.auth, b"pccl-state", *parts):
            self.reject("state hello failed authentication")
            return
        self.node.authenticated(self)
        self.state_hello = msg
        self._to(RxState.STATE_REQUEST, self._hdr[: HEADER.size])

    def _on_probe_hello(self, msg: m.ProbeHello) -> None:
        self.peer_id = msg.peer_id
        if not verify(
            self.node.token, msg.auth, PROBE_PURPOSE, self.nonce, msg.peer_id, msg.round_id
        ):
            self.reject("probe hello failed authentication")
            return
        self.node.authenticated(self)
        self.node.stats["probed"] += 1
        self.probe = ProbeResponder()
        self._to(RxState.PROBE, self.probe.first())
        assert self.transport is not None
        self.transport.write(m.P2PHelloAck(True).encode())

    def _on_probe(self) -> None:
        assert self.probe is not None and self.transport is not None
        self._to(RxState.PROBE, self.probe.on_full(self.transport.write))

    def _handshake_expired(self) -> None:
        if self.state in _HANDSHAKE:
            limit = self.node.config.handshake_timeout_s
            self.close("timed_out", f"no valid hello within {limit:.1f}s")

    # ---------------------------------------------------------------- ring data (hot path)

    def _on_frame_header(self) -> None:
        mtype, length = parse_header(self.hdr)
        if mtype != MsgType.P2P_DATA:
            raise ProtocolError(f"{mtype.name} on a data stream")
        self.header = parse_data_header(self.hdr, length, HEADER.size)
        self._route()

    def _on_payload(self) -> None:
        op, h = self.op, self.header
        self.op = None
        self._to(RxState.FRAME_HDR, self._hdr)
        if op is not None and not op.finished:
            op.on_frame(h)

    def _on_discarded(self) -> None:
        self.remaining -= self.pos
        self._discard_next()

    def _discard_next(self) -> None:
        if self.remaining <= 0:
            self._to(RxState.FRAME_HDR, self._hdr)
            return
        self._to(RxState.DISCARD, _DISCARD[: min(self.remaining, len(_DISCARD))])

    def _route(self) -> None:
        """Decide where the payload of the frame whose header we hold goes."""
        h = self.header
        node = self.node
        op = node.ops.get(h.op_id)
        shm = self.shm
        if shm is not None and (op is not None or node.is_stale(h.op_id)):
            # Shared-memory link: the payload is already in the ring; nothing to read.
            src = shm.take(h.payload)
            self._to(RxState.FRAME_HDR, self._hdr)
            if op is None or op.finished:
                node.stale_frames += 1
                shm.release()
            elif op.reads_in_place(h):  # the reduction reads the ring: no copy
                op.recv_target(h)  # validates the header against the schedule
                op.on_frame(h, src)
                shm.release()
            else:
                shm.copy_out(op.recv_target(h), src)
                shm.release()  # out of the ring before the work: the writer goes on meanwhile
                op.on_frame(h)
            self._breathe()
            return
        if op is not None and not op.finished:
            self._to(RxState.PAYLOAD, op.recv_target(h))
            self.op = op
            if h.payload == 0:
                self._on_payload()
        elif op is not None or node.is_stale(h.op_id):
            self.remaining = h.payload  # stale: an aborted or finished operation
            node.stale_frames += 1
            self._discard_next()
        else:
            # An operation we have not been told about yet: keep the header, stop reading.
            self._to(RxState.PARKED, self._hdr[_FULL_HEADER:])
            self.parked_since = time.monotonic()
            assert self.transport is not None
            self.transport.pause_reading()
            node.parked.add(self)

    def _breathe(self) -> None:
        """After a frame taken from a shared-memory ring, at least every ``_BREATHE_S``, let
        the loop run its timers (heartbeats, deadlines) before the next header. Headers are
        tiny, so dozens may wait in the socket, and each costs a whole frame's work once its
        bytes need no reading: without this they would all be handled in one callback
        (seconds, on fresh memory)."""
        t = self.transport
        if t is None or self._breathing:
            return
        now = time.monotonic()
        if now - self._breathed < _BREATHE_S:
            return
        self._breathed = now
        self._breathing = True
        t.pause_reading()
        asyncio.get_running_loop().call_soon(self._breathe_out)

    def _breathe_out(self) -> None:
        self._breathing = False
        if self.state is RxState.FRAME_HDR and self.transport is not None:
            self.transport.resume_reading()

    def unpark(self) -> None:
        """Re-route the parked frame after an operation was registered or given up."""
        if self.state is not RxState.PARKED:
            return
        h = self.header
        if h.op_id not in self.node.ops and not self.node.is_stale(h.op_id):
            return  # still to come
        self.node.parked.discard(self)
        try:
            self._route()
        except ProtocolError as e:
            self.fail(f"protocol error from peer {self.peer_id}: {e}")
            return
        assert self.transport is not None
        self.transport.resume_reading()

    # ---------------------------------------------------------------- state requester

    def _on_request_header(self) -> None:
        mtype, length = parse_header(self.hdr)  # bounded by max_body(P2P_STATE_REQUEST)
        if mtype != MsgType.P2P_STATE_REQUEST:
            raise ProtocolError(f"expected a state request, got {mtype.name}")
        self._to(RxState.STATE_REQUEST_BODY, memoryview(bytearray(length)))
        if length == 0:
            self._on_request_body()

    def _on_request_body(self) -> None:
        req = m.decode(MsgType.P2P_STATE_REQUEST, bytes(self.target))
        assert isinstance(req, m.StateRequest) and self.state_hello is not None
        self._to(RxState.SERVING, self._hdr[:1])  # any byte from here on is an error
        self._stop_deadline()
        self.node.tune(self.transport)
        self.node.serve(self, self.state_hello, req)

    def _on_unexpected(self) -> None:
        raise ProtocolError(f"unexpected bytes in state {self.state.value}")

    def _on_closed(self) -> None:
        self.pos = 0  # never read normally (the transport is closed); ignore anything

    # ---------------------------------------------------------------- outcomes

    def accept(self) -> None:
        """Acknowledge the hello: from now on the stream carries data."""
        assert self.transport is not None
        self._to(RxState.FRAME_HDR, self._hdr)
        self._stop_deadline()
        self.node.tune(self.transport)
        self.shm = self._map_offer()
        if self.shm is not None:
            self.node.stats["shm_links"] += 1
        self.transport.write(m.P2PHelloAck(True, shm=self.shm is not None).encode())
        self.transport.resume_reading()

    def _map_offer(self) -> ShmReader | None:
        """Map the segment the verified hello offered, when it can be ours (same host, plain
        TCP, enabled); any failure leaves the stream on TCP (see :mod:`pccl.peer.shm_link`)."""
        name, cap = self.shm_offer
        node = self.node
        if not name or not node.config.shm_link_bytes or node.tls or not shm_link.AVAILABLE:
            return None
        try:
            return ShmReader.attach(name, cap)
        except (OSError, ValueError) as e:
            log.info("shared-memory link from peer %d refused: %s", self.peer_id, e)
            return None

    def park_hello(self) -> None:
        """Wait (reading paused) for the announcement of the epoch this hello names."""
        assert self.transport is not None
        self._to(RxState.PARKED_HELLO, self._hdr[:1])
        self.transport.pause_reading()

    def reject(self, reason: str) -> None:
        """Refuse the hello, telling the dialler why, and close."""
        if self.hello_type == MsgType.P2P_STATE_HELLO:
            reply = m.StateError(reason[:500]).encode()
        else:
            reply = m.P2PHelloAck(False, reason[:500]).encode()
        self.close("rejected", reason, reply=reply)

    def fail(self, reason: str) -> None:
        """This accepted ring stream broke: close it and fail every operation."""
        assert self.state in RING_DATA, self.state
        self.close("broken", reason)
        self.node.fail_ops(reason)

    def close(
        self, stat: str, reason: str, *, reply: bytes | None = None, quiet: bool = False
    ) -> None:
        """Close this connection and only it; count it under ``node.stats[stat]`` (unless
        ``stat`` is empty). With ``reply`` (possibly empty) that is written and the transport
        closed gracefully after its buffer; without, the connection is aborted. Idempotent."""
        if self.state is RxState.CLOSED:
            return
        was = self.state
        self._to(RxState.CLOSED, self._hdr)
        self.op = None
        self.shm = None  # unmapped once no view of it is left
        self.node.forget(self)
        if stat:
            self.node.stats[stat] += 1
        self._stop_deadline()
        task = self.task
        self.task = None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if not quiet:
            level = logging.INFO if was in PRE_AUTH else logging.WARNING
            log.log(
                level,
                "closing p2p connection from %s (peer %d, %s): %s",
                self.host,
                self.peer_id,
                was.value,
                reason,
            )
        t = self.transport
        if t is not None and not t.is_closing():
            if reply is not None:
                t.write(reply)
                t.close()
            else:
                t.abort()

    def _error(self, e: ProtocolError) -> None:
        if self.state in RING_DATA:
            self.fail(f"protocol error from peer {self.peer_id}: {e}")
        else:
            self.close("protocol_error", str(e))

    def _stop_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None


#: What to do when the buffer of each state is full: one table, one lookup per event.
_ON_FULL: dict[RxState, Callable[[RxStream], None]] = {
    _S.HELLO_HDR: RxStream._on_hello_header,
    _S.HELLO_BODY: RxStream._on_hello_body,
    _S.PARKED_HELLO: RxStream._on_unexpected,
    _S.FRAME_HDR: RxStream._on_frame_header,
    _S.PAYLOAD: RxStream._on_payload,
    _S.DISCARD: RxStream._on_discarded,
    _S.PARKED: RxStream._on_unexpected,
    _S.STATE_REQUEST: RxStream._on_request_header,
    _S.STATE_REQUEST_BODY: RxStream._on_request_body,
    _S.SERVING: RxStream._on_unexpected,
    _S.PROBE: RxStream._on_probe,
    _S.CLOSED: RxStream._on_closed,
}
assert set(_ON_FULL) == set(RxState) == set(_NEXT)
