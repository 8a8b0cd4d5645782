"""The asyncio peer client: ``pccl.aio.Communicator``.

Owns the master link (one TCP connection: hello, heartbeats, votes, verdicts), the p2p node
(listener + streams, :mod:`pccl.peer.p2p`) and the ring operations (:mod:`pccl.peer.ring`).
Every wait has a deadline: connect/admission (``timeout``), topology updates
(``topology_timeout``), collectives (``collective_timeout_s`` overall and ``progress_timeout_s``
without a byte). Failures surface as :mod:`pccl.errors` exceptions; the caller's ``send`` buffer
is never left modified by a failed operation.

All methods must be awaited on the loop that called :meth:`connect`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from pccl.peer.p2p import P2PNode
from pccl.peer.ring import BufferPool, RingOp
from pccl.peer.state_sync import fetch_entries

from pccl import messages as m
from pccl.auth import check_token, new_nonce, prove, verify
from pccl.config import Config
from pccl.errors import (
    AuthenticationFailed,
    CollectiveAborted,
    ConnectionLost,
    MasterUnreachable,
    PCCLError,
    PendingOperations,
    ProtocolError,
    SharedStateError,
    TooFewPeers,
    TopologyUpdateFailed,
)
from pccl.frame import FrameDecoder, MsgType
from pccl.shared_state import SharedState
from pccl.tls import TLSConfig
from pccl.types import (
    DType,
    Quantization,
    ReduceInfo,
    ReduceOp,
    SyncInfo,
    SyncStrategy,
    storage_view,
)

log = logging.getLogger("pccl.peer")

__all__ = ["Communicator", "ReduceHandle", "parse_address"]

PROTOCOL_VERSION = 1
MAX_TAG = 0xFFFF_FFFF


def parse_address(addr: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[v6]:port"`` for IPv6).

    Raises:
        ValueError: malformed address or port out of range.
    """
    if not isinstance(addr, str):
        raise TypeError(f"master address must be a str 'host:port', got {type(addr).__name__}")
    host, sep, port_s = addr.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ValueError(f"master address must look like 'host:port', got {addr!r}")
    port = int(port_s)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {addr!r}")
    return host.strip("[]"), port


class _MasterLink(asyncio.Protocol):
    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.comm._adopt_link(self)  # the newest link is the current one from now on

    def data_received(self, data: bytes) -> None:
        if self is not self.comm._link:
            return  # a replaced link: whatever it still delivers is stale
        try:
            for mtype, body in self.decoder.feed(data):
                self.comm._on_master(mtype, m.decode(mtype, body))
        except ProtocolError as e:
            self.comm._lost(ConnectionLost(f"protocol error from the master: {e}"))
            assert self.transport is not None
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.comm._link_lost(
            self, ConnectionLost(f"connection to the master lost ({exc or 'closed'})")
        )

    def send(self, msg: m.Message) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(msg.encode())


@dataclass
class _TagState:
    commence: asyncio.Future[m.CollectiveCommence]
    verdict: asyncio.Future[m.CollectiveDone]
    op_id: int = 0
    ring: RingOp | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ReduceHandle:
    """Handle of an all-reduce started with :meth:`Communicator.all_reduce_async`."""

    def __init__(self, task: asyncio.Task[ReduceInfo], tag: int) -> None:
        self._task = task
        self.tag = tag

    def done(self) -> bool:
        return self._task.done()

    async def wait(self) -> ReduceInfo:
        """Wait for the result; raises what the operation raised."""
        return await asyncio.shield(self._task)


def _prepare(send: Any, recv: Any) -> tuple[np.ndarray, np.ndarray, DType, bool]:
    """Validate buffers; return (send storage, recv storage, dtype, in_place)."""
    sv, dt = _storage(send, "send")
    if recv is None or recv is send:
        rv, rdt = sv, dt
    else:
        rv, rdt = _storage(recv, "recv")
    if rdt != dt:
        raise TypeError(f"send is {dt.name} but recv is {rdt.name}")
    if rv.size != sv.size:
        raise ValueError(f"send has {sv.size} elements but recv has {rv.size}")
    if not rv.flags.writeable:
        raise ValueError("recv is read-only")
    in_place = rv is sv or np.shares_memory(sv, rv)
    if in_place and sv.ctypes.data != rv.ctypes.data:
        raise ValueError("send and recv overlap without being the same buffer")
    return sv, rv, dt, in_place


def _storage(x: Any, name: str) -> tuple[np.ndarray, DType]:
    if isinstance(x, np.ndarray):
        return storage_view(x)
    if type(x).__module__.startswith("torch"):
        from pccl.bindings.torch import as_numpy  # the only torch-aware code

        arr, forced = as_numpy(x, name)
        if forced is not None:
            return arr.reshape(-1), forced
        return storage_view(arr)
    raise TypeError(f"{name} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")


class Communicator:
    """Asyncio peer client. Same API as :class:`pccl.Communicator`, as coroutines.

    Args:
        master: ``"host:port"`` of the master.
        peer_group: group whose ring this peer joins (collectives and shared state are per group).
        streams: TCP connections to the ring successor; one operation is striped across all.
            A successor at a loopback address gets ``config.local_streams`` (default 1).
        config: timeouts and tunables (defaults: ``Config.from_env()``).
        advertise_host: address other peers should dial (default: what the master sees).
        p2p_port: port for the p2p listener (0: any free port).
        advertise_port: port other peers should dial (default: the listener's; set it when a
            proxy or NAT forwards to the listener).
        auth_token: shared secret (>= 16 bytes) proven to the master and to peers by HMAC
            challenge-response; it never crosses the wire. None: no authentication.
        tls: encrypt the master link and p2p links (:class:`pccl.tls.TLSConfig`).
    """

    def __init__(
        self,
        master: str,
        peer_group: int = 0,
        streams: int = 4,
        *,
        config: Config | None = None,
        advertise_host: str = "",
        p2p_port: int = 0,
        advertise_port: int = 0,
        auth_token: bytes | str | None = None,
        tls: TLSConfig | None = None,
    ) -> None:
        self.master_host, self.master_port = parse_address(master)
        if not isinstance(peer_group, int) or not 0 <= peer_group <= 0xFFFF_FFFF:
            raise ValueError(f"peer_group must be an int in [0, 2**32), got {peer_group!r}")
        if not isinstance(streams, int) or not 1 <= streams <= 64:
            raise ValueError(f"streams must be an int in [1, 64], got {streams!r}")
        self.peer_group = peer_group
        self.streams = streams
        self.config = config or Config.from_env()
        self.advertise_host = advertise_host
        self.p2p_port = p2p_port
        for name, v in (("p2p_port", p2p_port), ("advertise_port", advertise_port)):
            if not isinstance(v, int) or not 0 <= v <= 65535:
                raise ValueError(f"{name} must be within 0..65535, got {v!r}")
        self.advertise_port = advertise_port
        self.peer_id = 0
        self.world_size = 0
        self.group_world_size = 0
        self.num_groups = 0
        self.epoch = 0
        self.ring: list[tuple[int, str, int]] = []
        self.rank = -1
        self._link: _MasterLink | None = None
        self.token = check_token(auth_token)
        if tls is not None and not isinstance(tls, TLSConfig):
            raise TypeError("tls must be a pccl.tls.TLSConfig")
        self.tls = tls
        self._client_ssl = tls.client_context() if tls else None
        self._node = P2PNode(self.config, streams, self.token, tls)
        self._pool = BufferPool()
        self._tags: dict[int, _TagState] = {}
        self._cond: asyncio.Condition | None = None
        self._welcome: asyncio.Future[m.Welcome] | None = None
        self._challenge: asyncio.Future[m.Challenge] | None = None
        self._tcp_up = False  # connect(): the master's TCP (or TLS) connection was established
        self._handshake_seen = False  # ... and its challenge arrived
        self._announced: m.Topology | None = None
        self._done_epoch = 0
        self._wire_task: asyncio.Task[None] | None = None
        self._error: PCCLError | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_master = time.monotonic()
        self._closed = False
        self._connected = False
        self._sync: tuple[asyncio.Future[m.SyncPlan], asyncio.Future[m.SyncComplete]] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._link_gen = 0
        self._link_dead = False

    # ================================================================ connection

    async def connect(self, timeout: float = 30.0) -> None:
        """Register with the master and wait until the running peers admit us.

        Args:
            timeout: deadline for reaching the master *and* being admitted (running peers admit
                newcomers at their next ``update_topology()``; a lone first peer at once).

        Raises:
            MasterUnreachable: the master could not be reached.
            AuthenticationFailed: the token was refused, or the master could not prove it.
            TopologyUpdateFailed: not admitted before the deadline.
            ConnectionLost: the master dropped us (the reason is in the message).
        """
        if self._connected or self._link is not None:
            raise RuntimeError("connect() was already called")
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        loop = asyncio.get_running_loop()
        self._cond = asyncio.Condition()
        deadline = loop.time() + timeout
        silent = MasterUnreachable(
            f"{self.master_host}:{self.master_port} accepted the TCP connection but never "
            "started the pccl handshake (TLS enabled on only one side?)",
            phase="connect",
        )
        try:
            async with asyncio.timeout_at(deadline):
                welcome = await self._open_link(resume_id=0)
                self.peer_id = welcome.peer_id
                self._node.my_id = self.peer_id
                self._tasks.append(asyncio.create_task(self._heartbeat()))
                await self._wait(lambda: self._done_epoch > 0)
        except TimeoutError:
            tcp_only = self._tcp_up and not self._handshake_seen
            await self._shutdown("admission timeout")
            if tcp_only:
                raise silent from None
            if self._link is None:
                raise MasterUnreachable(
                    f"cannot reach the master at {self.master_host}:{self.master_port} "
                    f"within {timeout}s",
                    phase="connect",
                ) from None
            raise TopologyUpdateFailed(
                f"not admitted within {timeout}s: running peers admit newcomers when they call "
                "update_topology()",
                phase="connect",
            ) from None
        except PCCLError as e:
            tcp_only = self._tcp_up and not self._handshake_seen
            await self._shutdown("connect failed")
            if tcp_only and isinstance(e, ConnectionLost):
                raise silent from e  # closed on us before any pccl byte: TLS mismatch
            raise
        self._connected = True
        log.info(
            "peer %d admitted: world %d, group %d of size %d",
            self.peer_id,
            self.world_size,
            self.peer_group,
            self.group_world_size,
        )

    async def _open_link(self, resume_id: int) -> m.Welcome:
        """Connect to the master, answer its challenge, say hello; return its welcome.

        Raises:
            MasterUnreachable: TCP connect failed.
            AuthenticationFailed, ConnectionLost: refused by the master.
        """
        loop = asyncio.get_running_loop()
        self._welcome = loop.create_future()
        self._challenge = loop.create_future()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                transport, link = await loop.create_connection(
                    lambda: _MasterLink(self),
                    self.master_host,
                    self.master_port,
                    ssl=self._client_ssl,
                )
        except (OSError, TimeoutError) as e:
            tls_failed = isinstance(e, ssl.SSLError)
            hint = " (TLS handshake failed: is TLS enabled on the master?)" if tls_failed else ""
            raise MasterUnreachable(
                f"cannot reach the master at {self.master_host}:{self.master_port}: {e}{hint}",
                phase="connect",
            ) from None
        assert isinstance(link, _MasterLink) and link is self._link
        self._tcp_up = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._node.server is None:
            await self._node.start(transport.get_extra_info("sockname")[0], self.p2p_port)
        my_nonce = new_nonce()
        challenge = await self._challenge
        if challenge.auth_required and self.token is None:
            raise AuthenticationFailed(
                "the master requires a token (auth_token=...)", phase="connect"
            )
        link.send(
            m.Hello(
                PROTOCOL_VERSION,
                self.peer_group,
                self.advertise_port or self._node.port,
                self.advertise_host,
                resume_id,
                my_nonce,
                prove(self.token, b"pccl-hello", challenge.nonce, my_nonce),
            )
        )
        welcome = await self._welcome
        if not verify(self.token, welcome.auth, b"pccl-welcome", my_nonce, challenge.nonce) or (
            self.token is not None and not welcome.auth
        ):
            raise AuthenticationFailed(
                "the master could not prove the shared token", phase="connect"
            )
        return welcome

    def _adopt_link(self, link: _MasterLink) -> None:
        self._link = link
        self._link_gen += 1
        self._link_dead = False
        self._last_master = time.monotonic()

    def _link_lost(self, link: _MasterLink, err: ConnectionLost) -> None:
        """The master link closed: terminal before admission or after a kick; else reconnect."""
        if link is not self._link or self._error is not None or self._closed:
            return
        if self._reconnect_task is not None and self._link_dead:
            return  # the loss that started this reconnection, reported again by its transport
        self._link_dead = True
        if not self._connected:
            self._lost(err)
            return
        if self._reconnect_task is not None:  # an attempt failed: the reconnect loop retries
            for f in (self._challenge, self._welcome):
                if f is not None and not f.done():
                    f.set_exception(err)
                    f.exception()
            self._notify()
            return
        log.warning("peer %d: %s; reconnecting", self.peer_id, err)
        self._fail_inflight(f"master connection lost ({err}); reconnecting")
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    def _fail_inflight(self, reason: str) -> None:
        self._node.fail_ops(reason)
        for tag, st in self._tags.items():
            for f in (st.commence, st.verdict):
                if not f.done():
                    f.set_exception(CollectiveAborted(reason, tag=tag))
                    f.exception()
        if self._sync is not None:
            for f2 in self._sync:
                if not f2.done():
                    f2.set_exception(SharedStateError(reason, phase="sync"))
                    f2.exception()
        self._notify()

    async def _reconnect(self) -> None:
        """Reconnect with exponential backoff and rejoin under our id (master restart)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.reconnect_timeout_s
        delay = 0.1
        last: Exception | None = None
        while loop.time() < deadline and not self._closed and self._error is None:
            old = self._link
            # One attempt: connect + handshake + admission, bounded well below the whole budget.
            attempt = self.config.connect_timeout_s + 2 * self.config.restart_grace_s
            try:
                async with asyncio.timeout(max(0.1, min(attempt, deadline - loop.time()))):
                    welcome = await self._open_link(resume_id=self.peer_id)
                    if welcome.peer_id != self.peer_id:
                        log.warning(
                            "peer %d rejoined as %d (id was taken)", self.peer_id, welcome.peer_id
                        )
                        self.peer_id = self._node.my_id = welcome.peer_id
                    before = self._done_epoch

                    def rejoined(b: int = before) -> bool:
                        return self._done_epoch > b or self._link_dead

                    await self._wait(rejoined)
                    if self._link_dead:
                        raise ConnectionLost("master link dropped while rejoining")
                log.info(
                    "peer %d reconnected to the master (world %d)", self.peer_id, self.world_size
                )
                self._reconnect_task = None
                self._notify()
                return
            except AuthenticationFailed as e:
                self._lost(e)
                return
            except (PCCLError, OSError, TimeoutError) as e:
                last = e
                if self._link is not old and self._link is not None:
                    tr = self._link.transport
                    if tr is not None:
                        tr.abort()
                self._link = old if self._link is None else self._link
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, 1.0)  # stays below the master's restart grace
        self._reconnect_task = None
        self._lost(
            ConnectionLost(
                f"master unreachable for {self.config.reconnect_timeout_s}s ({last})",
                phase="reconnect",
            )
        )

    async def _await_link(self) -> None:
        """Wait (bounded) while a reconnection is in progress."""
        task = self._reconnect_task
        if task is not None:
            await asyncio.shield(task)
        if self._error is not None:
            raise self._error

    async def _wait(self, pred: Callable[[], bool]) -> None:
        """Wait until ``pred()`` (re-checked on every state change) or the link fails."""
        assert self._cond is not None
        async with self._cond:
            await self._cond.wait_for(lambda: self._error is not None or pred())
        if self._error is not None and not pred():
            raise self._error

    def _notify(self) -> None:
        cond = self._cond
        if cond is None:
            return

        async def poke() -> None:
            async with cond:
                cond.notify_all()

        asyncio.get_running_loop().create_task(poke())

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_interval_s
        limit = self.config.heartbeat_timeout_s
        seq = 0
        woke = time.monotonic()
        while self._error is None:
            link = self._link
            now = time.monotonic()
            frozen = now - woke > limit  # this process was stopped, not the master silent
            woke = now
            if link is not None and not self._link_dead:
                seq += 1
                link.send(m.Heartbeat(seq))  # also while rejoining: the new master counts them
                if frozen:
                    await asyncio.sleep(0)  # let the socket deliver what arrived meanwhile
                elif now - self._last_master > limit:
                    self._link_lost(link, ConnectionLost(f"master silent for more than {limit}s"))
                    if link.transport is not None:
                        link.transport.abort()
            self._node.expire_parked(self.config.progress_timeout_s)
            await asyncio.sleep(interval)

    # ================================================================ master messages

    def _on_master(self, mtype: MsgType, msg: m.Message) -> None:
        self._last_master = time.monotonic()
        handler = self._handlers.get(mtype)
        if handler is None:
            raise ProtocolError(f"unexpected {mtype.name} from the master")
        handler(self, msg)

    def _on_challenge(self, msg: m.Message) -> None:
        self._handshake_seen = True
        assert isinstance(msg, m.Challenge)
        if self._challenge is None or self._challenge.done():
            raise ProtocolError("unexpected challenge from the master")
        self._challenge.set_result(msg)

    def _on_welcome(self, msg: m.Message) -> None:
        assert isinstance(msg, m.Welcome)
        self.peer_id = msg.peer_id  # the topology may follow in the same read
        self._node.my_id = msg.peer_id
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_result(msg)

    def _on_heartbeat(self, msg: m.Message) -> None:
        pass

    def _on_topology(self, msg: m.Message) -> None:
        assert isinstance(msg, m.Topology)
        ring = msg.ring
        ids = [p[0] for p in ring]
        if self.peer_id not in ids:
            raise ProtocolError(f"topology for epoch {msg.epoch} does not include us")
        self._announced = msg
        r = ids.index(self.peer_id)
        W = len(ring)
        self._node.announce(msg.epoch, self.peer_id, ids[(r - 1) % W] if W > 1 else 0)
        if self._wire_task is not None:
            self._wire_task.cancel()
        self._wire_task = asyncio.get_running_loop().create_task(self._wire(msg, r))

    async def _wire(self, topo: m.Topology, r: int) -> None:
        W = len(topo.ring)
        assert self._link is not None
        if W == 1:
            self._node.close_tx()
            self._link.send(m.TopologyReady(topo.epoch, True))
            return
        nid, host, port = topo.ring[(r + 1) % W]
        try:
            await self._node.connect_next(nid, host, port, topo.epoch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # report; the master evicts the unreachable peer and re-announces
            log.warning("cannot reach peer %d at %s:%d: %r", nid, host, port, e)
            why = f"{type(e).__name__}: {e}"[:500]
            self._link.send(m.TopologyReady(topo.epoch, False, [nid], why))
            return
        self._link.send(m.TopologyReady(topo.epoch, True))

    def _on_topology_done(self, msg: m.Message) -> None:
        assert isinstance(msg, m.TopologyDone)
        t = self._announced
        if t is None or t.epoch != msg.epoch:
            return
        self.epoch = t.epoch
        self.world_size = t.world_size
        self.group_world_size = t.group_world_size
        self.num_groups = t.num_groups
        self.ring = list(t.ring)
        self.rank = [p[0] for p in t.ring].index(self.peer_id)
        self._done_epoch = t.epoch
        self._notify()

    def _on_commence(self, msg: m.Message) -> None:
        assert isinstance(msg, m.CollectiveCommence)
        st = self._tags.get(msg.tag)
        if st is None or st.commence.done():
            raise ProtocolError(f"commence for tag {msg.tag} we did not initiate")
        st.op_id = msg.op_id
        st.commence.set_result(msg)

    def _on_collective_done(self, msg: m.Message) -> None:
        assert isinstance(msg, m.CollectiveDone)
        st = self._tags.get(msg.tag)
        if st is None or st.verdict.done() or (st.op_id and msg.op_id and msg.op_id != st.op_id):
            return  # verdict of an operation we already gave up on
        st.verdict.set_result(msg)
        if st.ring is not None and not msg.ok:
            st.ring.fail(f"aborted by the master: {msg.reason}")

    def _on_sync_plan(self, msg: m.Message) -> None:
        assert isinstance(msg, m.SyncPlan)
        if self._sync is None or self._sync[0].done():
            # The plan of a sync we already gave up on (local timeout): release the group.
            if msg.ok and self._link is not None:
                self._link.send(m.SyncDone(msg.sync_id, False, "gave up before the plan arrived"))
            return
        self._sync[0].set_result(msg)

    def _on_sync_complete(self, msg: m.Message) -> None:
        assert isinstance(msg, m.SyncComplete)
        if self._sync is not None and not self._sync[1].done():
            self._sync[1].set_result(msg)

    def _on_kick(self, msg: m.Message) -> None:
        assert isinstance(msg, m.Kick)
        if msg.code == "shutdown" and self._link is not None:  # a restart: reconnect
            self._link_lost(self._link, ConnectionLost(f"master shutting down: {msg.reason}"))
            return
        cls = AuthenticationFailed if msg.code == "auth" else ConnectionLost
        self._lost(cls(f"dropped by the master: {msg.code}: {msg.reason}"))

    _handlers: dict[MsgType, Callable[[Communicator, m.Message], None]] = {
        MsgType.M2P_CHALLENGE: _on_challenge,
        MsgType.M2P_WELCOME: _on_welcome,
        MsgType.M2P_HEARTBEAT: _on_heartbeat,
        MsgType.M2P_TOPOLOGY: _on_topology,
        MsgType.M2P_TOPOLOGY_DONE: _on_topology_done,
        MsgType.M2P_COLLECTIVE_COMMENCE: _on_commence,
        MsgType.M2P_COLLECTIVE_DONE: _on_collective_done,
        MsgType.M2P_KICK: _on_kick,
        MsgType.M2P_SYNC_PLAN: _on_sync_plan,
        MsgType.M2P_SYNC_COMPLETE: _on_sync_complete,
    }

    def _lost(self, err: PCCLError) -> None:
        if self._error is not None:
            return
        if not self._closed:
            log.warning("peer %d: %s", self.peer_id, err)
        self._error = err
        for f0 in (self._welcome, self._challenge):
            if f0 is not None and not f0.done():
                f0.set_exception(err)
                f0.exception()  # mark retrieved
        self._node.fail_ops(str(err))
        futs: list[asyncio.Future[Any]] = [
            f for st in self._tags.values() for f in (st.commence, st.verdict)
        ]
        if self._sync is not None:
            futs.extend(self._sync)
        if futs:
            for f in futs:
                if not f.done():
                    f.set_exception(err)
                    f.exception()
        self._notify()

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._connected:
            raise RuntimeError("call connect() first")

    # ================================================================ topology

    async def update_topology(self, timeout: float | None = None) -> None:
        """Admit pending peers and drop departed ones; re-wire the ring.

        A barrier: every accepted peer must call it. Returns once the new topology is live.

        Raises:
            PendingOperations: collectives of this peer are still in flight.
            TopologyUpdateFailed: not completed within ``timeout`` (default 60 s + collective
                budget is not used here).
            ConnectionLost: the master dropped us.
        """
        self._check_usable()
        if self._tags:
            raise PendingOperations(
                f"{len(self._tags)} collective(s) in flight", phase="update_topology"
            )
        try:
            async with asyncio.timeout(timeout or 60.0):
                if self._reconnect_task is not None:
                    await self._await_link()  # a restarted master re-forms the ring itself
                    return
                assert self._link is not None
                start_epoch = self._done_epoch
                gen = self._link_gen
                self._link.send(m.UpdateTopology(start_epoch))
                await self._wait(
                    lambda: self._done_epoch > start_epoch or self._reconnect_task is not None
                )
                if self._done_epoch <= start_epoch or gen != self._link_gen:
                    await self._await_link()
        except TimeoutError:
            raise TopologyUpdateFailed(
                "topology update did not complete in time (does every peer call "
                "update_topology()?)",
                phase="update_topology",
            ) from None

    # ================================================================ all-reduce

    def all_reduce_async(
        self,
        send: Any,
        recv: Any = None,
        *,
        op: ReduceOp = ReduceOp.SUM,
        quantization: Quantization = Quantization.NONE,
        tag: int = 0,
    ) -> ReduceHandle:
        """Start an all-reduce; arguments are validated before this returns.

        Returns:
            A handle whose ``wait()`` gives the :class:`~pccl.ReduceInfo`.

        Raises:
            ValueError/TypeError: bad buffers, op, quantization or tag; tag already in flight.
            TooFewPeers: the group has fewer than two peers.
        """
        prepared = self._validate(send, recv, op, quantization, tag)
        st = _TagState(
            asyncio.get_running_loop().create_future(), asyncio.get_running_loop().create_future()
        )
        self._tags[tag] = st
        task = asyncio.get_running_loop().create_task(self._run_reduce(st, tag, *prepared))
        return ReduceHandle(task, tag)

    async def all_reduce(
        self,
        send: Any,
        recv: Any = None,
        *,
        op: ReduceOp = ReduceOp.SUM,
        quantization: Quantization = Quantization.NONE,
        tag: int = 0,
    ) -> ReduceInfo:
        """All-reduce ``send`` into ``recv`` (in place when ``recv`` is None or ``send``).

        On failure ``send`` is intact (restored when in place) and ``recv`` is unspecified.

        Raises:
            CollectiveAborted: a peer died, hung or stalled; call ``update_topology()`` and retry.
            TooFewPeers: fewer than two peers in the group.
            ConnectionLost: the master dropped us.
            ValueError/TypeError: bad arguments (before any I/O).
        """
        return await self.all_reduce_async(
            send, recv, op=op, quantization=quantization, tag=tag
        ).wait()

    def _validate(
        self, send: Any, recv: Any, op: Any, quantization: Any, tag: Any
    ) -> tuple[np.ndarray, np.ndarray, DType, bool, ReduceOp, Quantization]:
        if not isinstance(tag, int) or isinstance(tag, bool) or not 0 <= tag <= MAX_TAG:
            raise ValueError(f"tag must be an int in [0, 2**32), got {tag!r}")
        try:
            op = ReduceOp(op)
        except ValueError:
            raise ValueError(f"unknown reduce op {op!r}") from None
        try:
            quant = Quantization(quantization)
        except ValueError:
            raise ValueError(f"unknown quantization {quantization!r}") from None
        sv, rv, dt, in_place = _prepare(send, recv)
        if quant != Quantization.NONE and dt != DType.FLOAT32:
            raise TypeError(f"quantization {quant.name} needs float32 data, got {dt.name}")
        self._check_usable()
        if tag in self._tags:
            raise ValueError(f"tag {tag} is already in flight")
        if self._reconnect_task is not None:
            raise CollectiveAborted(
                "reconnecting to the master; call update_topology() and retry",
                tag=tag,
                phase="all_reduce",
            )
        if self.group_world_size < 2:
            raise TooFewPeers(
                f"group {self.peer_group} has {self.group_world_size} peer(s); "
                "an all-reduce needs at least 2",
                tag=tag,
                phase="all_reduce",
            )
        return sv, rv, dt, in_place, op, quant

    async def _run_reduce(
        self,
        st: _TagState,
        tag: int,
        sv: np.ndarray,
        rv: np.ndarray,
        dt: DType,
        in_place: bool,
        op: ReduceOp,
        quant: Quantization,
    ) -> ReduceInfo:
        cfg = self.config
        assert self._link is not None
        backup: np.ndarray | None = None
        ring: RingOp | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.collective_timeout_s
        try:
            self._link.send(m.CollectiveInitiate(tag, sv.size, int(dt), int(op), int(quant)))
            first: list[asyncio.Future[Any]] = [st.commence, st.verdict]
            done, _ = await asyncio.wait(
                first,
                timeout=cfg.collective_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if st.verdict.done():
                raise self._verdict_error(st.verdict.result(), tag)
            if not done:
                raise CollectiveAborted(
                    "peers did not all start the operation in time", tag=tag, phase="all_reduce"
                )
            go = st.commence.result()
            if go.epoch != self.epoch:
                self._link.send(m.CollectiveComplete(tag, go.op_id, False, "epoch mismatch"))
                raise CollectiveAborted(
                    f"operation started for epoch {go.epoch}, we are at {self.epoch}", tag=tag
                )
            t0 = time.perf_counter()
            if in_place:
                backup = self._pool.get(sv.nbytes).view(sv.dtype)
                np.copyto(backup, sv)
            node = self._node
            tx = node.tx
            nstreams = len(tx)
            rr = [0]

            def send_frame(hdr: bytes, payload: memoryview) -> None:
                i = rr[0]
                rr[0] = i + 1
                tx[i % nstreams].send(hdr, payload)

            ring = RingOp(
                op_id=go.op_id,
                tag=tag,
                rank=self.rank,
                world=self.group_world_size,
                src=sv,
                work=rv,
                dtype=dt,
                op=op,
                quant=quant,
                sub=max(1, cfg.chunk_bytes // (4 if quant != Quantization.NONE else dt.itemsize)),
                block=cfg.quant_block,
                send_frame=send_frame,
                pool=self._pool,
            )
            st.ring = ring
            if not tx or any(s.closed for s in tx):
                ring.fail("no healthy stream to the successor")
            else:
                node.register(ring)
                ring.begin()
            await self._watch(ring, st, deadline)
            if ring.future.exception() is None:
                secs = time.perf_counter() - t0
                self._link.send(m.CollectiveComplete(tag, go.op_id, True, "", ring.tx_bytes, secs))
            else:
                reason = str(ring.future.exception())[:500]
                if not st.verdict.done():
                    self._link.send(m.CollectiveComplete(tag, go.op_id, False, reason))
            # The master's verdict makes all survivors agree on success or abort.
            try:
                async with asyncio.timeout(cfg.heartbeat_timeout_s * 2 + 5):
                    verdict = await st.verdict
            except TimeoutError:
                raise CollectiveAborted(
                    "no verdict from the master", tag=tag, phase="all_reduce"
                ) from None
            if not verdict.ok:
                raise self._verdict_error(verdict, tag)
            return ReduceInfo(
                self.group_world_size, ring.tx_bytes, ring.rx_bytes, time.perf_counter() - t0
            )
        except BaseException:
            if backup is not None:
                np.copyto(sv, backup)
            raise
        finally:
            if ring is not None:
                ring.close()  # no-op when complete; stops writes into user memory
                self._node.unregister(ring)
                ring.release()
            if backup is not None:
                self._pool.put(backup.view(np.uint8))
            self._tags.pop(tag, None)

    async def _watch(self, ring: RingOp, st: _TagState, deadline: float) -> None:
        """Wait for the ring; fail it on the overall deadline or a progress stall."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        tick = min(1.0, cfg.progress_timeout_s / 4)
        while not ring.future.done():
            await asyncio.wait(
                [ring.future, st.verdict], timeout=tick, return_when=asyncio.FIRST_COMPLETED
            )
            if ring.future.done():
                break
            if st.verdict.done():
                v = st.verdict.result()
                ring.fail(f"aborted by the master: {v.reason}")
                break
            now = loop.time()
            if now > deadline:
                ring.fail(f"operation exceeded collective_timeout_s={cfg.collective_timeout_s}")
            elif time.monotonic() - ring.last_progress > cfg.progress_timeout_s:
                ring.fail(f"no progress for progress_timeout_s={cfg.progress_timeout_s}")
        if ring.future.done() and not ring.future.cancelled():
            ring.future.exception()  # retrieved

    def _verdict_error(self, v: m.CollectiveDone, tag: int) -> PCCLError:
        if self._error is not None:
            return self._error
        if v.kind == "mismatch":
            return ProtocolError(v.reason, tag=tag, phase="all_reduce")
        return CollectiveAborted(v.reason, tag=tag, phase="all_reduce")

    # ================================================================ shared state

    async def sync_shared_state(
        self,
        state: SharedState,
        strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
        *,
        timeout: float | None = None,
    ) -> SyncInfo:
        """Make ``state`` identical to the group's elected state, in place.

        A barrier over the group. Entries whose hash differs from the elected one are fetched
        from every peer holding it (striped), verified, then committed; ``state.revision``
        becomes the group's revision.

        Returns:
            ``SyncInfo(revision, tx_bytes, rx_bytes)``; both byte counts are 0 in steady state.

        Raises:
            SharedStateError: rejected (revision skip, layout mismatch, strategy rules), every
                source of an entry failed, or verification failed. Nothing unverified is
                committed; retrying is safe.
            PendingOperations: collectives or another sync are in flight.
            TypeError/ValueError: bad arguments.
        """
        if not isinstance(state, SharedState):
            raise TypeError(f"state must be a pccl.SharedState, got {type(state).__name__}")
        try:
            strategy = SyncStrategy(strategy)
        except ValueError:
            raise ValueError(f"unknown sync strategy {strategy!r}") from None
        self._check_usable()
        if self._tags or self._sync is not None:
            raise PendingOperations("collectives or a sync are in flight", phase="sync")
        await self._await_link()
        assert self._link is not None
        loop = asyncio.get_running_loop()
        plan_f: asyncio.Future[m.SyncPlan] = loop.create_future()
        complete_f: asyncio.Future[m.SyncComplete] = loop.create_future()
        self._sync = (plan_f, complete_f)
        server = self._node.state_server
        snap = server.open(state)
        entries = state.entries
        staging: dict[str, np.ndarray] = {}
        done_sent = vote_sent = False
        budget = timeout or self.config.collective_timeout_s
        try:
            async with asyncio.timeout(budget):
                digests = await asyncio.to_thread(
                    lambda: [(k, e.hash()) for k, e in entries.items()]
                )
                vote = [
                    (
                        k,
                        int(entries[k].dtype),
                        entries[k].nbytes,
                        list(entries[k].shape),
                        h,
                        entries[k].allow_content_inequality,
                    )
                    for k, h in digests
                ]
                self._link.send(m.SyncSharedState(state.revision, int(strategy), vote))
                vote_sent = True
                plan = await plan_f
                if not plan.ok:
                    raise SharedStateError(plan.reason, phase="sync")
                snap.sync_id = plan.sync_id
                error: Exception | None = None
                rx = 0
                if plan.fetch:
                    addresses = {pid: (host, port) for pid, host, port in plan.sources}
                    for key, _, _ in plan.fetch:
                        staging[key] = self._pool.get(entries[key].nbytes)
                    try:
                        res = await fetch_entries(
                            my_id=self.peer_id,
                            sync_id=plan.sync_id,
                            fetch=plan.fetch,
                            addresses=addresses,
                            state=state,
                            staging=staging,
                            token=self.token,
                            ssl=self._client_ssl,
                            progress_timeout=self.config.progress_timeout_s,
                            connect_timeout=self.config.connect_timeout_s,
                        )
                        rx = res.rx_bytes
                    except (SharedStateError, OSError, TimeoutError) as e:
                        error = e
                self._link.send(m.SyncDone(plan.sync_id, error is None, str(error or "")[:500]))
                done_sent = True
                await complete_f  # keep serving until every peer of the group is done
        except TimeoutError:
            raise SharedStateError(
                f"shared-state sync did not complete within {budget}s", phase="sync"
            ) from None
        finally:
            ok_plan = plan_f.done() and not plan_f.cancelled() and plan_f.exception() is None
            if ok_plan and not done_sent:
                p = plan_f.result()
                if p.ok and self._link is not None:  # release the group: we give up
                    self._link.send(m.SyncDone(p.sync_id, False, "gave up (timeout or cancel)"))
            elif not plan_f.done() and vote_sent and self._link is not None:
                self._link.send(m.SyncDone(0, False, "vote withdrawn (timeout or cancel)"))
            server.close()
            self._sync = None
            for buf in staging.values():
                self._pool.put(buf)
        if error is not None:
            raise SharedStateError(f"state transfer failed: {error}", phase="sync") from error
        state.revision = plan.revision
        return SyncInfo(plan.revision, snap.tx_bytes, rx)

    # ================================================================ closing

    async def close(self) -> None:
        """Leave the run (the master re-forms the ring without us) and release everything."""
        if self._closed:
            return
        if self._link is not None and self._error is None:
            self._link.send(m.Leave("closed by the application"))
        await self._shutdown("closed")

    async def _shutdown(self, why: str) -> None:
        self._closed = True
        self._lost(ConnectionLost(f"communicator {why}"))
        for t in self._tasks:
            t.cancel()
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        if self._wire_task is not None:
            self._wire_task.cancel()
        if self._link is not None and self._link.transport is not None:
            self._link.transport.close()
        await self._node.close()

    async def __aenter__(self) -> Communicator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def stale_frames(self) -> int:
        """Frames of aborted or finished operations that were discarded (diagnostics)."""
        return self._node.stale_frames
