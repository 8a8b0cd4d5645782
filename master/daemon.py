"""The master daemon: an asyncio server around :class:`~pccl.master.state.MasterState`.

One connection per peer; frames are decoded with bounded lengths and dispatched through a
``{message type: handler}`` table. A malformed, oversized, unknown or out-of-state message, a
missed handshake deadline, or heartbeat silence closes *that* connection with a reason code
(``M2P_KICK``) and never disturbs the others. Runs entirely on one event loop (uvloop where
available); never touches tensor bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import math
import resource
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, cast

from pccl.master.kv import DEFAULT_MAX_BYTES as DEFAULT_KV_MAX_BYTES
from pccl.master.kv import KvStore
from pccl.master.state import MasterState
from pccl.master.status import StatusServer
from pccl.master.store import RunStore

from pccl import messages as m
from pccl.auth import check_token, new_nonce, prove, verify
from pccl.config import Config
from pccl.errors import ProtocolError
from pccl.frame import PRE_AUTH_MAX_BODY, PROTOCOL_VERSION, FrameDecoder, MsgType, max_body
from pccl.messages import KickCode
from pccl.tls import TLSConfig

log = logging.getLogger("pccl.master")

__all__ = ["ConnState", "Master"]

MAX_WRITE_BACKLOG = 8 << 20  # a peer that does not read its control link this much is dropped
#: Connections that have not proven the token yet, in all and from one address. Beyond either
#: cap a new connection is closed at once (counted in ``/metrics``); peers reconnect with backoff.
MAX_UNAUTHENTICATED = 256
MAX_UNAUTHENTICATED_PER_ADDRESS = 16
#: The heartbeat round yields to the loop after this many connections, so ten thousand peers
#: never stall it for more than a few milliseconds at a time.
HEARTBEAT_SLICE = 256
#: The loop-lag probe's period: how late it wakes is the longest step the loop just ran.
LAG_PROBE_S = 0.025
LAG_WINDOW_S = 10.0
#: A loop stall longer than this is logged (a warning, at most once per :data:`LAG_WINDOW_S`).
STALL_WARN_S = 0.25


class ConnState(enum.Enum):
    """States of one control connection."""

    PRE_AUTH = "pre_auth"  #: challenge sent; only a small ``P2M_HELLO`` is accepted
    AUTHENTICATED = "authenticated"  #: hello verified: a registered peer, every P2M type
    CLOSED = "closed"  #: kicked or gone; every byte from here on is ignored


#: Message types accepted in each state; anything else closes the connection (and only it).
ACCEPTS: dict[ConnState, frozenset[MsgType]] = {
    ConnState.PRE_AUTH: frozenset({MsgType.P2M_HELLO}),
    ConnState.AUTHENTICATED: frozenset(
        {
            MsgType.P2M_HEARTBEAT,
            MsgType.P2M_UPDATE_TOPOLOGY,
            MsgType.P2M_TOPOLOGY_READY,
            MsgType.P2M_COLLECTIVE_INITIATE,
            MsgType.P2M_COLLECTIVE_COMPLETE,
            MsgType.P2M_COLLECTIVE_WITHDRAW,
            MsgType.P2M_VERDICT_QUERY,
            MsgType.P2M_OUTCOMES,
            MsgType.P2M_GATE_ARRIVE,
            MsgType.P2M_LEAVE,
            MsgType.P2M_SYNC_SHARED_STATE,
            MsgType.P2M_SYNC_DONE,
            MsgType.P2M_KV_SET,
            MsgType.P2M_KV_GET,
            MsgType.P2M_OPTIMIZE_TOPOLOGY,
            MsgType.P2M_PROBE_REPORT,
        }
    ),
    ConnState.CLOSED: frozenset(),
}


def _body_limit(state: ConnState, mtype: MsgType) -> int:
    return PRE_AUTH_MAX_BODY if state is ConnState.PRE_AUTH else max_body(mtype)


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (a master holds one fd per peer, plus
    the unauthenticated connections it is still judging). Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, e)
    if soft < 4096:
        log.warning("open-file limit is %d: the master serves fewer peers than that", soft)
    return soft


class PeakMeter:
    """The largest value noted: over the lifetime, and over the last :data:`LAG_WINDOW_S`
    seconds (one maximum per second kept)."""

    def __init__(self) -> None:
        self.max = 0.0
        self._buckets: deque[tuple[int, float]] = deque(maxlen=int(LAG_WINDOW_S))

    def note(self, value: float, now: float) -> None:
        if value > self.max:
            self.max = value
        second = int(now)
        b = self._buckets
        if b and b[-1][0] == second:
            if value > b[-1][1]:
                b[-1] = (second, value)
        else:
            b.append((second, value))

    def recent(self, now: float) -> float:
        horizon = now - LAG_WINDOW_S
        return max((v for t, v in self._buckets if t >= horizon), default=0.0)


class _Conn(asyncio.Protocol):
    """One control connection: :class:`ConnState` and its transitions (see ``ACCEPTS``)."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.transport: asyncio.Transport | None = None
        self.state = ConnState.PRE_AUTH
        self.decoder = FrameDecoder(gate=self._gate)
        self.peer_id = 0
        self.opened = time.monotonic()
        self.last_seen = self.opened
        self.addr = "?"
        self.host = "?"
        self.kick_reason = ""

    @property
    def closed(self) -> bool:
        return self.state is ConnState.CLOSED

    def _to(self, state: ConnState) -> None:
        """The one place the connection changes state (keeps the daemon's counts true)."""
        old, self.state = self.state, state
        if old is ConnState.PRE_AUTH and state is not ConnState.PRE_AUTH:
            self.master.unauthenticated_left(self)

    # ---------------------------------------------------------------- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.host = str(peer[0]) if peer else "?"
        self.addr = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.master.admit_unauthenticated(self)
        self.nonce = new_nonce()
        self.transport.write(m.Challenge(self.nonce, self.master.token is not None).encode())

    def _gate(self, mtype: MsgType, length: int) -> None:
        if mtype not in ACCEPTS[self.state]:
            raise ProtocolError(f"{mtype.name} is not accepted in state {self.state.value}")
        if length > _body_limit(self.state, mtype):
            raise ProtocolError(f"{mtype.name} of {length} bytes in state {self.state.value}")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        t0 = time.monotonic()
        try:
            for mtype, body in self.decoder.feed(data):
                self.last_seen = time.monotonic()
                if mtype is MsgType.P2M_HEARTBEAT and self.state is ConnState.AUTHENTICATED:
                    continue  # the bulk of all traffic: its body (a counter) is not read
                HANDLERS[mtype](self, m.decode(mtype, body))
                if self.closed:
                    return
        except ProtocolError as e:
            self.kick(KickCode.PROTOCOL, str(e))
        finally:
            now = time.monotonic()
            self.master.steps.note(now - t0, now)

    def connection_lost(self, exc: Exception | None) -> None:
        t0 = time.monotonic()
        try:
            self._lost(exc)
        finally:
            now = time.monotonic()
            self.master.steps.note(now - t0, now)

    def _lost(self, exc: Exception | None) -> None:
        if self.state is ConnState.PRE_AUTH:
            self._to(ConnState.CLOSED)
        self.state = ConnState.CLOSED
        self.master.conns.discard(self)
        if self.peer_id:
            if self.master.by_id.get(self.peer_id) is self:
                self.master.by_id.pop(self.peer_id, None)
            reason = self.kick_reason or (f"connection lost: {exc}" if exc else "disconnected")
            self.master.state.remove(self.peer_id, reason)
            self.master.kv.peer_gone(self.peer_id)
            self.peer_id = 0

    # ---------------------------------------------------------------- output

    def send(self, msg: m.Message) -> None:
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return
        try:
            frame = msg.encode()
        except (ValueError, OverflowError) as e:  # beyond a wire bound: never escape a handler
            self.kick(KickCode.TOO_LARGE, f"{msg.TYPE.name} for this peer exceeds its bound: {e}")
            return
        self.send_frame(frame)

    def send_frame(self, frame: bytes) -> None:
        """Write an encoded frame (one encoding can serve many peers)."""
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return
        t.write(frame)
        if t.get_write_buffer_size() > MAX_WRITE_BACKLOG:
            self.kick(KickCode.BACKLOG, "control link not drained")

    def kick(self, code: KickCode, reason: str) -> None:
        """Close this connection with a reason; the peer's state is removed when it is gone."""
        if self.closed:
            return
        if self.state is ConnState.PRE_AUTH:
            log.info("closing unauthenticated %s: %s: %s", self.addr, code.name, reason)
        else:
            log.warning("closing %s (peer %d): %s: %s", self.addr, self.peer_id, code.name, reason)
        self.send(m.Kick(int(code), reason[:500]))
        self.kick_reason = f"{code.name.lower()}: {reason}"
        self._to(ConnState.CLOSED)
        assert self.transport is not None
        self.transport.close()
        if self.peer_id:  # remove on the next tick: keeps state transitions non-reentrant
            pid, why = self.peer_id, self.kick_reason
            if self.master.by_id.get(pid) is self:
                self.master.by_id.pop(pid, None)
            self.peer_id = 0
            asyncio.get_running_loop().call_soon(self.master.state.remove, pid, why)

    # ---------------------------------------------------------------- handlers

    def on_hello(self, msg: m.Message) -> None:
        assert isinstance(msg, m.Hello)
        if msg.version != PROTOCOL_VERSION:
            why = f"protocol {msg.version} unsupported (master speaks {PROTOCOL_VERSION})"
            self.kick(KickCode.VERSION, why)
            return
        if msg.p2p_port == 0:
            raise ProtocolError("hello without a p2p port")
        token = self.master.token
        if not verify(token, msg.auth, b"pccl-hello", self.nonce, msg.nonce):
            self.kick(KickCode.AUTH, "authentication failed: wrong or missing token proof")
            return
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        host = msg.advertise_host or (peer[0] if peer else "")
        cfg = self.master.config
        state = self.master.state
        resume = msg.resume_peer_id
        pid = state.new_peer_id(resume)
        if pid == 0:
            self.kick(KickCode.FULL, "no peer id left")
            return
        self._to(ConnState.AUTHENTICATED)
        self.peer_id = pid
        self.master.by_id[pid] = self
        # Welcome must precede the topology message the registration itself may trigger.
        at_once = state.admits_at_once(pid, msg.peer_group)
        proof = prove(token, b"pccl-welcome", msg.nonce, self.nonce)
        self.send(m.Welcome(pid, cfg.heartbeat_interval_s, cfg.heartbeat_timeout_s, at_once, proof))
        state.register(pid, msg.peer_group, host, msg.p2p_port, resumed=pid == resume)

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

    def on_collective_withdraw(self, msg: m.Message) -> None:
        assert isinstance(msg, m.CollectiveWithdraw)
        self.master.state.on_withdraw(self.peer_id, msg)

    def on_verdict_query(self, msg: m.Message) -> None:
        assert isinstance(msg, m.VerdictQuery)
        self.master.state.on_verdict_query(self.peer_id, msg)

    def on_outcomes(self, msg: m.Message) -> None:
        assert isinstance(msg, m.Outcomes)
        self.master.state.on_outcomes(self.peer_id, msg)

    def on_optimize_topology(self, msg: m.Message) -> None:
        assert isinstance(msg, m.OptimizeTopology)
        self.master.state.optimizer.on_vote(self.peer_id, msg)

    def on_probe_report(self, msg: m.Message) -> None:
        assert isinstance(msg, m.ProbeReport)
        self.master.state.optimizer.on_report(self.peer_id, msg)

    def on_gate_arrive(self, msg: m.Message) -> None:
        assert isinstance(msg, m.GateArrive)
        self.master.state.on_gate_arrive(self.peer_id, msg)

    def on_sync_shared_state(self, msg: m.Message) -> None:
        assert isinstance(msg, m.SyncSharedState)
        self.master.state.on_sync_vote(self.peer_id, msg)

    def on_sync_done(self, msg: m.Message) -> None:
        assert isinstance(msg, m.SyncDone)
        self.master.state.on_sync_done(self.peer_id, msg)

    def on_kv_set(self, msg: m.Message) -> None:
        assert isinstance(msg, m.KvSet)
        rec = self.master.state.peers.get(self.peer_id)
        if rec is not None:
            self.master.kv.on_set(self.peer_id, rec.group, msg)

    def on_kv_get(self, msg: m.Message) -> None:
        assert isinstance(msg, m.KvGet)
        rec = self.master.state.peers.get(self.peer_id)
        if rec is not None:
            self.master.kv.on_get(self.peer_id, rec.group, msg, time.monotonic())

    def on_leave(self, msg: m.Message) -> None:
        assert isinstance(msg, m.Leave)
        self.kick(KickCode.LEAVE, msg.reason or "peer left")


#: The handler of each peer message (one table for all connections: a per-connection table of
#: bound methods would be 13 more objects per peer for the collector to walk).
HANDLERS: dict[MsgType, Callable[[_Conn, Any], None]] = {
    MsgType.P2M_HELLO: _Conn.on_hello,
    MsgType.P2M_HEARTBEAT: _Conn.on_heartbeat,
    MsgType.P2M_UPDATE_TOPOLOGY: _Conn.on_update_topology,
    MsgType.P2M_TOPOLOGY_READY: _Conn.on_topology_ready,
    MsgType.P2M_COLLECTIVE_INITIATE: _Conn.on_collective_initiate,
    MsgType.P2M_COLLECTIVE_COMPLETE: _Conn.on_collective_complete,
    MsgType.P2M_COLLECTIVE_WITHDRAW: _Conn.on_collective_withdraw,
    MsgType.P2M_VERDICT_QUERY: _Conn.on_verdict_query,
    MsgType.P2M_OUTCOMES: _Conn.on_outcomes,
    MsgType.P2M_GATE_ARRIVE: _Conn.on_gate_arrive,
    MsgType.P2M_LEAVE: _Conn.on_leave,
    MsgType.P2M_SYNC_SHARED_STATE: _Conn.on_sync_shared_state,
    MsgType.P2M_SYNC_DONE: _Conn.on_sync_done,
    MsgType.P2M_KV_SET: _Conn.on_kv_set,
    MsgType.P2M_KV_GET: _Conn.on_kv_get,
    MsgType.P2M_OPTIMIZE_TOPOLOGY: _Conn.on_optimize_topology,
    MsgType.P2M_PROBE_REPORT: _Conn.on_probe_report,
}


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
        state_file: where the master persists issued peer ids and the last membership
            (:mod:`pccl.master.store`); with it, a restarted master never reissues an id and
            never lets newcomers start a second run beside the one that existed. None: no
            persistence (a restart is then only safe if the incumbents return first).
        status_token: a read-only credential for the status endpoint (at least 16 bytes).
            With it or ``token`` set, the endpoint requires ``Authorization: Bearer`` with
            either; with neither it is open.
        kv_max_bytes: bound on the key-value channel's entries together
            (:mod:`pccl.master.kv`); with ``state_file`` its values are kept durable in
            ``state_file + ".kv"``.
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
        state_file: str | None = None,
        status_token: bytes | str | None = None,
        kv_max_bytes: int = DEFAULT_KV_MAX_BYTES,
    ):
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {port!r}")
        self.host = host
        self._port = port
        self.config = config or Config.from_env()
        self.token = check_token(token)
        self.status_token = check_token(status_token)
        self.tls = tls
        self.conns: set[_Conn] = set()
        self.by_id: dict[int, _Conn] = {}
        #: unauthenticated connections, oldest first (dicts keep insertion order)
        self.unauthenticated: dict[_Conn, None] = {}
        self._unauth_by_host: Counter[str] = Counter()
        #: connections closed before authenticating, by reason (``/metrics``)
        self.unauthenticated_closed: Counter[str] = Counter()
        self.store = RunStore(state_file) if state_file is not None else None
        #: the key-value channel (durable next to the state file, if any)
        self.kv = KvStore(
            self._send, f"{state_file}.kv" if state_file is not None else None, kv_max_bytes
        )
        self.state = MasterState(
            self._send,
            self._kick,
            self.config,
            self.store,
            call_later=lambda delay, fn: asyncio.get_running_loop().call_later(delay, fn),
        )
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._lag_probe: asyncio.Task[None] | None = None
        #: How late the loop ran a timer (a stall, or a backlog of ready work), seconds.
        self.lag = PeakMeter()
        #: The longest single step the master ran: one connection's input, one heartbeat
        #: slice, one tick, one render slice (seconds).
        self.steps = PeakMeter()
        self._stall_warned = -math.inf
        self._gc_started = 0.0
        self.gc_max_s = 0.0  # the longest collector pass seen
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

    def _kick(self, pid: int, code: KickCode, reason: str) -> None:
        conn = self.by_id.get(pid)
        if conn is not None:
            conn.kick(code, reason)
        else:
            self.state.remove(pid, f"{code.name.lower()}: {reason}")

    def admit_unauthenticated(self, conn: _Conn) -> None:
        """Count a new connection as unauthenticated, evicting the oldest unauthenticated one
        (of its address first) when a cap is reached: a flood of strangers displaces its own
        older connections, while a peer's hello, which follows its connect within a round
        trip, gets through."""
        self.conns.add(conn)
        while self._unauth_by_host[conn.host] >= MAX_UNAUTHENTICATED_PER_ADDRESS:
            old = next(c for c in self.unauthenticated if c.host == conn.host)
            self._evict(old, "per_address_cap")
        while len(self.unauthenticated) >= MAX_UNAUTHENTICATED:
            self._evict(next(iter(self.unauthenticated)), "total_cap")
        self.unauthenticated[conn] = None
        self._unauth_by_host[conn.host] += 1

    def _evict(self, conn: _Conn, why: str) -> None:
        self.unauthenticated_closed[why] += 1
        conn.kick(KickCode.BUSY, f"too many unauthenticated connections ({why})")
        if conn in self.unauthenticated:  # kick() already moved it out; be sure
            self.unauthenticated_left(conn)

    def unauthenticated_left(self, conn: _Conn) -> None:
        """``conn`` authenticated or closed: it no longer counts against the caps."""
        if self.unauthenticated.pop(conn, 0) is None:
            self._unauth_by_host[conn.host] -= 1
            if self._unauth_by_host[conn.host] <= 0:
                del self._unauth_by_host[conn.host]

    async def start(self) -> None:
        """Bind and start serving. Raises ``OSError`` if the address cannot be bound."""
        loop = asyncio.get_running_loop()
        raise_fd_limit()
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
        self._lag_probe = asyncio.create_task(self._probe_lag(), name="pccl-master-lag")
        gc.callbacks.append(self._on_gc)
        log.info("pccl master listening on %s:%d", self.host, self._port)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        """Time the collector's passes: a long one stalls the loop like any long step."""
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        self.gc_max_s = max(self.gc_max_s, took)
        if took > STALL_WARN_S:
            log.warning(
                "garbage collection (generation %d) took %.3fs", info.get("generation", -1), took
            )

    async def _tick(self) -> None:
        cfg = self.config
        seq = 0
        while True:
            slept = time.monotonic()
            await asyncio.sleep(cfg.heartbeat_interval_s)
            now = time.monotonic()
            late = now - slept - cfg.heartbeat_interval_s  # oversleep only, not our own work
            if late > cfg.heartbeat_interval_s:
                self._forgive_stall(late, now)
            seq += 1
            frame = m.MasterHeartbeat(seq).encode()  # one frame for every peer
            try:
                self.state.tick(now)
                self.kv.tick(now)
            except Exception:  # a bug must not stop heartbeats and deadlines: log, go on
                log.exception("master tick failed")
            t = time.monotonic()
            self.steps.note(t - now, t)
            for conn in list(self.unauthenticated):  # oldest first
                if now - conn.opened <= cfg.handshake_timeout_s:
                    break
                self.unauthenticated_closed["handshake_timeout"] += 1
                conn.kick(KickCode.HANDSHAKE_TIMEOUT, "no hello before the deadline")
                self.unauthenticated_left(conn)
            conns = list(self.by_id.values())
            for i in range(0, len(conns), HEARTBEAT_SLICE):
                if i:
                    t = time.monotonic()
                    self.steps.note(t - now, t)
                    await asyncio.sleep(0)  # let the peers' messages in between slices
                    now = time.monotonic()
                for conn in conns[i : i + HEARTBEAT_SLICE]:
                    if conn.closed:
                        continue
                    if now - conn.last_seen > cfg.heartbeat_timeout_s:
                        conn.kick(
                            KickCode.HEARTBEAT_TIMEOUT,
                            f"silent for {now - conn.last_seen:.1f}s "
                            f"(limit {cfg.heartbeat_timeout_s}s)",
                        )
                    else:
                        conn.send_frame(frame)
            t = time.monotonic()
            self.steps.note(t - now, t)

    def _forgive_stall(self, late: float, now: float) -> None:
        """This process did not run for ``late`` seconds (stopped, starved, or the whole VM
        frozen): peers' heartbeats of that time may still sit unread in their sockets, and the
        loop runs this timer before it reads them. Silence during our own stall is not counted
        against anyone: every peer's last-seen moves forward by it (never past now), so a peer
        that was really silent before the stall is still evicted on time."""
        log.warning(
            "master loop stalled %.1fs: not counting it against the peers' heartbeats", late
        )
        for conn in self.by_id.values():
            conn.last_seen = min(now, conn.last_seen + late)

    async def _probe_lag(self) -> None:
        """Wake every :data:`LAG_PROBE_S`; the delay beyond it is the longest step the loop
        ran meanwhile (``/status`` and ``/metrics`` report it: a stalled master shows here)."""
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_PROBE_S)
            now = time.monotonic()
            lag = max(0.0, now - t0 - LAG_PROBE_S)
            self.lag.note(lag, now)
            if lag > STALL_WARN_S and now - self._stall_warned > LAG_WINDOW_S:
                self._stall_warned = now
                log.warning(
                    "event loop ran %.3fs late (longest step in the last %.0fs: %.4fs; "
                    "%d connections, %d peers)",
                    lag,
                    LAG_WINDOW_S,
                    self.steps.recent(now),
                    len(self.conns),
                    len(self.state.peers),
                )

    async def stop(self) -> None:
        """Stop accepting, close every connection (peers see ConnectionLost)."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self._lag_probe is not None:
            self._lag_probe.cancel()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        if self.status_server is not None:
            await self.status_server.stop()
        if self._server is not None:
            self._server.close()
        await self.kv.flush()  # what was set is on disk and acknowledged before the kicks
        for conn in list(self.conns):
            conn.kick(KickCode.SHUTDOWN, "master shutting down")
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
