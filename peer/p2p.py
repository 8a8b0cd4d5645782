"""Peer-to-peer links: the listener and its connection registry, send streams, frame routing.

Each peer keeps ``streams`` TCP connections to its ring successor (:class:`TxStream`, send only,
a small :class:`TxState` machine) and accepts as many from its predecessor; shared-state
requesters (:mod:`pccl.peer.state_sync`) dial the same listener. Accepted connections are
:class:`~pccl.peer.rx_stream.RxStream` state machines (pre-auth -> ring data or state serving ->
closed; see :mod:`pccl.peer.rx_stream`). :class:`P2PNode` owns them: it caps connections that
have not proven the token (in all and per address, evicting the oldest), judges ring hellos
against the announced epoch, routes data frames to registered operations, runs state-serving
tasks under a progress deadline and counts connection outcomes in ``stats``.

Only an accepted ring stream from our predecessor, or an acknowledged stream to our successor,
can fail operations; nothing a stranger sends reaches an operation, a buffer or another
connection.

Everything here runs on the peer's event-loop thread, except :class:`_Sender`'s write loops.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from pccl.peer import shm_link
from pccl.peer.rx_stream import RxState, RxStream
from pccl.peer.shm_link import ShmWriter
from pccl.peer.state_sync import StateServer
from pccl.peer.tuning import Window, auto_streams, check_window, stream_window, tune_wan_socket

from pccl import messages as m
from pccl.auth import prove
from pccl.config import Config
from pccl.errors import ProtocolError
from pccl.frame import PRE_AUTH_MAX_BODY, FrameDecoder, MsgType
from pccl.tls import TLSConfig

if TYPE_CHECKING:
    from pccl.peer.ring import RingOp

log = logging.getLogger("pccl.peer")

__all__ = [
    "MAX_UNAUTHENTICATED",
    "MAX_UNAUTHENTICATED_PER_ADDRESS",
    "P2PNode",
    "RxState",
    "RxStream",
    "TxState",
    "TxStream",
]

#: Connections that have not proven the token yet, in all and from one address. Beyond either
#: cap the oldest such connection (of that address first) is closed for the newcomer.
MAX_UNAUTHENTICATED = 128
MAX_UNAUTHENTICATED_PER_ADDRESS = 16


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


def tune_socket(sock: socket.socket | None, cfg: Config) -> Window | None:
    """Set a p2p socket's options; return its per-stream window for a link to another host
    (see :mod:`pccl.peer.tuning`), None on loopback or without a socket."""
    if sock is None:
        return None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not same_host(sock):
            return tune_wan_socket(sock, cfg)
        size = buffer_bytes(sock, cfg)
        if size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError:  # not fatal: defaults still work
        pass
    return None


class TxState(enum.Enum):
    """States of one send stream we dialled to our ring successor."""

    CHALLENGE = "challenge"  #: connected; only the acceptor's small challenge may arrive
    HELLO_SENT = "hello_sent"  #: our hello is out; only its small ack may arrive
    SENDING = "sending"  #: acknowledged: data frames flow out, nothing may arrive
    CLOSED = "closed"  #: closed by us or lost


#: The one message each state accepts (each at most ``PRE_AUTH_MAX_BODY``); none in the others.
_TX_ACCEPTS: dict[TxState, MsgType] = {
    TxState.CHALLENGE: MsgType.P2P_CHALLENGE,
    TxState.HELLO_SENT: MsgType.P2P_HELLO_ACK,
}


class TxStream(asyncio.Protocol):
    """Sending end of one stream to our ring successor, with flow control."""

    def __init__(self, node: P2PNode, peer_id: int, epoch: int, index: int) -> None:
        self.node = node
        self.peer_id = peer_id
        self.epoch = epoch
        self.index = index
        self.state = TxState.CHALLENGE
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(gate=self._gate)
        self.acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue: collections.deque[tuple[bytes, memoryview]] = collections.deque()
        self.paused = False
        self.sender: _Sender | None = None
        self.offer: ShmWriter | None = None  # segment named in our hello, until the ack
        self.shm: ShmWriter | None = None  # accepted: payloads go through it
        self.window: Window | None = None  # read back after tuning (links to other hosts)
        self._handlers: dict[MsgType, Callable[[m.Message], None]] = {
            MsgType.P2P_CHALLENGE: self.on_challenge,
            MsgType.P2P_HELLO_ACK: self.on_hello_ack,
        }

    @property
    def closed(self) -> bool:
        return self.state is TxState.CLOSED

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.window = tune_socket(transport.get_extra_info("socket"), self.node.config)
        self.transport.set_write_buffer_limits(high=self.node.config.chunk_bytes * 2)

    def _gate(self, mtype: MsgType, length: int) -> None:
        if _TX_ACCEPTS.get(self.state) is not mtype or length > PRE_AUTH_MAX_BODY:
            raise ProtocolError(f"unexpected {mtype.name} ({length} bytes) in {self.state.value}")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            for mtype, body in self.decoder.feed(data):
                self._handlers[mtype](m.decode(mtype, body))
                if self.closed:
                    return
        except ProtocolError as e:
            self._broken(f"protocol error on stream to peer {self.peer_id}: {e}")

    def on_challenge(self, msg: m.Message) -> None:
        assert isinstance(msg, m.P2PChallenge) and self.transport is not None
        node = self.node
        self.offer = self._offer_shm()
        name, cap = (self.offer.name, self.offer.seg.cap) if self.offer else ("", 0)
        proof = prove(
            node.token, b"pccl-p2p", msg.nonce, node.my_id, self.epoch, self.index,
            name.encode(), cap,
        )  # fmt: skip
        self.state = TxState.HELLO_SENT
        hello = m.P2PHello(node.my_id, self.epoch, self.index, proof, name, cap)
        self.transport.write(hello.encode())

    def _offer_shm(self) -> ShmWriter | None:
        """A segment for a successor on this host (see :mod:`pccl.peer.shm_link`), or None."""
        cfg = self.node.config
        if not (cfg.shm_link_bytes and cfg.send_threads and shm_link.AVAILABLE):
            return None
        if self.node.tls or self.transport is None:
            return None
        if not same_host(self.transport.get_extra_info("socket")):
            return None
        try:
            return ShmWriter(max(cfg.shm_link_bytes, 2 * cfg.chunk_bytes))
        except (OSError, ValueError) as e:  # not fatal: TCP carries the payloads
            log.info("no shared-memory link to peer %d: %s", self.peer_id, e)
            return None

    def on_hello_ack(self, msg: m.Message) -> None:
        assert isinstance(msg, m.P2PHelloAck)
        offer, self.offer = self.offer, None
        if offer is not None:
            offer.unlink()  # the acceptor has mapped it (and unlinked it) or never will
            if msg.ok and msg.shm:
                self.shm = offer
        if not msg.ok:
            self.acked.set_exception(ConnectionRefusedError(msg.reason))
            self.close()
            return
        self.state = TxState.SENDING
        self.acked.set_result(None)

    def send(self, header: bytes, payload: memoryview) -> None:
        self.node.stream_tx_bytes[self.index] += len(payload)  # per-stream counters (metrics)
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
            self.sender = _Sender(sock.fileno(), self._sender_failed, self.shm)
        except OSError as e:  # not fatal: the transport path still works
            log.debug("no sender thread for the stream to peer %d: %s", self.peer_id, e)

    def _sender_failed(self, err: OSError) -> None:
        if not self.closed and not self.node.closing:
            self._broken(f"stream to peer {self.peer_id} lost ({err})")

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
        """Close deliberately: nothing is failed."""
        self._end(None)
        if self.transport is not None:
            self.transport.close()

    def _end(self, why: str | None) -> None:
        was = self.state
        self.state = TxState.CLOSED
        self.queue.clear()
        if self.sender is not None:
            self.sender.stop()
        if self.offer is not None:
            self.offer.unlink()
            self.offer = None
        if not self.acked.done():
            self.acked.set_exception(ConnectionError(f"closed before hello ack: {why}"))
        if why is not None and was is not TxState.CLOSED and not self.node.closing:
            self.node.tx_broken = True
            if was is TxState.SENDING:  # only an acknowledged stream carries operations
                self.node.fail_ops(why)

    def _broken(self, why: str) -> None:
        self._end(why)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"stream to peer {self.peer_id} lost ({exc or 'closed'})")


class _Sender:
    """A thread that writes one stream's frames, so the kernel's send copies run beside the
    event loop's receive copies and reductions instead of after them.

    It writes to a duplicate of the stream's descriptor (same socket, still non-blocking: the
    transport's reads are unaffected) with the GIL released in each ``sendmsg`` and waits for
    room with ``poll``; frames leave in :meth:`put` order. On a shared-memory link (``shm``) it
    copies each payload into the segment (waiting for room there) before sending the header.
    The transport writes nothing after the hello, so the two never interleave. :meth:`stop`
    makes the thread close its descriptor within ``_POLL_MS``; a write error, or any other
    failure of the thread, is reported once through ``on_error`` on the loop (as an OSError).
    """

    _POLL_MS = 100

    def __init__(
        self, fd: int, on_error: Callable[[OSError], None], shm: ShmWriter | None = None
    ) -> None:
        self._shm = shm
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

    def _is_stopped(self) -> bool:
        return self._stopped

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
                if self._shm is not None and len(payload):
                    if not self._shm.write(payload, self._is_stopped):
                        return
                    bufs = [memoryview(header)]
                else:
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
        except Exception as e:  # any failure breaks the stream, loudly; none ends the thread mute
            if not self._stopped:
                err = e if isinstance(e, OSError) else OSError(f"send thread: {e!r}")
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    self._loop.call_soon_threadsafe(self._on_error, err)
        finally:
            sock.close()


class P2PNode:
    """Listener, streams and the operation registry of one peer.

    ``stats`` counts connections by outcome, for metrics: ``accepted`` (by the listener),
    ``authenticated`` (hello verified), ``rejected`` (hello refused: bad proof, wrong epoch or
    peer), ``protocol_error`` (a malformed or unexpected frame on a connection that does not
    carry ring data), ``broken`` (an accepted ring stream lost or failed: operations fail),
    ``evicted_per_address`` / ``evicted_total`` (an older stranger closed for a newcomer),
    ``timed_out`` (no valid hello within ``handshake_timeout_s``), ``stalled`` (a state
    requester drained nothing for ``progress_timeout_s``), ``served`` / ``refused`` (state
    requests answered with every range, or with ``P2P_STATE_ERROR``), ``shm_links`` (accepted
    ring streams whose payloads come through a shared-memory segment).
    """

    def __init__(
        self,
        config: Config,
        streams: int,
        token: bytes | None = None,
        tls: TLSConfig | None = None,
    ) -> None:
        self.config = config
        self.token = token
        self.tls = tls is not None
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
        self.conns: set[RxStream] = set()  # every open accepted connection
        #: connections still pre-auth, oldest first (dicts keep insertion order), in all and
        #: by address
        self.unauthenticated: dict[RxStream, None] = {}
        self._unauth_by_host: dict[str, dict[RxStream, None]] = {}
        self.max_unauthenticated = MAX_UNAUTHENTICATED
        self.max_unauthenticated_per_address = MAX_UNAUTHENTICATED_PER_ADDRESS
        self.parked_hellos: set[RxStream] = set()
        self.rx: dict[int, set[RxStream]] = {}  # accepted ring streams by peer
        self.parked: set[RxStream] = set()
        self.ops: dict[int, RingOp] = {}
        self.max_op_id = 0
        #: operations the master commenced that this peer has not registered yet (it may be
        #: copying its input first): their frames park instead of being judged stale by
        #: ``max_op_id``, which a later-commenced, earlier-registered operation may have passed
        self.expected: set[int] = set()
        self.stale_frames = 0
        self.stats: collections.Counter[str] = collections.Counter()
        self.closing = False
        self.state_server = StateServer()
        #: payload bytes sent per stream index to the successor (all epochs), for metrics
        self.stream_tx_bytes: collections.Counter[int] = collections.Counter()
        #: measured links from this peer: peer id -> (Gbit/s, RTT ms) (pccl.peer.probe)
        self.links: dict[int, tuple[float, float]] = {}
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

    # ------------------------------------------------------------ connections

    def admit(self, s: RxStream) -> None:
        """Count a new connection as unauthenticated, first evicting the oldest stranger (of its
        address first) when a cap is reached: a flood displaces its own older connections, while
        a peer whose hello follows its connect within a round trip gets through."""
        self.stats["accepted"] += 1
        self.conns.add(s)
        same = self._unauth_by_host.setdefault(s.host, {})
        while len(same) >= self.max_unauthenticated_per_address:
            next(iter(same)).close("evicted_per_address", "too many unauthenticated connections")
        while len(self.unauthenticated) >= self.max_unauthenticated:
            old = next(iter(self.unauthenticated))
            old.close("evicted_total", "too many unauthenticated connections")
        self.unauthenticated[s] = None
        self._unauth_by_host.setdefault(s.host, {})[s] = None

    def authenticated(self, s: RxStream) -> None:
        """``s`` proved the token: it no longer counts against the caps."""
        self._unauth_left(s)
        self.stats["authenticated"] += 1

    def forget(self, s: RxStream) -> None:
        """``s`` is closed: drop it from every registry."""
        self._unauth_left(s)
        self.conns.discard(s)
        self.parked.discard(s)
        self.parked_hellos.discard(s)
        streams = self.rx.get(s.peer_id)
        if streams is not None:
            streams.discard(s)

    def _unauth_left(self, s: RxStream) -> None:
        if self.unauthenticated.pop(s, 0) is None:
            same = self._unauth_by_host[s.host]
            del same[s]
            if not same:
                del self._unauth_by_host[s.host]

    def tune(self, transport: asyncio.BaseTransport | None) -> None:
        """Set socket options on an authenticated connection (strangers keep the kernel's
        defaults: a large receive buffer would let them park megabytes in our kernel)."""
        if transport is not None:
            tune_socket(transport.get_extra_info("socket"), self.config)

    def serve(self, s: RxStream, hello: m.StateHello, req: m.StateRequest) -> None:
        """Start serving an authenticated state request on ``s`` (see :meth:`close`)."""
        task = asyncio.get_running_loop().create_task(self._serve(s, hello, req))
        s.task = task
        self.serving.add(task)
        task.add_done_callback(self.serving.discard)

    async def _serve(self, s: RxStream, hello: m.StateHello, req: m.StateRequest) -> None:
        assert s.transport is not None
        limit = self.config.progress_timeout_s
        try:
            sent = await self.state_server.serve(s.transport, s.writable, hello, req, limit)
        except TimeoutError:
            s.task = None
            s.close("stalled", f"state requester {hello.peer_id} drained nothing for {limit}s")
            return
        s.task = None
        # Drained: the graceful close is immediate.
        s.close("served" if sent else "refused", "state request done", reply=b"", quiet=True)

    # ------------------------------------------------------------ topology

    def announce(self, epoch: int, my_id: int, prev_id: int) -> None:
        """Record a newly announced epoch so hellos of that epoch can be judged."""
        self.epoch, self.my_id, self.prev_id = epoch, my_id, prev_id
        for pid in list(self.rx):
            if pid != prev_id:
                for s in list(self.rx.pop(pid)):
                    s.close("", f"peer {pid} is no longer our predecessor", quiet=True)
        for s in list(self.parked_hellos):
            self.judge_hello(s)

    def judge_hello(self, s: RxStream) -> None:
        """Accept, park or reject the verified ring hello of ``s`` against our epoch."""
        if s.epoch > self.epoch:  # the master's announcement has not reached us yet
            if s.state is not RxState.PARKED_HELLO:
                s.park_hello()
                self.parked_hellos.add(s)
            return
        self.parked_hellos.discard(s)
        if s.epoch < self.epoch:
            s.reject(f"hello for epoch {s.epoch}, current is {self.epoch}")
        elif s.peer_id != self.prev_id:
            s.reject(f"peer {s.peer_id} is not our predecessor (expected {self.prev_id})")
        else:
            self.rx.setdefault(s.peer_id, set()).add(s)
            s.accept()

    def streams_to(self, host: str, peer: int = 0) -> int:
        """Streams to open to a successor at ``host`` (see :func:`streams_for`); with
        ``Config.auto_streams``, from the measured bandwidth-delay product of the link to
        ``peer`` when there is one (:func:`pccl.peer.tuning.auto_streams`)."""
        cfg = self.config
        link = self.links.get(peer)
        if not cfg.auto_streams or link is None or _is_loopback(host):
            return streams_for(host, self.nstreams, cfg)
        return auto_streams(link[0], link[1], stream_window(cfg), cfg.max_streams)

    async def connect_next(self, next_id: int, host: str, port: int, epoch: int) -> None:
        """Make sure :meth:`streams_to` healthy streams lead to ``next_id``; reuse when unchanged.

        Raises:
            ConnectionError, OSError, TimeoutError: the successor could not be reached.
        """
        want = self.streams_to(host, next_id)
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
            if proto.shm is not None and proto.sender is None:
                proto.close()
                raise ConnectionError(f"no sender thread for the shared-memory link to {next_id}")
            return proto

        tasks = [asyncio.ensure_future(one(i)) for i in range(want)]
        try:
            async with asyncio.timeout(deadline):
                self.tx = list(await asyncio.gather(*tasks))
            link, window = self.links.get(next_id), self.tx[0].window if self.tx else None
            if link is not None and window is not None:
                check_window(next_id, window, len(self.tx), link[0], link[1])
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

    def expect(self, op_id: int) -> None:
        """The master commenced ``op_id`` for us: park its frames until it is registered (or
        given up), whatever operations register meanwhile."""
        if op_id > 0 and op_id not in self.ops:
            self.expected.add(op_id)

    def give_up(self, op_id: int) -> None:
        """``op_id`` will not be registered (the attempt ended first): its frames are stale
        from now on, parked ones included. (Commences arrive in op-id order, so every lower id
        is expected, registered or over by now.)"""
        if op_id in self.expected:
            self.expected.discard(op_id)
            self.max_op_id = max(self.max_op_id, op_id)
            self._unpark_all()

    def is_stale(self, op_id: int) -> bool:
        """Whether a frame of an unregistered ``op_id`` belongs to an operation that has
        finished, was aborted or will never run here (discard), rather than one still to come
        (park)."""
        return op_id <= self.max_op_id and op_id not in self.expected

    def register(self, op: RingOp) -> None:
        self.ops[op.op_id] = op
        self.expected.discard(op.op_id)
        self.max_op_id = max(self.max_op_id, op.op_id)
        self._unpark_all()

    def _unpark_all(self) -> None:
        for s in list(self.parked):
            s.unpark()

    def unregister(self, op: RingOp) -> None:
        self.ops.pop(op.op_id, None)

    def fail_ops(self, reason: str) -> None:
        for op in list(self.ops.values()):
            op.fail(reason)

    def expire_parked(self, older_than_s: float) -> None:
        """Fail and close ring streams parked on an unknown operation for ``older_than_s``.
        (Connections without a valid hello close by themselves at ``handshake_timeout_s``.)"""
        now = time.monotonic()
        for s in list(self.parked):
            if now - s.parked_since > older_than_s:
                s.fail(f"frame for unknown operation parked for {older_than_s:.0f}s")

    async def close(self) -> None:
        """Stop listening, close every connection and cancel and await every serving task
        (each ends at its next await; a task still running after ``handshake_timeout_s`` is
        logged and left)."""
        self.closing = True
        self.close_tx()
        for s in list(self.conns):
            s.close("", "closing", quiet=True)
        tasks = list(self.serving)
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.config.handshake_timeout_s)
            if pending:
                log.warning("%d state-serving tasks did not end on close", len(pending))
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
