"""Peer-to-peer data links: the listener, receive streams, send streams and frame routing.

Each peer keeps ``streams`` TCP connections to its ring successor (:class:`TxStream`, send only)
and accepts as many from its predecessor (:class:`RxStream`, receive only). A connection opens
with ``P2P_HELLO``/``P2P_HELLO_ACK`` (who, for which topology epoch, which stream); after that only
``P2P_DATA`` frames flow. Receive streams are ``asyncio.BufferedProtocol``s that read each frame
header into a fixed buffer and the payload straight into the memory the operation named for it
(:meth:`pccl.peer.ring.RingOp.recv_target`), so no payload is copied or allocated in Python.

Routing invariants: frames of an operation already finished or aborted are discarded; frames of an
operation this peer has not registered yet park the stream (reading paused) until it is; once an
operation is finished no further byte is written into its buffers.

Everything here runs on the peer's event-loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from pccl.peer.state_sync import StateServer

from pccl import messages as m
from pccl.auth import new_nonce, prove, verify
from pccl.config import Config
from pccl.errors import ProtocolError
from pccl.frame import (
    DATA_HEADER,
    HEADER,
    DataHeader,
    FrameDecoder,
    MsgType,
    max_body,
    parse_data_header,
    parse_header,
)
from pccl.tls import TLSConfig

if TYPE_CHECKING:
    from pccl.peer.ring import RingOp

log = logging.getLogger("pccl.peer")

__all__ = ["P2PNode", "RxStream", "TxStream"]

_FULL_HEADER = HEADER.size + DATA_HEADER.size
_MAX_HELLO = 4096
_DISCARD = memoryview(bytearray(1 << 20))
_NO_HEADER = DataHeader(0, 0, 0, 0, 0, 0, 0)


def same_host(sock: socket.socket) -> bool:
    """Whether both ends of a connected TCP socket are on this host (the link is loopback)."""
    try:
        here, there = sock.getsockname()[0], sock.getpeername()[0]
        return here == there or ipaddress.ip_address(there).is_loopback
    except (OSError, ValueError, IndexError, TypeError):
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def streams_for(host: str, streams: int, cfg: Config) -> int:
    """Streams to open to a ring successor at ``host``: ``cfg.local_streams`` (at most
    ``streams``) when it is a loopback address (striping exists to fill long-fat network pipes;
    on loopback every extra stream only costs CPU), else ``streams``."""
    if cfg.local_streams and _is_loopback(host):
        return min(cfg.local_streams, streams)
    return streams


def buffer_bytes(sock: socket.socket, cfg: Config) -> int:
    """SO_SNDBUF/SO_RCVBUF for a p2p socket (0: leave the kernel's autotuning)."""
    if cfg.local_socket_buffer_bytes and same_host(sock):
        return cfg.local_socket_buffer_bytes
    return cfg.socket_buffer_bytes


def tune_socket(sock: socket.socket | None, cfg: Config) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        size = buffer_bytes(sock, cfg)
        if size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError:  # not fatal: defaults still work
        pass


class RxStream(asyncio.BufferedProtocol):
    """Receiving end of one stream from our ring predecessor."""

    # states
    HELLO_HDR, HELLO_BODY, PARKED_HELLO, FRAME_HDR, PAYLOAD, DISCARD, PARKED, SERVING = range(8)

    def __init__(self, node: P2PNode) -> None:
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.hdr = bytearray(_FULL_HEADER)
        self.state = self.HELLO_HDR
        self.target = memoryview(self.hdr)[: HEADER.size]
        self.pos = 0
        self.remaining = 0  # payload bytes left to discard
        self.peer_id = 0
        self.epoch = 0
        self.op: RingOp | None = None
        self.header: DataHeader = _NO_HEADER
        self.opened = time.monotonic()
        self.parked_since = 0.0
        self.closed = False
        self.first_type = MsgType.P2P_HELLO
        self.writable = asyncio.Event()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        tune_socket(transport.get_extra_info("socket"), self.node.config)
        self.node.pending_rx.add(self)
        self.nonce = new_nonce()
        self.transport.write(m.P2PChallenge(self.nonce).encode())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.state == self.PAYLOAD and self.op is not None and self.op.finished:
            # The operation ended (aborted): never write into its memory again.
            self.remaining = len(self.target) - self.pos
            self.op = None
            self._discard_next()
        return self.target[self.pos :]

    def buffer_updated(self, nbytes: int) -> None:
        self.pos += nbytes
        if self.pos < len(self.target):
            if self.op is not None:
                self.op.last_progress = time.monotonic()
            return
        try:
            self._advance()
        except ProtocolError as e:
            self.fail(f"protocol error from peer {self.peer_id}: {e}")

    def _advance(self) -> None:
        st = self.state
        if st == self.FRAME_HDR:
            mtype, length = parse_header(self.hdr)
            if mtype != MsgType.P2P_DATA:
                raise ProtocolError(f"{mtype.name} on a data stream")
            h = parse_data_header(self.hdr, length, HEADER.size)
            self.header = h
            self._route()
        elif st == self.PAYLOAD:
            op, h = self.op, self.header
            self.op = None
            self._expect_header()
            if op is not None and not op.finished:
                op.on_frame(h)
        elif st == self.DISCARD:
            self.remaining -= self.pos
            self._discard_next()
        elif st == self.HELLO_HDR:
            mtype, length = parse_header(self.hdr)
            limit = _MAX_HELLO if mtype == MsgType.P2P_HELLO else max_body(mtype)
            if mtype not in (MsgType.P2P_HELLO, MsgType.P2P_STATE_REQUEST) or length > limit:
                raise ProtocolError(f"expected a hello, got {mtype.name} of {length} bytes")
            self.first_type = mtype
            self.state = self.HELLO_BODY
            self.target = memoryview(bytearray(length))
            self.pos = 0
            if length == 0:
                self._advance()
        elif st == self.HELLO_BODY and self.first_type == MsgType.P2P_STATE_REQUEST:
            req = m.decode(MsgType.P2P_STATE_REQUEST, bytes(self.target))
            assert isinstance(req, m.StateRequest)
            token = self.node.token
            if not verify(token, req.auth, b"pccl-state", self.nonce, req.peer_id, req.sync_id):
                self.peer_id = req.peer_id
                self.reject("state request failed authentication")
                return
            self.state = self.SERVING
            self.target = memoryview(bytearray(1))  # the requester sends nothing more
            self.pos = 0
            self.node.pending_rx.discard(self)
            assert self.transport is not None
            task = asyncio.get_running_loop().create_task(
                self.node.state_server.serve(self.transport, self.writable, req)
            )
            self.node.serving.add(task)
            task.add_done_callback(self.node.serving.discard)
        elif st == self.SERVING:
            raise ProtocolError("unexpected bytes from a state requester")
        elif st == self.HELLO_BODY:
            msg = m.decode(MsgType.P2P_HELLO, bytes(self.target))
            assert isinstance(msg, m.P2PHello)
            self.peer_id, self.epoch = msg.peer_id, msg.epoch
            parts = (self.nonce, msg.peer_id, msg.epoch, msg.stream)
            if not verify(self.node.token, msg.auth, b"pccl-p2p", *parts):
                self.reject("hello failed authentication")
                return
            self.node.on_hello(self, msg)

    def _expect_header(self) -> None:
        self.state = self.FRAME_HDR
        self.target = memoryview(self.hdr)
        self.pos = 0

    def _discard_next(self) -> None:
        if self.remaining <= 0:
            self._expect_header()
            return
        self.state = self.DISCARD
        self.target = _DISCARD[: min(self.remaining, len(_DISCARD))]
        self.pos = 0

    def _route(self) -> None:
        """Decide where the payload of the frame whose header we hold goes."""
        h = self.header
        node = self.node
        op = node.ops.get(h.op_id)
        if op is not None and not op.finished:
            self.op = op
            self.target = op.recv_target(h)
            self.pos = 0
            self.state = self.PAYLOAD
            if h.payload == 0:
                self._advance()
        elif op is not None or h.op_id <= node.max_op_id:
            self.remaining = h.payload  # stale: an aborted or finished operation
            node.stale_frames += 1
            self._discard_next()
        else:
            self.state = self.PARKED  # an operation we have not been told about yet
            self.parked_since = time.monotonic()
            assert self.transport is not None
            self.transport.pause_reading()
            node.parked.add(self)

    def unpark(self) -> None:
        """Re-route the parked frame after a new operation was registered."""
        if self.state != self.PARKED or self.closed:
            return
        h = self.header
        if h.op_id not in self.node.ops and h.op_id > self.node.max_op_id:
            return  # still not ours
        self.node.parked.discard(self)
        try:
            self._route()
        except ProtocolError as e:
            self.fail(f"protocol error from peer {self.peer_id}: {e}")
            return
        assert self.transport is not None
        self.transport.resume_reading()

    def accept(self) -> None:
        """Acknowledge the hello: from now on the stream carries data."""
        assert self.transport is not None
        self.transport.write(m.P2PHelloAck(True).encode())
        self._expect_header()
        self.transport.resume_reading()

    def reject(self, reason: str) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.warning("rejecting p2p connection from %s (peer %d): %s", peer, self.peer_id, reason)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(m.P2PHelloAck(False, reason[:500]).encode())
            self.transport.close()
        self.closed = True

    def fail(self, reason: str) -> None:
        log.warning("closing p2p stream: %s", reason)
        self.node.fail_ops(reason)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        was_data = self.state in (self.FRAME_HDR, self.PAYLOAD, self.DISCARD, self.PARKED)
        deliberate = self.closed
        self.closed = True
        self.node.pending_rx.discard(self)
        self.node.parked.discard(self)
        streams = self.node.rx.get(self.peer_id)
        if streams is not None:
            streams.discard(self)
        if was_data and not deliberate and not self.node.closing:
            self.node.fail_ops(f"stream from peer {self.peer_id} lost ({exc or 'closed'})")


class TxStream(asyncio.Protocol):
    """Sending end of one stream to our ring successor, with flow control."""

    def __init__(self, node: P2PNode, peer_id: int, epoch: int, index: int) -> None:
        self.node = node
        self.peer_id = peer_id
        self.epoch = epoch
        self.index = index
        self.challenged = False
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue: collections.deque[tuple[bytes, memoryview]] = collections.deque()
        self.paused = False
        self.closed = False
        self.sender: _Sender | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        tune_socket(transport.get_extra_info("socket"), self.node.config)
        self.transport.set_write_buffer_limits(high=self.node.config.chunk_bytes * 2)

    def data_received(self, data: bytes) -> None:
        try:
            for mtype, body in self.decoder.feed(data):
                if mtype == MsgType.P2P_CHALLENGE and not self.challenged:
                    ch = m.decode(mtype, body)
                    assert isinstance(ch, m.P2PChallenge) and self.transport is not None
                    self.challenged = True
                    node = self.node
                    proof = prove(
                        node.token, b"pccl-p2p", ch.nonce, node.my_id, self.epoch, self.index
                    )
                    self.transport.write(
                        m.P2PHello(node.my_id, self.epoch, self.index, proof).encode()
                    )
                    continue
                if mtype != MsgType.P2P_HELLO_ACK or self.acked.done() or not self.challenged:
                    raise ProtocolError(f"unexpected {mtype.name} on a send stream")
                ack = m.decode(mtype, body)
                assert isinstance(ack, m.P2PHelloAck)
                if ack.ok:
                    self.acked.set_result(None)
                else:
                    self.acked.set_exception(ConnectionRefusedError(ack.reason))
        except ProtocolError as e:
            if not self.acked.done():
                self.acked.set_exception(e)
            self.node.fail_ops(f"protocol error on stream to peer {self.peer_id}: {e}")
            assert self.transport is not None
            self.transport.abort()

    def send(self, header: bytes, payload: memoryview) -> None:
        sender = self.sender
        if sender is not None:
            sender.put(header, payload)
            return
        self.queue.append((header, payload))
        if not self.paused:
            self._pump()

    def start_sender(self) -> None:
        """Move the data phase to a sender thread (after the hello; plain TCP only)."""
        if self.sender is not None or self.transport is None or self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is None or self.transport.get_extra_info("sslcontext") is not None:
            return
        try:
            self.sender = _Sender(sock.fileno(), self._sender_failed)
        except OSError as e:  # not fatal: the transport path still works
            log.debug("no sender thread for the stream to peer %d: %s", self.peer_id, e)

    def _sender_failed(self, err: OSError) -> None:
        if self.closed or self.node.closing:
            return
        self.node.tx_broken = True
        self.node.fail_ops(f"stream to peer {self.peer_id} lost ({err})")
        if self.transport is not None:
            self.transport.abort()

    def _pump(self) -> None:
        t = self.transport
        if t is None or self.closed:
            self.queue.clear()
            return
        q = self.queue
        while q and not self.paused:
            t.writelines(q.popleft())

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def close(self) -> None:
        self.closed = True
        self.queue.clear()
        if self.sender is not None:
            self.sender.stop()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = not self.closed
        self.closed = True
        self.queue.clear()
        if self.sender is not None:
            self.sender.stop()
        if not self.acked.done():
            self.acked.set_exception(ConnectionError(f"closed before hello ack: {exc}"))
        if was_open and not self.node.closing:
            self.node.tx_broken = True
            self.node.fail_ops(f"stream to peer {self.peer_id} lost ({exc or 'closed'})")


class _Sender:
    """A thread that writes one stream's frames, so the kernel's send copies run beside the
    event loop's receive copies and reductions instead of after them.

    It writes to a duplicate of the stream's descriptor (same socket, still non-blocking: the
    transport's reads are unaffected) with the GIL released in each ``sendmsg`` and waits for
    room with ``poll``; frames leave in :meth:`put` order. The transport writes nothing after
    the hello, so the two never interleave. :meth:`stop` makes the thread close its descriptor
    within ``_POLL_MS``; a write error is reported once through ``on_error`` on the loop.
    """

    _POLL_MS = 100

    def __init__(self, fd: int, on_error: Callable[[OSError], None]) -> None:
        self._sock = socket.socket(fileno=os.dup(fd))
        self._loop = asyncio.get_running_loop()
        self._on_error = on_error
        self._cv = threading.Condition()
        self._q: collections.deque[tuple[bytes, memoryview]] = collections.deque()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="pccl-send", daemon=True)
        self._thread.start()

    def put(self, header: bytes, payload: memoryview) -> None:
        with self._cv:
            self._q.append((header, payload))
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._q.clear()
            self._cv.notify()

    def _run(self) -> None:
        sock = self._sock
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        try:
            while True:
                with self._cv:
                    while not self._q and not self._stopped:
                        self._cv.wait()
                    if self._stopped:
                        return
                    header, payload = self._q.popleft()
                bufs = [memoryview(header), payload]
                while bufs:
                    try:
                        sent = sock.sendmsg(bufs)
                    except (BlockingIOError, InterruptedError):
                        poller.poll(self._POLL_MS)
                        if self._stopped:
                            return
                        continue
                    while bufs and sent >= len(bufs[0]):
                        sent -= len(bufs[0])
                        bufs.pop(0)
                    if sent:
                        bufs[0] = bufs[0][sent:]
        except OSError as e:
            if not self._stopped:
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    self._loop.call_soon_threadsafe(self._on_error, e)
        finally:
            sock.close()


class P2PNode:
    """Listener, streams and the operation registry of one peer."""

    def __init__(
        self,
        config: Config,
        streams: int,
        token: bytes | None = None,
        tls: TLSConfig | None = None,
    ) -> None:
        self.config = config
        self.token = token
        self._server_ssl = tls.server_context(require_client_cert=True) if tls else None
        self._client_ssl = tls.client_context() if tls else None
        self.nstreams = streams
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.my_id = 0
        self.epoch = 0  # newest epoch announced to us
        self.prev_id = 0
        self.next_id = 0
        self.next_addr: tuple[str, int] | None = None
        self.tx: list[TxStream] = []
        self.tx_broken = False
        self.rx: dict[int, set[RxStream]] = {}
        self.pending_rx: set[RxStream] = set()
        self.parked: set[RxStream] = set()
        self.ops: dict[int, RingOp] = {}
        self.max_op_id = 0
        self.stale_frames = 0
        self.closing = False
        self.state_server = StateServer()
        self.serving: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: RxStream(self),
            host,
            port,
            backlog=256,
            reuse_address=True,
            ssl=self._server_ssl,
            ssl_handshake_timeout=self.config.handshake_timeout_s if self._server_ssl else None,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    # ------------------------------------------------------------ topology

    def announce(self, epoch: int, my_id: int, prev_id: int) -> None:
        """Record a newly announced epoch so hellos of that epoch can be judged."""
        self.epoch, self.my_id, self.prev_id = epoch, my_id, prev_id
        for pid in list(self.rx):
            if pid != prev_id:
                for s in list(self.rx.pop(pid)):
                    s.closed = True
                    if s.transport is not None:
                        s.transport.close()
        for s in list(self.pending_rx):
            if s.state == RxStream.PARKED_HELLO:
                self._judge_hello(s)

    def on_hello(self, s: RxStream, msg: m.P2PHello) -> None:
        if msg.epoch > self.epoch:
            s.state = RxStream.PARKED_HELLO  # the master's announcement has not reached us yet
            assert s.transport is not None
            s.transport.pause_reading()
            return
        self._judge_hello(s)

    def _judge_hello(self, s: RxStream) -> None:
        if s.epoch > self.epoch:
            return  # still waiting for our announcement
        if s.epoch < self.epoch:
            s.reject(f"hello for epoch {s.epoch}, current is {self.epoch}")
            return
        if s.peer_id != self.prev_id:
            s.reject(f"peer {s.peer_id} is not our predecessor (expected {self.prev_id})")
            return
        self.pending_rx.discard(s)
        self.rx.setdefault(s.peer_id, set()).add(s)
        s.accept()

    def streams_to(self, host: str) -> int:
        """Streams to open to a successor at ``host`` (see :func:`streams_for`)."""
        return streams_for(host, self.nstreams, self.config)

    async def connect_next(self, next_id: int, host: str, port: int, epoch: int) -> None:
        """Make sure :meth:`streams_to` healthy streams lead to ``next_id``; reuse when unchanged.

        Raises:
            ConnectionError, OSError, TimeoutError: the successor could not be reached.
        """
        want = self.streams_to(host)
        healthy = all(not s.closed for s in self.tx) and len(self.tx) == want
        same = next_id == self.next_id and (host, port) == self.next_addr
        if same and healthy and not self.tx_broken:
            return
        self.close_tx()
        self.next_id, self.next_addr = next_id, (host, port)
        self.tx_broken = False
        loop = asyncio.get_running_loop()
        deadline = self.config.connect_timeout_s

        async def one(i: int) -> TxStream:
            _, proto = await loop.create_connection(
                lambda: TxStream(self, next_id, epoch, i), host, port, ssl=self._client_ssl
            )
            assert isinstance(proto, TxStream)
            await proto.acked
            if self.config.send_threads:
                proto.start_sender()  # not on TLS links: the transport writes those
            return proto

        tasks = [asyncio.ensure_future(one(i)) for i in range(want)]
        try:
            async with asyncio.timeout(deadline):
                self.tx = list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is None:
                    t.result().close()
                else:
                    t.cancel()
            raise

    def close_tx(self) -> None:
        for s in self.tx:
            s.close()
        self.tx = []
        self.next_id = 0
        self.next_addr = None

    # ------------------------------------------------------------ operations

    def register(self, op: RingOp) -> None:
        self.ops[op.op_id] = op
        self.max_op_id = max(self.max_op_id, op.op_id)
        for s in list(self.parked):
            s.unpark()

    def unregister(self, op: RingOp) -> None:
        self.ops.pop(op.op_id, None)

    def fail_ops(self, reason: str) -> None:
        for op in list(self.ops.values()):
            op.fail(reason)

    def expire_parked(self, older_than_s: float) -> None:
        """Close streams parked on an unknown operation too long, and connections that have
        not completed their hello within ``handshake_timeout_s`` (silent or stale dialers)."""
        now = time.monotonic()
        for s in list(self.parked):
            if now - s.parked_since > older_than_s:
                s.fail(f"frame for unknown operation parked for {older_than_s:.0f}s")
        limit = self.config.handshake_timeout_s
        for s in list(self.pending_rx):
            if now - s.opened > limit and s.transport is not None:
                log.warning("closing p2p connection without a valid hello after %.0fs", limit)
                self.pending_rx.discard(s)
                s.closed = True
                s.transport.abort()

    async def close(self) -> None:
        self.closing = True
        self.close_tx()
        for streams in self.rx.values():
            for s in streams:
                if s.transport is not None:
                    s.transport.close()
        for s in list(self.pending_rx):
            if s.transport is not None:
                s.transport.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
