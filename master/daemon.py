"""The master daemon: an asyncio server around :class:`~pccl.master.state.MasterState`.

One connection per peer; frames are decoded with bounded lengths and dispatched through a
``{message type: handler}`` table. A malformed, oversized, unknown or out-of-state message, a
missed handshake deadline, or heartbeat silence closes *that* connection with a reason code
(``M2P_KICK``) and never disturbs the others. Runs entirely on one event loop (uvloop where
available); never touches tensor bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

from pccl.master.state import MasterState, Phase
from pccl.master.status import StatusServer

from pccl import messages as m
from pccl.auth import check_token, new_nonce, prove, verify
from pccl.config import Config
from pccl.errors import ProtocolError
from pccl.frame import FrameDecoder, MsgType
from pccl.tls import TLSConfig

log = logging.getLogger("pccl.master")

__all__ = ["Master"]

PROTOCOL_VERSION = 1
MAX_WRITE_BACKLOG = 8 << 20  # a peer that does not read its control link this much is dropped


class _Conn(asyncio.Protocol):
    """One control connection; unregistered until its ``P2M_HELLO``."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.peer_id = 0
        self.opened = time.monotonic()
        self.last_seen = self.opened
        self.closed = False
        self.addr = "?"
        self.handlers: dict[MsgType, Callable[[m.Message], None]] = {
            MsgType.P2M_HELLO: self.on_hello,
            MsgType.P2M_HEARTBEAT: self.on_heartbeat,
            MsgType.P2M_UPDATE_TOPOLOGY: self.on_update_topology,
            MsgType.P2M_TOPOLOGY_READY: self.on_topology_ready,
            MsgType.P2M_COLLECTIVE_INITIATE: self.on_collective_initiate,
            MsgType.P2M_COLLECTIVE_COMPLETE: self.on_collective_complete,
            MsgType.P2M_LEAVE: self.on_leave,
            MsgType.P2M_SYNC_SHARED_STATE: self.on_sync_shared_state,
            MsgType.P2M_SYNC_DONE: self.on_sync_done,
        }

    # ---------------------------------------------------------------- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.addr = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.master.conns.add(self)
        self.nonce = new_nonce()
        self.transport.write(m.Challenge(self.nonce, self.master.token is not None).encode())

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            for mtype, body in self.decoder.feed(data):
                handler = self.handlers.get(mtype)  # checked before decoding anything
                if handler is None:
                    raise ProtocolError(f"{mtype.name} is not accepted by the master")
                if self.peer_id == 0 and mtype != MsgType.P2M_HELLO:
                    raise ProtocolError(f"{mtype.name} before hello")
                msg = m.decode(mtype, body)
                self.last_seen = time.monotonic()
                handler(msg)
                if self.closed:
                    return
        except ProtocolError as e:
            self.kick("protocol", str(e))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.master.conns.discard(self)
        if self.peer_id:
            self.master.by_id.pop(self.peer_id, None)
            reason = self.kick_reason or (f"connection lost: {exc}" if exc else "disconnected")
            self.master.state.remove(self.peer_id, reason)

    kick_reason = ""

    # ---------------------------------------------------------------- output

    def send(self, msg: m.Message) -> None:
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return
        try:
            frame = msg.encode()
        except ValueError as e:  # beyond the wire bound: never let it escape a handler
            self.kick("too_large", f"{msg.TYPE.name} for this peer exceeds the wire bound: {e}")
            return
        t.write(frame)
        if t.get_write_buffer_size() > MAX_WRITE_BACKLOG:
            self.kick("backlog", "control link not drained")

    def kick(self, code: str, reason: str) -> None:
        """Close this connection with a reason; the peer's state is removed when it is gone."""
        if self.closed:
            return
        log.warning("closing %s (peer %d): %s: %s", self.addr, self.peer_id, code, reason)
        self.send(m.Kick(code, reason[:500]))
        self.kick_reason = f"{code}: {reason}"
        self.closed = True
        assert self.transport is not None
        self.transport.close()
        if self.peer_id:  # remove on the next tick: keeps state transitions non-reentrant
            pid, why = self.peer_id, self.kick_reason
            self.master.by_id.pop(pid, None)
            self.peer_id = 0
            asyncio.get_running_loop().call_soon(self.master.state.remove, pid, why)

    # ---------------------------------------------------------------- handlers

    def on_hello(self, msg: m.Message) -> None:
        assert isinstance(msg, m.Hello)
        if self.peer_id:
            raise ProtocolError("hello sent twice")
        if msg.version != PROTOCOL_VERSION:
            self.kick("version", f"protocol {msg.version} unsupported (master speaks 1)")
            return
        if msg.p2p_port == 0:
            raise ProtocolError("hello without a p2p port")
        token = self.master.token
        if not verify(token, msg.auth, b"pccl-hello", self.nonce, msg.nonce):
            self.kick("auth", "authentication failed: wrong or missing token proof")
            return
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        host = msg.advertise_host or (peer[0] if peer else "")
        cfg = self.master.config
        state = self.master.state
        resume = msg.resume_peer_id
        pid = state.new_peer_id(resume if resume and resume not in state.peers else 0)
        self.peer_id = pid
        self.master.by_id[pid] = self
        # Welcome must precede the topology message the registration itself may trigger.
        at_once = not state.accepted and state.phase is Phase.IDLE
        proof = prove(token, b"pccl-welcome", msg.nonce, self.nonce)
        self.send(m.Welcome(pid, cfg.heartbeat_interval_s, cfg.heartbeat_timeout_s, at_once, proof))
        state.register(pid, msg.peer_group, host, msg.p2p_port, resumed=bool(resume))

    def on_heartbeat(self, msg: m.Message) -> None:
        pass  # last_seen already updated

    def on_update_topology(self, msg: m.Message) -> None:
        self.master.state.on_update_topology(self.peer_id)

    def on_topology_ready(self, msg: m.Message) -> None:
        assert isinstance(msg, m.TopologyReady)
        self.master.state.on_topology_ready(self.peer_id, msg)

    def on_collective_initiate(self, msg: m.Message) -> None:
        assert isinstance(msg, m.CollectiveInitiate)
        self.master.state.on_initiate(self.peer_id, msg)

    def on_collective_complete(self, msg: m.Message) -> None:
        assert isinstance(msg, m.CollectiveComplete)
        self.master.state.on_complete(self.peer_id, msg)

    def on_sync_shared_state(self, msg: m.Message) -> None:
        assert isinstance(msg, m.SyncSharedState)
        self.master.state.on_sync_vote(self.peer_id, msg)

    def on_sync_done(self, msg: m.Message) -> None:
        assert isinstance(msg, m.SyncDone)
        self.master.state.on_sync_done(self.peer_id, msg)

    def on_leave(self, msg: m.Message) -> None:
        assert isinstance(msg, m.Leave)
        self.kick("leave", msg.reason or "peer left")


class Master:
    """The pccl master daemon.

    Usage::

        async with Master(host="127.0.0.1", port=0) as master:
            print(master.port)
            await master.serve_forever()

    Args:
        host: address to listen on.
        port: TCP port; 0 picks a free one (read it back from :attr:`port`).
        config: timeouts; defaults to ``Config.from_env()``.
        token: shared secret peers must prove (HMAC challenge-response); None disables auth.
        tls: serve TLS (peers must present a certificate signed by the cluster CA).
        status_port: serve ``GET /status`` and ``/metrics`` over HTTP on this port (0: any
            free port, read it back from ``status_server.port``); None disables it.
        status_host: address of the status endpoint; defaults to ``host``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        config: Config | None = None,
        token: bytes | str | None = None,
        tls: TLSConfig | None = None,
        status_port: int | None = None,
        status_host: str | None = None,
    ):
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {port!r}")
        self.host = host
        self._port = port
        self.config = config or Config.from_env()
        self.token = check_token(token)
        self.tls = tls
        self.conns: set[_Conn] = set()
        self.by_id: dict[int, _Conn] = {}
        self.state = MasterState(self._send, self._kick, self.config.restart_grace_s)
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.status_server: StatusServer | None = None
        if status_port is not None:
            self.status_server = StatusServer(self, status_host or host, status_port)

    @property
    def port(self) -> int:
        return self._port

    def _send(self, pid: int, msg: m.Message) -> None:
        conn = self.by_id.get(pid)
        if conn is not None:
            conn.send(msg)

    def _kick(self, pid: int, code: str, reason: str) -> None:
        conn = self.by_id.get(pid)
        if conn is not None:
            conn.kick(code, reason)
        else:
            self.state.remove(pid, f"{code}: {reason}")

    async def start(self) -> None:
        """Bind and start serving. Raises ``OSError`` if the address cannot be bound."""
        loop = asyncio.get_running_loop()
        ssl_ctx = self.tls.server_context(require_client_cert=True) if self.tls else None
        self._server = await loop.create_server(
            lambda: _Conn(self),
            self.host,
            self._port,
            reuse_address=True,
            backlog=1024,
            ssl=ssl_ctx,
            ssl_handshake_timeout=self.config.handshake_timeout_s if ssl_ctx else None,
        )
        sock = self._server.sockets[0]
        self._port = sock.getsockname()[1]
        if self.status_server is not None:
            try:
                await self.status_server.start()
            except OSError:
                self._server.close()
                raise
        self._ticker = asyncio.create_task(self._tick(), name="pccl-master-heartbeat")
        log.info("pccl master listening on %s:%d", self.host, self._port)

    async def _tick(self) -> None:
        cfg = self.config
        seq = 0
        while True:
            await asyncio.sleep(cfg.heartbeat_interval_s)
            now = time.monotonic()
            seq += 1
            hb = m.MasterHeartbeat(seq)
            self.state.poll()
            for pid in self.state.stalled_epoch_members(now, cfg.connect_timeout_s * 2):
                self._kick(pid, "p2p_timeout", "did not establish its p2p links in time")
            for conn in list(self.conns):
                if conn.closed:
                    continue
                if conn.peer_id == 0:
                    if now - conn.opened > cfg.handshake_timeout_s:
                        conn.kick("handshake_timeout", "no hello before the deadline")
                elif now - conn.last_seen > cfg.heartbeat_timeout_s:
                    conn.kick(
                        "heartbeat_timeout",
                        f"silent for {now - conn.last_seen:.1f}s "
                        f"(limit {cfg.heartbeat_timeout_s}s)",
                    )
                else:
                    conn.send(hb)

    async def stop(self) -> None:
        """Stop accepting, close every connection (peers see ConnectionLost)."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self.status_server is not None:
            await self.status_server.stop()
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn.kick("shutdown", "master shutting down")
        if self._server is not None:
            await self._server.wait_closed()
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Wait until :meth:`stop` is called."""
        await self._stopped.wait()

    async def __aenter__(self) -> Master:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
