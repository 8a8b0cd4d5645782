"""The peer's session with the master: one state machine over one control link at a time.

:class:`SessionState` names where the session is (connecting, handshake, pending admission,
accepted, reconnecting, closed) and :data:`TRANSITIONS` says where it may go; every change
goes through :meth:`MasterSession._to`. Each TCP (or TLS) link to the master has its own
:class:`LinkState` (awaiting the challenge, awaiting the welcome, open, closed) and
:data:`LINK_ACCEPTS` says which master messages each link state takes: a message out of place
is a protocol error that closes that link (and, before admission, fails ``connect()``).

The session owns what membership means to a peer: heartbeats both ways, the topology (epoch,
ring, rank) and the wiring of the p2p ring it announces, ``update_topology()`` votes, and the
reconnection under the same peer id when the master restarts or the link breaks after
admission. Collective and shared-state messages are handed to the runners that subscribed
to them (:meth:`MasterSession.subscribe`); link loss is announced to them
(:meth:`MasterSession.on_link_lost`) so no wait outlives its link.

Runs on the peer's event loop only. Every wait has a deadline (``connect(timeout)``,
``connect_timeout_s`` per attempt, ``reconnect_timeout_s`` overall, ``heartbeat_timeout_s`` of
master silence, the caller's ``update_topology`` timeout).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import cast

from pccl.peer.p2p import P2PNode

from pccl import messages as m
from pccl.auth import new_nonce, prove, verify
from pccl.config import Config
from pccl.errors import (
    AuthenticationFailed,
    ConnectionLost,
    MasterUnreachable,
    PCCLError,
    ProtocolError,
    TopologyUpdateFailed,
)
from pccl.frame import PROTOCOL_VERSION, FrameDecoder, MsgType
from pccl.messages import KickCode

log = logging.getLogger("pccl.peer")

__all__ = ["LINK_ACCEPTS", "TRANSITIONS", "LinkState", "MasterSession", "SessionState"]


class SessionState(enum.Enum):
    """Where the peer's session with the master is."""

    IDLE = "idle"  #: created; ``connect()`` not called yet
    CONNECTING = "connecting"  #: opening the first TCP/TLS link to the master
    HANDSHAKE = "handshake"  #: link open: answering the challenge, awaiting the welcome
    PENDING = "pending"  #: welcomed with an id; waiting for the running peers to admit us
    ACCEPTED = "accepted"  #: in the run: collectives and syncs may be issued
    RECONNECTING = "reconnecting"  #: link lost after admission; resuming under our id
    CLOSED = "closed"  #: terminal: closed by the application, kicked, or gave up


TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.IDLE: frozenset({SessionState.CONNECTING, SessionState.CLOSED}),
    SessionState.CONNECTING: frozenset({SessionState.HANDSHAKE, SessionState.CLOSED}),
    SessionState.HANDSHAKE: frozenset({SessionState.PENDING, SessionState.CLOSED}),
    SessionState.PENDING: frozenset({SessionState.ACCEPTED, SessionState.CLOSED}),
    SessionState.ACCEPTED: frozenset({SessionState.RECONNECTING, SessionState.CLOSED}),
    SessionState.RECONNECTING: frozenset({SessionState.ACCEPTED, SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


class LinkState(enum.Enum):
    """Where one control link (one TCP/TLS connection to the master) is."""

    AWAIT_CHALLENGE = "await_challenge"  #: connected; the master speaks first
    AWAIT_WELCOME = "await_welcome"  #: hello sent
    OPEN = "open"  #: welcomed: session traffic
    CLOSED = "closed"  #: lost, replaced or aborted: whatever it still delivers is ignored


_SESSION_TYPES = frozenset(
    {
        MsgType.M2P_HEARTBEAT,
        MsgType.M2P_TOPOLOGY,
        MsgType.M2P_TOPOLOGY_DONE,
        MsgType.M2P_COLLECTIVE_COMMENCE,
        MsgType.M2P_COLLECTIVE_DONE,
        MsgType.M2P_VERDICT,
        MsgType.M2P_GATE_DONE,
        MsgType.M2P_GATE_QUORUM,
        MsgType.M2P_SYNC_PLAN,
        MsgType.M2P_SYNC_COMPLETE,
        MsgType.M2P_KV_REPLY,
        MsgType.M2P_PROBE_PLAN,
        MsgType.M2P_KICK,
    }
)

#: Master messages each link state accepts; anything else closes the link as a protocol error.
LINK_ACCEPTS: dict[LinkState, frozenset[MsgType]] = {
    LinkState.AWAIT_CHALLENGE: frozenset({MsgType.M2P_CHALLENGE, MsgType.M2P_KICK}),
    LinkState.AWAIT_WELCOME: frozenset({MsgType.M2P_WELCOME, MsgType.M2P_KICK}),
    # The topology may follow the welcome in the same read, before the handshake coroutine
    # resumes: the link is OPEN from the welcome on.
    LinkState.OPEN: _SESSION_TYPES,
    LinkState.CLOSED: frozenset(),
}

Handler = Callable[[m.Message], None]


class _MasterLink(asyncio.Protocol):
    """One control connection to the master."""

    def __init__(self, session: MasterSession) -> None:
        self.session = session
        self.decoder = FrameDecoder(gate=self._gate)
        self.transport: asyncio.Transport | None = None
        self.state = LinkState.AWAIT_CHALLENGE
        self.challenge: asyncio.Future[m.Challenge] = asyncio.get_running_loop().create_future()
        self.welcome: asyncio.Future[m.Welcome] = asyncio.get_running_loop().create_future()

    def _gate(self, mtype: MsgType, length: int) -> None:
        if mtype not in LINK_ACCEPTS[self.state]:
            raise ProtocolError(f"{mtype.name} from the master in link state {self.state.value}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.session._adopt(self)  # the newest link is the current one from now on

    def data_received(self, data: bytes) -> None:
        if self.state is LinkState.CLOSED or self is not self.session.link:
            return  # a replaced link: whatever it still delivers is stale
        try:
            for mtype, body in self.decoder.feed(data):
                self.session._on_message(self, mtype, m.decode(mtype, body))
                if self.state is LinkState.CLOSED:
                    return
        except ProtocolError as e:
            self.fail(ConnectionLost(f"protocol error from the master: {e}"))

    def fail(self, err: PCCLError) -> None:
        """Close this link for ``err`` (fails its handshake futures; the session decides)."""
        if self.state is LinkState.CLOSED:
            return
        self.state = LinkState.CLOSED
        for f in (self.challenge, self.welcome):
            if not f.done():
                f.set_exception(err)
                f.exception()  # retrieved: the handshake may already have given up
        if self.transport is not None:
            self.transport.abort()
        self.session._link_lost(self, err)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionLost(f"connection to the master lost ({exc or 'closed'})"))

    def send(self, msg: m.Message) -> None:
        t = self.transport
        if self.state is not LinkState.CLOSED and t is not None and not t.is_closing():
            t.write(msg.encode())


class MasterSession:
    """See the module docstring.

    Args:
        host, port: the master.
        peer_group: the group whose ring this peer joins.
        node: the p2p node (listener and ring streams) this session wires.
        config: deadlines.
        token: shared secret proven to the master (None: no authentication).
        client_ssl: TLS context for the master link (None: plain TCP).
        advertise_host, p2p_port, advertise_port: how other peers reach ``node``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        peer_group: int,
        node: P2PNode,
        config: Config,
        token: bytes | None,
        client_ssl: ssl.SSLContext | None,
        *,
        advertise_host: str = "",
        p2p_port: int = 0,
        advertise_port: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.peer_group = peer_group
        self.node = node
        self.config = config
        self.token = token
        self.client_ssl = client_ssl
        self.advertise_host = advertise_host
        self.p2p_port = p2p_port
        self.advertise_port = advertise_port
        self.state = SessionState.IDLE
        self.error: PCCLError | None = None
        self.link: _MasterLink | None = None
        self.peer_id = 0
        self.world_size = 0
        self.group_world_size = 0
        self.num_groups = 0
        self.epoch = 0  # the epoch whose ring is live
        self.ring: list[tuple[int, str, int]] = []
        self.rank = -1
        self._announced: m.Topology | None = None
        self._wire_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._handlers: dict[MsgType, Handler] = {
            MsgType.M2P_HEARTBEAT: lambda msg: None,
            MsgType.M2P_TOPOLOGY: self._on_topology,
            MsgType.M2P_TOPOLOGY_DONE: self._on_topology_done,
            MsgType.M2P_KICK: self._on_kick,
        }
        self._lost_listeners: list[Callable[[PCCLError], None]] = []
        self._resume_listeners: list[Callable[[], None]] = []
        self._changed = asyncio.Event()
        self._vote_refused: str | None = None  # reason of a refused update_topology vote
        self.last_done: m.TopologyDone | None = None  # the latest M2P_TOPOLOGY_DONE
        # The epoch this peer last saw at the end of update_topology() (or its admission):
        # an epoch formed since without its vote re-admitted it after a reconnection.
        self._voted_epoch = 0
        self._last_master = time.monotonic()
        self._tcp_up = False  # a TCP/TLS connection was established at least once
        self._handshake_seen = False  # ... and the master's challenge arrived on it

    # ------------------------------------------------------------------ plumbing

    def _to(self, state: SessionState) -> None:
        """The one place the session changes state."""
        if state is self.state:
            return
        assert state in TRANSITIONS[self.state], f"session {self.state} -> {state}"
        log.debug("peer %d session: %s -> %s", self.peer_id, self.state.value, state.value)
        self.state = state
        self._notify()

    def subscribe(self, handlers: dict[MsgType, Handler]) -> None:
        """Route these master messages to a runner (collectives, shared state)."""
        self._handlers.update(handlers)

    def on_link_lost(self, listener: Callable[[PCCLError], None]) -> None:
        """Call ``listener(error)`` whenever the current link is lost (or the session ends)."""
        self._lost_listeners.append(listener)

    def on_resumed(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` when a reconnection was welcomed, before re-admission (the place
        to tell the master what it may have forgotten)."""
        self._resume_listeners.append(listener)

    def send(self, msg: m.Message) -> None:
        """Send on the current link once it is welcomed; dropped otherwise (a reconnection's
        link says nothing but its hello before the welcome: the master closes a connection that
        does; the caller's deadline and the link-lost notification cover the drop)."""
        link = self.link
        if link is not None and link.state is LinkState.OPEN:
            link.send(msg)

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def wait_for(self, pred: Callable[[], bool]) -> None:
        """Wait until ``pred()`` (re-checked on every session change) or the session fails.

        Raises:
            PCCLError: the session ended (its error) before ``pred()`` held.
        """
        while not pred():
            if self.error is not None:
                raise self.error
            await self._changed.wait()

    @property
    def usable(self) -> bool:
        return self.state in (SessionState.ACCEPTED, SessionState.RECONNECTING)

    @property
    def reconnecting(self) -> bool:
        return self.state is SessionState.RECONNECTING

    @property
    def ring_reformed(self) -> bool:
        """The ring was re-formed without this peer's ``update_topology()`` (a reconnection
        re-admitted it): until the caller acknowledges with ``update_topology()`` (which then
        returns at once), new collectives are refused, so that no step of the caller spans
        two rings without it knowing."""
        return self.state is SessionState.ACCEPTED and self.epoch != self._voted_epoch

    def check_usable(self) -> None:
        """Raise the session's error, or RuntimeError before ``connect()`` completed."""
        if self.error is not None:
            raise self.error
        if not self.usable:
            raise RuntimeError("call connect() first")

    async def await_link(self) -> None:
        """Wait (bounded by ``reconnect_timeout_s``) while a reconnection is in progress."""
        task = self._reconnect_task
        if task is not None:  # wait, not shield: a cancelled (closed) reconnection is an error
            await asyncio.wait([task])
        if self.error is not None:
            raise self.error

    # ------------------------------------------------------------------ connecting

    async def connect(self, timeout: float) -> None:
        """Register with the master and wait until the running peers admit us.

        Raises:
            MasterUnreachable: the master could not be reached, or never started the pccl
                handshake on the TCP connection it accepted (TLS on one side only?).
            AuthenticationFailed: the token was refused, or the master could not prove it.
            TopologyUpdateFailed: not admitted before the deadline.
            ConnectionLost: the master dropped us (the reason is in the message).
        """
        self._to(SessionState.CONNECTING)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        silent = MasterUnreachable(
            f"{self.host}:{self.port} accepted the TCP connection but never started the pccl "
            "handshake (TLS enabled on only one side?)",
            phase="connect",
        )
        try:
            async with asyncio.timeout_at(deadline):
                welcome = await self._open_link(resume_id=0)
                self.peer_id = welcome.peer_id
                self.node.my_id = self.peer_id
                self._to(SessionState.PENDING)
                self._heartbeat_task = loop.create_task(self._heartbeat())
                await self.wait_for(lambda: self.state is SessionState.ACCEPTED)
        except TimeoutError:
            tcp_only = self._tcp_up and not self._handshake_seen
            had_link = self.link is not None
            await self.close("admission timeout")
            if tcp_only:
                raise silent from None
            if not had_link:
                raise MasterUnreachable(
                    f"cannot reach the master at {self.host}:{self.port} within {timeout}s",
                    phase="connect",
                ) from None
            raise TopologyUpdateFailed(
                f"not admitted within {timeout}s: running peers admit newcomers when they call "
                "update_topology()",
                phase="connect",
            ) from None
        except PCCLError as e:
            tcp_only = self._tcp_up and not self._handshake_seen
            await self.close("connect failed")
            if tcp_only and isinstance(e, ConnectionLost):
                raise silent from e  # closed on us before any pccl byte: TLS mismatch
            raise

    async def _open_link(self, resume_id: int) -> m.Welcome:
        """Connect, answer the master's challenge, say hello; return its welcome.

        Raises:
            MasterUnreachable: TCP connect failed.
            AuthenticationFailed, ConnectionLost: refused by the master.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                transport, link = await loop.create_connection(
                    lambda: _MasterLink(self), self.host, self.port, ssl=self.client_ssl
                )
        except (OSError, TimeoutError) as e:
            hint = ""
            if isinstance(e, ssl.SSLError):
                hint = " (TLS handshake failed: is TLS enabled on the master?)"
            raise MasterUnreachable(
                f"cannot reach the master at {self.host}:{self.port}: {e}{hint}", phase="connect"
            ) from None
        assert isinstance(link, _MasterLink)
        if link is not self.link:  # lost and replaced before we got here
            raise ConnectionLost("master link lost during connect", phase="connect")
        self._tcp_up = True
        if self.state is SessionState.CONNECTING:
            self._to(SessionState.HANDSHAKE)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.node.server is None:
            await self.node.start(transport.get_extra_info("sockname")[0], self.p2p_port)
        my_nonce = new_nonce()
        challenge = await link.challenge
        if challenge.auth_required and self.token is None:
            raise AuthenticationFailed(
                "the master requires a token (auth_token=...)", phase="connect"
            )
        link.state = LinkState.AWAIT_WELCOME
        link.send(
            m.Hello(
                PROTOCOL_VERSION,
                self.peer_group,
                self.advertise_port or self.node.port,
                self.advertise_host,
                resume_id,
                my_nonce,
                prove(self.token, b"pccl-hello", challenge.nonce, my_nonce),
            )
        )
        welcome = await link.welcome
        if not verify(self.token, welcome.auth, b"pccl-welcome", my_nonce, challenge.nonce) or (
            self.token is not None and not welcome.auth
        ):
            raise AuthenticationFailed(
                "the master could not prove the shared token", phase="connect"
            )
        return welcome

    def _adopt(self, link: _MasterLink) -> None:
        old = self.link
        if old is not None and old is not link and old.state is not LinkState.CLOSED:
            old.state = LinkState.CLOSED
            if old.transport is not None:
                old.transport.abort()
        self.link = link
        self._last_master = time.monotonic()

    # ------------------------------------------------------------------ link loss

    def _link_lost(self, link: _MasterLink, err: PCCLError) -> None:
        """A link closed: terminal before admission or after a kick; else reconnect."""
        if link is not self.link or self.state is SessionState.CLOSED:
            return
        for listener in self._lost_listeners:
            listener(err)
        if self.state in (SessionState.CONNECTING, SessionState.HANDSHAKE, SessionState.PENDING):
            self._fail(err)
            return
        if self.state is SessionState.RECONNECTING:
            self._notify()  # an attempt failed: the reconnect loop retries
            return
        log.warning("peer %d: %s; reconnecting", self.peer_id, err)
        self._to(SessionState.RECONNECTING)
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    def _fail(self, err: PCCLError, *, quiet: bool = False) -> None:
        """End the session with ``err`` (kick, authentication failure, gave up, closed)."""
        if self.state is SessionState.CLOSED:
            return
        if self.error is None:
            self.error = err
        if not quiet:
            log.warning("peer %d: %s", self.peer_id, err)
        self._to(SessionState.CLOSED)
        link = self.link
        if link is not None:
            for f in (link.challenge, link.welcome):
                if not f.done():
                    f.set_exception(err)
                    f.exception()
        for listener in self._lost_listeners:
            listener(err)

    async def _reconnect(self) -> None:
        """Reconnect with exponential backoff and rejoin under our id."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        deadline = loop.time() + cfg.reconnect_timeout_s
        delay = 0.1
        last: Exception | None = None
        while loop.time() < deadline and self.state is SessionState.RECONNECTING:
            # One attempt: connect + handshake + admission, bounded well below the whole budget.
            attempt = cfg.connect_timeout_s + 2 * cfg.restart_grace_s
            try:
                async with asyncio.timeout(max(0.1, min(attempt, deadline - loop.time()))):
                    old_id = self.peer_id
                    welcome = await self._open_link(resume_id=old_id)
                    link = self.link
                    for listener in self._resume_listeners:
                        listener()
                    if welcome.peer_id != old_id:  # the welcome already set the new id
                        log.warning("peer %d rejoined as %d (id taken)", old_id, welcome.peer_id)
                    before = self.epoch

                    def rejoined(b: int = before, lk: _MasterLink | None = link) -> bool:
                        return (
                            self.epoch > b
                            or self.link is not lk
                            or lk is None
                            or (lk.state is LinkState.CLOSED)
                        )

                    await self.wait_for(rejoined)
                    if link is None or link.state is LinkState.CLOSED or self.link is not link:
                        raise ConnectionLost("master link dropped while rejoining")
                log.info(
                    "peer %d reconnected to the master (world %d)", self.peer_id, self.world_size
                )
                self._reconnect_task = None
                self._to(SessionState.ACCEPTED)
                return
            except AuthenticationFailed as e:
                self._reconnect_task = None
                self._fail(e)
                return
            except (PCCLError, OSError, TimeoutError) as e:
                if self.state is not SessionState.RECONNECTING:
                    break
                last = e
                link = self.link
                if link is not None and link.state is not LinkState.CLOSED:
                    link.state = LinkState.CLOSED
                    if link.transport is not None:
                        link.transport.abort()
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, 1.0)  # stays below the master's restart grace
        self._reconnect_task = None
        if self.state is SessionState.RECONNECTING:
            self._fail(
                ConnectionLost(
                    f"master unreachable for {cfg.reconnect_timeout_s}s ({last})",
                    phase="reconnect",
                )
            )

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_interval_s
        limit = self.config.heartbeat_timeout_s
        seq = 0
        woke = time.monotonic()
        while self.state is not SessionState.CLOSED:
            link = self.link
            now = time.monotonic()
            frozen = now - woke > limit  # this process was stopped, not the master silent
            woke = now
            if link is not None and link.state is LinkState.OPEN:
                seq += 1
                link.send(m.Heartbeat(seq))  # also while rejoining: the new master counts them
                if frozen:
                    await asyncio.sleep(0)  # let the socket deliver what arrived meanwhile
                elif now - self._last_master > limit:
                    link.fail(ConnectionLost(f"master silent for more than {limit}s"))
            self.node.expire_parked(self.config.progress_timeout_s)
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ master messages

    def _on_message(self, link: _MasterLink, mtype: MsgType, msg: m.Message) -> None:
        self._last_master = time.monotonic()
        if mtype == MsgType.M2P_CHALLENGE:
            assert isinstance(msg, m.Challenge)
            self._handshake_seen = True
            link.state = LinkState.AWAIT_WELCOME  # until the hello is sent nothing else fits
            link.challenge.set_result(msg)
            return
        if mtype == MsgType.M2P_WELCOME:
            assert isinstance(msg, m.Welcome)
            link.state = LinkState.OPEN
            self.peer_id = self.node.my_id = msg.peer_id  # the topology may follow at once
            link.welcome.set_result(msg)
            return
        handler = self._handlers.get(mtype)
        if handler is None:
            raise ProtocolError(f"unexpected {mtype.name} from the master")
        handler(msg)

    def _on_kick(self, msg: m.Message) -> None:
        assert isinstance(msg, m.Kick)
        code = KickCode.parse(msg.code)
        err: PCCLError
        if code is KickCode.SHUTDOWN and self.link is not None:  # maybe a restart: reconnect
            self.link.fail(ConnectionLost(f"master shutting down: {msg.reason}"))
            return
        if code is KickCode.AUTH:
            err = AuthenticationFailed(f"dropped by the master: {code.name}: {msg.reason}")
        else:
            err = ConnectionLost(f"dropped by the master: {code.name.lower()}: {msg.reason}")
        self._fail(err)
        if self.link is not None:
            self.link.state = LinkState.CLOSED

    def _on_topology(self, msg: m.Message) -> None:
        assert isinstance(msg, m.Topology)
        ids = [p[0] for p in msg.ring]
        if self.peer_id not in ids:
            raise ProtocolError(f"topology for epoch {msg.epoch} does not include us")
        self._announced = msg
        r = ids.index(self.peer_id)
        W = len(ids)
        self.node.announce(msg.epoch, self.peer_id, ids[(r - 1) % W] if W > 1 else 0)
        if self._wire_task is not None:
            self._wire_task.cancel()
        self._wire_task = asyncio.get_running_loop().create_task(self._wire(msg, r))

    async def _wire(self, topo: m.Topology, r: int) -> None:
        W = len(topo.ring)
        if W == 1:
            self.node.close_tx()
            self.send(m.TopologyReady(topo.epoch, True))
            return
        nid, host, port = topo.ring[(r + 1) % W]
        try:
            await self.node.connect_next(nid, host, port, topo.epoch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # report; the master evicts the unreachable peer and re-announces
            log.warning("cannot reach peer %d at %s:%d: %r", nid, host, port, e)
            why = f"{type(e).__name__}: {e}"[:500]
            self.send(m.TopologyReady(topo.epoch, False, [nid], why))
            return
        self.send(m.TopologyReady(topo.epoch, True))

    def _on_topology_done(self, msg: m.Message) -> None:
        assert isinstance(msg, m.TopologyDone)
        self.last_done = msg
        if not msg.ok:  # a refused or timed-out update_topology() vote
            self._vote_refused = msg.reason or "update_topology refused by the master"
            self._notify()
            return
        t = self._announced
        if t is None or t.epoch != msg.epoch:
            return
        self.epoch = t.epoch
        self.world_size = t.world_size
        self.group_world_size = t.group_world_size
        self.num_groups = t.num_groups
        self.ring = list(t.ring)
        self.rank = [p[0] for p in t.ring].index(self.peer_id)
        if self.state is SessionState.PENDING:
            self._voted_epoch = self.epoch
            self._to(SessionState.ACCEPTED)
        self._notify()

    # ------------------------------------------------------------------ topology votes

    async def update_topology(self, timeout: float) -> None:
        """Vote to admit pending peers and re-wire; return once the new epoch is live.

        Raises:
            TopologyUpdateFailed: the master refused the vote or another peer did not vote
                within ``vote_timeout_s`` (retry), or no new epoch within ``timeout``.
            ConnectionLost: the session ended.
        """
        self.check_usable()
        try:
            async with asyncio.timeout(timeout):
                if self.reconnecting:
                    await self.await_link()  # a restarted master re-forms the ring itself
                    self._voted_epoch = self.epoch
                    return
                if self.epoch != self._voted_epoch:
                    # Re-admitted after a reconnection since the last call: that epoch was
                    # formed by the others' votes (this call's counterpart); the ring is new.
                    self._voted_epoch = self.epoch
                    return
                start = self.epoch
                link = self.link
                self._vote_refused = None
                self.send(m.UpdateTopology(start))

                def settled() -> bool:
                    return (
                        self.epoch > start
                        or self._vote_refused is not None
                        or self.link is not link
                        or self.state is not SessionState.ACCEPTED
                    )

                await self.wait_for(settled)
                if self.epoch > start:
                    self._voted_epoch = self.epoch
                    return
                if self._vote_refused is not None:
                    why, self._vote_refused = self._vote_refused, None
                    raise TopologyUpdateFailed(why, phase="update_topology")
                await self.await_link()  # the link was replaced: the rejoin re-formed the ring
                self._voted_epoch = self.epoch
        except TimeoutError:
            raise TopologyUpdateFailed(
                "topology update did not complete in time (does every peer call "
                "update_topology()?)",
                phase="update_topology",
            ) from None

    # ------------------------------------------------------------------ closing

    def leave(self, reason: str) -> None:
        """Tell the master we leave (best effort; the link closes in :meth:`close`)."""
        if self.error is None and self.link is not None:
            self.link.send(m.Leave(reason))

    async def close(self, why: str) -> None:
        """End the session and release its tasks and link."""
        self._fail(ConnectionLost(f"communicator {why}"), quiet=True)
        for t in (self._heartbeat_task, self._reconnect_task, self._wire_task):
            if t is not None:
                t.cancel()
        link = self.link
        if link is not None:
            link.state = LinkState.CLOSED
            if link.transport is not None:
                link.transport.close()
