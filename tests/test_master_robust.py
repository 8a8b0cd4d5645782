"""The real ``pccl master`` daemon against hostile and broken clients.

Each case talks raw bytes to a master subprocess (port 0, announced on stdout): garbage,
oversized length headers, truncated frames, unknown types, messages out of order, slow-loris
clients. Every one must end with an ``M2P_KICK`` frame naming the reason and a close of *that*
connection, within the handshake/heartbeat deadline, while the master keeps serving: afterwards a
fresh peer still registers and is admitted. The master must never crash nor log a traceback.

The listener tests throw strangers at it (garbage, HTTP, 16 MiB length claims of every type,
silent and half-open connections by the thousand, out-of-range resume ids): each is closed, the
unauthenticated caps hold, honest peers keep their place and newcomers still join, and the
master's resident memory stays bounded. A master restarted with ``--state-file`` never reissues
an id and keeps newcomers out of a run of their own until the previous run's peers return.

The last test fuzzes a master with more than 10k malformed frames over many concurrent
connections while three real peer processes (``tests/fuzz_peer_worker.py``) keep all-reducing
1 MiB: their results stay exact and byte-identical, and none of them is evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from pccl.master.daemon import MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_ADDRESS

from pccl import messages as m
from pccl.config import MAX_CONTROL_FRAME, MAX_DATA_FRAME
from pccl.frame import DATA_HEADER, HEADER, MAGIC, PROTOCOL_VERSION, VERSION, FrameDecoder, MsgType
from pccl.messages import AbortKind, KickCode
from pccl.tools.proc import spawn_master, stop

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
HANDSHAKE_S = 1.0
HB_INTERVAL_S = 0.2
HB_TIMEOUT_S = 1.5
#: Extra time allowed on top of a deadline: one master tick plus scheduling noise.
SLACK_S = 1.5
ROBUST_ENV = {
    "PCCL_HANDSHAKE_TIMEOUT_S": str(HANDSHAKE_S),
    "PCCL_HEARTBEAT_INTERVAL_S": str(HB_INTERVAL_S),
    "PCCL_HEARTBEAT_TIMEOUT_S": str(HB_TIMEOUT_S),
    "PCCL_CONNECT_TIMEOUT_S": "1",
}
FUZZ_FRAMES = 20_000
#: The daemon's caps on unauthenticated connections (``pccl.master.daemon``).
PER_ADDRESS_CAP = MAX_UNAUTHENTICATED_PER_ADDRESS
TOTAL_CAP = MAX_UNAUTHENTICATED
BAD_LOG_MARKERS = ("Traceback", "Exception in callback", "Fatal error", "Task exception")


# --------------------------------------------------------------------------- master process


@dataclass
class MasterProc:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def check_healthy(self) -> None:
        """Still running, and nothing in its log but the expected warnings."""
        rc = self.proc.poll()
        text = self.log_text()
        assert rc is None, f"master exited with {rc}:\n{text[-4000:]}"
        for marker in BAD_LOG_MARKERS:
            i = text.find(marker)
            assert i < 0, f"master logged {marker!r}:\n{text[max(0, i - 500) : i + 3000]}"


def start_master(
    log: Path,
    env: dict[str, str],
    *,
    port: int = 0,
    args: Sequence[str] = (),
    timeout: float = 30.0,
) -> MasterProc:
    """``pccl master`` on 127.0.0.1 (``port`` 0: any) with ``PCCL_*`` overrides in ``env``."""
    with log.open("wb") as err:
        proc, addr = spawn_master(
            None,
            port=port,
            extra_args=args,
            env={**os.environ, **env},
            stderr=err,
            timeout=timeout,
        )
    return MasterProc(proc, int(addr.rsplit(":", 1)[1]), log)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    stop(proc, group=True)  # SIGKILL its whole session; reap


@pytest.fixture(scope="module")
def robust_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MasterProc]:
    """One master with short handshake/heartbeat deadlines, shared by the raw-socket tests."""
    mp = start_master(tmp_path_factory.mktemp("robust") / "master.log", ROBUST_ENV)
    try:
        yield mp
    finally:
        stop_process(mp.proc)


@pytest.fixture
def master(robust_master: MasterProc) -> Iterator[MasterProc]:
    """The shared master, checked healthy after each test (no crash, no traceback)."""
    robust_master.check_healthy()
    yield robust_master
    robust_master.check_healthy()


# --------------------------------------------------------------------------- raw client


class Raw:
    """A blocking raw-socket client that decodes what the master sends.

    ``wait_for`` keeps the connection alive with heartbeats once registered, so a test can
    hold a raw peer in any state for longer than the heartbeat deadline.
    """

    def __init__(self, port: int, source: str = "") -> None:
        # Any 127.x.y.z is this host: ``source`` lets a test speak from several addresses.
        src = (source, 0) if source else None
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=src)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.dec = FrameDecoder()
        self.msgs: list[m.Message] = []
        self.eof = False
        self.welcome: m.Welcome | None = None
        self._hb = 0.0
        self.opened = time.monotonic()
        self.closed_at = 0.0

    # -------------------------------------------------------------- output

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:  # the master may already have closed us: that is allowed
            self._mark_eof()

    def send_msg(self, msg: m.Message) -> None:
        self.send(msg.encode())

    def hello(self, group: int = 0, port: int = 4242, **kw: Any) -> m.Welcome:
        self.send_msg(m.Hello(PROTOCOL_VERSION, group, port, **kw))
        got = self.wait_for(lambda x: isinstance(x, m.Welcome))
        assert isinstance(got, m.Welcome), f"no welcome: {self.msgs} eof={self.eof}"
        return got

    # -------------------------------------------------------------- input

    def _mark_eof(self) -> None:
        if not self.eof:
            self.eof = True
            self.closed_at = time.monotonic()

    def pump(self, timeout: float) -> None:
        if self.eof:
            return
        # A socket timeout, not select(): tests holding 1000+ sockets have fds beyond FD_SETSIZE.
        self.sock.settimeout(max(timeout, 1e-3))
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return
        except OSError:
            data = b""
        if not data:
            self._mark_eof()
            return
        # The master's own output must always be valid: a ProtocolError here fails the test.
        for t, body in self.dec.feed(data):
            msg = m.decode(t, body)
            if isinstance(msg, m.Welcome):
                self.welcome = msg
            self.msgs.append(msg)

    def wait_for(self, pred: Callable[[m.Message], bool], timeout: float = 5.0) -> m.Message | None:
        """The first message (received so far or within ``timeout``) ``pred`` accepts."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for msg in self.msgs[seen:]:
                if pred(msg):
                    return msg
            seen = len(self.msgs)
            now = time.monotonic()
            if self.eof or now >= deadline:
                return None
            if self.welcome is not None and now - self._hb > HB_INTERVAL_S:
                self._hb = now
                self.send_msg(m.Heartbeat(0))
            self.pump(min(deadline - now, HB_INTERVAL_S))

    def wait_closed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self.pump(deadline - time.monotonic())
        return self.eof

    def kick(self) -> m.Kick | None:
        for msg in self.msgs:
            if isinstance(msg, m.Kick):
                return msg
        return None

    def expect_kick(self, code: KickCode, within: float, *, reason: str = "") -> m.Kick:
        """The master sends ``M2P_KICK(code)`` and closes within ``within`` seconds of now."""
        t0 = time.monotonic()
        assert self.wait_closed(within), f"not closed within {within}s; got {self.msgs}"
        assert time.monotonic() - t0 <= within
        k = self.kick()
        assert k is not None, f"closed without a kick; got {self.msgs}"
        assert KickCode.parse(k.code) is code, (KickCode.parse(k.code), k)
        assert reason.lower() in k.reason.lower(), k
        assert self.msgs[-1] is k, "nothing may follow a kick"
        return k

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(master: MasterProc) -> Iterator[Callable[..., Raw]]:
    """Factory of raw connections to the shared master; all are closed *by the master* at
    teardown (a Leave, or any frame before hello, is answered by a kick and a close), so the
    next test starts with an empty run."""
    conns: list[Raw] = []

    def new(source: str = "") -> Raw:
        r = Raw(master.port, source)
        conns.append(r)
        return r

    yield new
    for r in conns:
        if not r.eof:
            r.send_msg(m.Leave("test over"))
            r.wait_closed(5.0)
        r.close()


def admit_fresh_peer(port: int) -> None:
    """A new peer registers and is admitted at once into an empty run; it then leaves."""
    r = Raw(port)
    try:
        w = r.hello(port=5555)
        assert w.accepted, f"fresh peer not admitted at once: {w}"
        topo = r.wait_for(lambda x: isinstance(x, m.Topology))
        assert isinstance(topo, m.Topology), r.msgs
        assert [p[0] for p in topo.ring] == [w.peer_id]
        assert topo.ring[0][2] == 5555
        r.send_msg(m.TopologyReady(topo.epoch, True))
        done = r.wait_for(lambda x: isinstance(x, m.TopologyDone))
        assert done == m.TopologyDone(topo.epoch, True), r.msgs
        r.send_msg(m.Leave("done"))
        r.expect_kick(KickCode.LEAVE, 5.0)
    finally:
        r.close()


def hdr(mtype: int, length: int, magic: int = MAGIC, version: int = VERSION) -> bytes:
    return HEADER.pack(magic, version, mtype, length)


# --------------------------------------------------------------------------- malformed input


GARBAGE = {
    "random": random.Random(1).randbytes(64),
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "tls": bytes.fromhex("16030100a5010000a10303") + bytes(32),
    "zeros": bytes(16),
    "bad_version": hdr(MsgType.P2M_HELLO, 3, version=9) + b"\x93\x01\x00",
    "byteswapped_magic": hdr(MsgType.P2M_HELLO, 3, magic=0x4350) + b"\x93\x01\x00",
    "msgpack_garbage": hdr(MsgType.P2M_HELLO, 4) + b"\xc1\xc1\xc1\xc1",
    "trailing_bytes": hdr(MsgType.P2M_HELLO, 5) + msgpack.packb([VERSION, 0, 7]) + b"\x00",
    "nesting_bomb": hdr(MsgType.P2M_HELLO, 60_000) + b"\x91" * 60_000,
    "wrong_field_type": hdr(MsgType.P2M_HELLO, 6) + msgpack.packb([VERSION, "x", 7, True]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_is_kicked_and_master_keeps_serving(
    master: MasterProc, raw: Callable[[], Raw], name: str
) -> None:
    r = raw()
    r.send(GARBAGE[name])
    r.expect_kick(KickCode.PROTOCOL, 2.0)
    admit_fresh_peer(master.port)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mtype", "length"),
    [
        (MsgType.P2M_HELLO, 0xFFFF_FFFF),
        (MsgType.P2M_HELLO, MAX_CONTROL_FRAME + 1),
        (MsgType.P2M_HEARTBEAT, 1 << 31),
        (MsgType.P2P_DATA, DATA_HEADER.size + MAX_DATA_FRAME),  # data on a control link
    ],
    ids=["4GiB", "max+1", "2GiB", "data"],
)
def test_oversized_length_header_is_refused_from_the_header_alone(
    master: MasterProc, raw: Callable[[], Raw], mtype: MsgType, length: int
) -> None:
    """The master must refuse on the 8 header bytes, never wait for (or buffer) the body."""
    r = raw()
    r.send(hdr(mtype, length))
    r.expect_kick(KickCode.PROTOCOL, 2.0)
    # After registering, too.
    r2 = raw()
    r2.hello()
    r2.send(hdr(mtype, length))
    r2.expect_kick(KickCode.PROTOCOL, 2.0)
    admit_fresh_peer(master.port)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "mtype",
    # unknown (the first free numbers of each range, whatever types get added)
    [
        t
        for t in (0, 14, 15, 16, 17, 31, 45, 46, 47, 63, 72, 255)
        if t not in {int(k) for k in MsgType}
    ]
    + [int(t) for t in MsgType if not t.name.startswith("P2M_")],  # known, not for the master
)
def test_unknown_and_foreign_types_are_kicked(
    master: MasterProc, raw: Callable[[], Raw], mtype: int
) -> None:
    cls = m.MESSAGES.get(mtype)  # type: ignore[call-overload]
    body = m.encode(_minimal(cls))[HEADER.size :] if cls is not None else msgpack.packb([])
    for registered in (False, True):
        r = raw()
        if registered:
            r.hello()
        r.send(hdr(mtype, len(body)) + body)
        r.expect_kick(KickCode.PROTOCOL, 2.0)
    admit_fresh_peer(master.port)


def _minimal(cls: type[m.Message]) -> m.Message:
    zero: dict[str, Any] = {"int": 0, "float": 0.0, "bool": False, "str": "", "bytes": b""}
    kw = {name: zero.get(sp.kind, []) for name, sp in cls._fields}  # lists (and tuples) empty
    return cls(**kw)


@pytest.mark.timeout(60)
def test_truncated_body_with_fixed_length_is_kicked(
    master: MasterProc, raw: Callable[[], Raw]
) -> None:
    body = m.Hello(PROTOCOL_VERSION, 0, 7, "somehost").encode()[HEADER.size :]
    r = raw()
    r.send(hdr(MsgType.P2M_HELLO, len(body) - 3) + body[:-3])
    r.expect_kick(KickCode.PROTOCOL, 2.0)
    admit_fresh_peer(master.port)


# --------------------------------------------------------------------------- out of order


BEFORE_HELLO = [
    m.UpdateTopology(0),
    m.Heartbeat(1),
    m.TopologyReady(1, True),
    m.CollectiveInitiate(0, 1, 16, 0, 0, 0),
    m.CollectiveComplete(0, 1, True),
    m.CollectiveWithdraw(0, 1),
    m.VerdictQuery(1),
    m.Leave("bye"),
    m.SyncDone(1, True),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("msg", BEFORE_HELLO, ids=lambda x: type(x).__name__)
def test_messages_before_hello_are_kicked(
    master: MasterProc, raw: Callable[[], Raw], msg: m.Message
) -> None:
    r = raw()
    r.send_msg(msg)
    r.expect_kick(KickCode.PROTOCOL, 2.0, reason="not accepted in state pre_auth")
    assert r.welcome is None
    admit_fresh_peer(master.port)


@pytest.mark.timeout(60)
def test_bad_hellos_are_kicked(master: MasterProc, raw: Callable[[], Raw]) -> None:
    r = raw()
    r.hello()
    r.send_msg(m.Hello(PROTOCOL_VERSION, 0, 4242))  # a second hello
    r.expect_kick(KickCode.PROTOCOL, 2.0, reason="P2M_HELLO is not accepted in state authenticated")
    for version in (1, PROTOCOL_VERSION + 1):  # wire v1 peers, and a newer protocol
        r = raw()
        r.send_msg(m.Hello(version, 0, 4242))
        r.expect_kick(KickCode.VERSION, 2.0, reason=f"protocol {version} unsupported")
        assert r.welcome is None
    r = raw()
    r.send_msg(m.Hello(PROTOCOL_VERSION, 0, 0))
    r.expect_kick(KickCode.PROTOCOL, 2.0, reason="port")
    assert r.welcome is None
    admit_fresh_peer(master.port)


@pytest.mark.timeout(60)
def test_out_of_state_messages_from_registered_peers(
    master: MasterProc, raw: Callable[[], Raw]
) -> None:
    # A is admitted alone but holds its epoch open (never reports ready).
    a = raw()
    wa = a.hello()
    topo = a.wait_for(lambda x: isinstance(x, m.Topology))
    assert isinstance(topo, m.Topology) and wa.accepted
    # Untimely messages from registered peers are answered (refused) or ignored, never kicked
    # (wire v2): B registers meanwhile and is not part of that epoch; its report is ignored.
    b = raw()
    b.hello()
    b.send_msg(m.TopologyReady(topo.epoch, True))
    c = raw()
    c.hello()
    c.send_msg(m.UpdateTopology(0))  # pending peers do not vote: refused
    refused = c.wait_for(lambda x: isinstance(x, m.TopologyDone))
    assert isinstance(refused, m.TopologyDone) and not refused.ok, c.msgs
    assert "not accepted" in refused.reason
    d = raw()
    d.hello()
    d.send_msg(m.CollectiveInitiate(0, 7, 16, 0, 0, 0))  # nor run collectives: refused
    v = d.wait_for(lambda x: isinstance(x, m.CollectiveDone))
    assert isinstance(v, m.CollectiveDone), d.msgs
    assert (v.tag, v.attempt, v.op_id, v.ok) == (0, 7, 0, False)
    assert AbortKind.parse(v.kind) is AbortKind.STALE_TOPOLOGY
    # Harmless stale reports are ignored, not fatal.
    e = raw()
    e.hello()
    e.send_msg(m.CollectiveComplete(0, 12345, False, "forged"))
    e.send_msg(m.SyncDone(777, False, "forged"))
    e.send_msg(m.CollectiveWithdraw(3, 1, "never initiated"))
    e.send_msg(m.VerdictQuery(12345))
    unknown = e.wait_for(lambda x: isinstance(x, m.Verdict))
    assert unknown == m.Verdict(12345, int(m.VerdictState.UNKNOWN), unknown.reason), e.msgs  # type: ignore[union-attr]
    # Every one of them is still served: each leaves on its own request.
    for r in (b, c, d, e):
        assert r.kick() is None and not r.eof, r.msgs
        r.send_msg(m.Leave("still here"))
        r.expect_kick(KickCode.LEAVE, 2.0)
    # A completes its epoch undisturbed by all of the above.
    a.send_msg(m.TopologyReady(topo.epoch, True))
    done = a.wait_for(lambda x: isinstance(x, m.TopologyDone))
    assert done == m.TopologyDone(topo.epoch, True), a.msgs
    assert a.kick() is None
    a.send_msg(m.Leave("bye"))
    a.expect_kick(KickCode.LEAVE, 2.0)
    admit_fresh_peer(master.port)


@pytest.mark.timeout(60)
def test_welcome_says_pending_when_not_admitted_at_once(
    master: MasterProc, raw: Callable[[], Raw]
) -> None:
    """``Welcome.accepted`` is documented as "True when admitted at once". A peer that registers
    while the first peer's epoch is still being set up is *not* in that epoch: it waits for a
    vote, so its welcome must say so."""
    a = raw()
    assert a.hello().accepted
    topo = a.wait_for(lambda x: isinstance(x, m.Topology))
    assert isinstance(topo, m.Topology)
    b = raw()
    wb = b.hello()
    a.send_msg(m.TopologyReady(topo.epoch, True))
    assert a.wait_for(lambda x: isinstance(x, m.TopologyDone)) is not None
    # B really is pending: it gets no topology until A votes.
    assert b.wait_for(lambda x: isinstance(x, m.Topology), timeout=0.5) is None
    a.send_msg(m.UpdateTopology(topo.epoch))
    assert b.wait_for(lambda x: isinstance(x, m.Topology)) is not None
    assert not wb.accepted, f"welcome of a pending peer says accepted: {wb}"


@pytest.mark.timeout(60)
def test_silent_newcomer_cannot_stall_topology_updates_forever(
    master: MasterProc, raw: Callable[[], Raw]
) -> None:
    """DESIGN §3: per-phase deadlines so nothing stalls forever. A newcomer that registers and
    heartbeats but never reports its p2p links must be evicted, and the epoch completed
    without it, within a bounded time (here: connect 1 s + heartbeat 1.5 s, with slack)."""
    a = raw()
    a.hello()
    t1 = a.wait_for(lambda x: isinstance(x, m.Topology))
    assert isinstance(t1, m.Topology)
    a.send_msg(m.TopologyReady(t1.epoch, True))
    assert a.wait_for(lambda x: isinstance(x, m.TopologyDone)) is not None
    stall = raw()
    stall.hello()  # heartbeats keep it registered; it never reports TopologyReady
    a.send_msg(m.UpdateTopology(t1.epoch))
    t2 = a.wait_for(lambda x: isinstance(x, m.Topology) and x.epoch > t1.epoch)
    assert isinstance(t2, m.Topology) and len(t2.ring) == 2
    a.send_msg(m.TopologyReady(t2.epoch, True))
    t0 = time.monotonic()
    limit = 1.0 + HB_TIMEOUT_S + 3 * SLACK_S

    answered = {t2.epoch}

    def a_wired(x: m.Message) -> bool:  # A answers every re-announcement like a real peer
        if isinstance(x, m.Topology) and x.epoch not in answered:
            answered.add(x.epoch)
            a.send_msg(m.TopologyReady(x.epoch, True))
        return isinstance(x, m.TopologyDone) and x.ok and x.epoch >= t2.epoch

    deadline = t0 + limit
    done = None
    while done is None and time.monotonic() < deadline:
        done = a.wait_for(a_wired, timeout=0.1)
        # Keep the stalling peer alive, as a hung-but-heartbeating process would be.
        stall.wait_for(lambda x: False, timeout=0.01)
    assert done is not None, (
        f"the run is stuck in epoch {t2.epoch} set-up after {limit:.1f}s: a registered peer that "
        "never reports TopologyReady is never evicted"
    )


# --------------------------------------------------------------------------- slow loris


@pytest.mark.timeout(60)
def test_partial_header_then_silence_is_closed_at_the_handshake_deadline(
    master: MasterProc, raw: Callable[[], Raw]
) -> None:
    r = raw()
    r.send(m.Hello(PROTOCOL_VERSION, 0, 4242).encode()[:3])
    r.expect_kick(KickCode.HANDSHAKE_TIMEOUT, HANDSHAKE_S + SLACK_S)
    assert r.closed_at - r.opened >= HANDSHAKE_S * 0.9, "closed before the deadline"
    admit_fresh_peer(master.port)


@pytest.mark.timeout(60)
def test_dripping_hello_is_closed_at_the_handshake_deadline(
    master: MasterProc, raw: Callable[[], Raw]
) -> None:
    """One byte every 150 ms: the connection keeps 'making progress' but never completes its
    hello before the deadline, so progress must not extend the deadline."""
    data = m.Hello(PROTOCOL_VERSION, 0, 4242, "drip.example").encode()
    assert len(data) * 0.15 > HANDSHAKE_S + SLACK_S
    r = raw()
    for i in range(len(data)):
        r.send(data[i : i + 1])
        r.pump(0.15)
        if r.eof:
            break
    assert r.wait_closed(SLACK_S)
    assert r.welcome is None
    k = r.kick()
    assert k is not None and k.code == KickCode.HANDSHAKE_TIMEOUT, r.msgs
    assert r.closed_at - r.opened <= HANDSHAKE_S + SLACK_S
    admit_fresh_peer(master.port)


@pytest.mark.timeout(60)
def test_registered_peer_that_stalls_mid_frame_is_evicted_at_the_heartbeat_deadline(
    master: MasterProc, raw: Callable[[], Raw]
) -> None:
    r = raw()
    r.hello()
    r.send(m.Heartbeat(1).encode()[:5])
    t0 = time.monotonic()
    r.expect_kick(KickCode.HEARTBEAT_TIMEOUT, HB_TIMEOUT_S + SLACK_S)
    assert time.monotonic() - t0 >= HB_TIMEOUT_S * 0.5
    admit_fresh_peer(master.port)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spread", [False, True], ids=["one_address", "many_addresses"])
def test_many_slow_lorises_do_not_delay_a_real_peer(
    master: MasterProc, raw: Callable[..., Raw], spread: bool
) -> None:
    """64 lorises, from the real peer's own address or from 64 others: the peer is served at
    once. From one address, at most MAX_UNAUTHENTICATED_PER_ADDRESS of them are held (the older
    ones are closed as BUSY, and so is one more to make room for the peer); the rest are
    closed at the handshake deadline."""
    lorises = [raw(source=f"127.0.1.{i + 1}" if spread else "") for i in range(64)]
    for i, r in enumerate(lorises):
        r.send(m.Hello(PROTOCOL_VERSION, 0, 4242).encode()[: i % HEADER.size + 1])
        if not spread:  # the master judges connections in order: wait for this one's challenge
            assert r.wait_for(lambda x: isinstance(x, m.Challenge)) is not None
    t0 = time.monotonic()
    admit_fresh_peer(master.port)  # served at once, not after the lorises time out
    assert time.monotonic() - t0 < HANDSHAKE_S
    codes: Counter[KickCode] = Counter()
    for r in lorises:
        assert r.wait_closed(HANDSHAKE_S + 2 * SLACK_S), r.msgs
        k = r.kick()
        assert k is not None and r.msgs[-1] is k, r.msgs
        codes[KickCode.parse(k.code)] += 1
    if spread:
        assert codes == {KickCode.HANDSHAKE_TIMEOUT: 64}, codes
    else:
        # One more BUSY unless the oldest held loris already timed out when the peer came.
        assert set(codes) == {KickCode.BUSY, KickCode.HANDSHAKE_TIMEOUT}, codes
        assert 64 - PER_ADDRESS_CAP <= codes[KickCode.BUSY] <= 64 - PER_ADDRESS_CAP + 1, codes


# --------------------------------------------------------------------------- the listener

#: Growth of the master's resident memory allowed across a storm of strangers.
RSS_BOUND = 16 << 20
FLOOD = 1000


def _raise_nofile(want: int) -> None:
    """Raise this process's open-file limit to ``want`` or skip the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"open-file limit {hard} < {want}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as e:
        pytest.skip(f"cannot raise the open-file limit to {want}: {e}")


def _join_run(*clients: Raw) -> int:
    """Register ``clients`` in order and form one run of all of them; returns its epoch."""
    first, rest = clients[0], clients[1:]
    assert first.hello().accepted
    topo = first.wait_for(lambda x: isinstance(x, m.Topology))
    assert isinstance(topo, m.Topology), first.msgs
    first.send_msg(m.TopologyReady(topo.epoch, True))
    assert first.wait_for(lambda x: x == m.TopologyDone(topo.epoch, True)) is not None
    if not rest:
        return topo.epoch
    for r in rest:
        assert not r.hello().accepted
    return _vote_in([first], list(rest))


def wait_each(
    clients: Sequence[Raw], pred: Callable[[m.Message], bool], timeout: float = 10.0
) -> list[m.Message | None]:
    """For each client, the first message ``pred`` accepts; all of them keep heartbeating
    while any is still waiting (a client that waits alone would let the others go silent)."""
    found: list[m.Message | None] = [None] * len(clients)
    deadline = time.monotonic() + timeout
    while any(f is None for f in found) and time.monotonic() < deadline:
        for i, r in enumerate(clients):
            if found[i] is None:
                found[i] = r.wait_for(pred, timeout=0.02)
            else:
                r.wait_for(lambda x: False, timeout=0.001)
    return found


def _vote_in(accepted: list[Raw], pending: list[Raw]) -> int:
    """The accepted clients vote; everyone wires the announced epoch; returns it."""
    everyone = accepted + pending
    for r in accepted:
        r.send_msg(m.UpdateTopology(0))
    topos = wait_each(
        everyone, lambda x: isinstance(x, m.Topology) and len(x.ring) == len(everyone)
    )
    assert all(isinstance(t, m.Topology) for t in topos), [r.msgs for r in everyone]
    epoch = topos[0].epoch  # type: ignore[union-attr]
    ids = sorted(r.welcome.peer_id for r in everyone)  # type: ignore[union-attr]
    assert all(sorted(p[0] for p in t.ring) == ids for t in topos)  # type: ignore[union-attr]
    for r in everyone:
        r.send_msg(m.TopologyReady(epoch, True))
    dones = wait_each(everyone, lambda x: isinstance(x, m.TopologyDone) and x.epoch == epoch)
    assert dones == [m.TopologyDone(epoch, True)] * len(everyone), [r.msgs for r in everyone]
    return epoch


def _hello_resuming(resume: int) -> bytes:
    """A hello asking to resume ``resume``, encoded by hand: the schema refuses to encode ids
    beyond ``MAX_PEER_ID``, a stranger's client need not."""
    body = msgpack.packb([PROTOCOL_VERSION, 0, 4242, "", resume])
    return hdr(MsgType.P2M_HELLO, len(body)) + body


@pytest.mark.timeout(90)
def test_strangers_are_closed_and_cost_the_master_no_memory(
    master: MasterProc, raw: Callable[..., Raw]
) -> None:
    """Garbage, an HTTP request, a header claiming a 16 MiB body of every message type, and
    20 silent connections: each is closed (the silent ones at the handshake deadline), and the
    master's resident memory grows by less than 16 MiB."""
    rss0 = _rss_bytes(master.proc.pid)
    for payload in (
        random.Random(7).randbytes(512),
        b"GET /status HTTP/1.1\r\nHost: master\r\nUser-Agent: scanner\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 16777216\r\n\r\n" + b"x" * 256,
    ):
        r = raw()
        r.send(payload)
        r.expect_kick(KickCode.PROTOCOL, 2.0)
        assert r.welcome is None
    claims = 0
    for t in MsgType:
        r = raw()  # the header alone: refused on its 8 bytes, nothing waited for
        r.send(hdr(t, 16 << 20))
        r.expect_kick(KickCode.PROTOCOL, 2.0)
        # And with body bytes streaming behind the header: the master closes the connection
        # instead of buffering them (a kick racing our unread bytes may be lost to the reset).
        r = raw()
        r.send(hdr(t, 16 << 20) + bytes(256 << 10))
        assert r.wait_closed(2.0), f"{t.name}: not closed"
        k = r.kick()
        assert k is None or KickCode.parse(k.code) is KickCode.PROTOCOL, (t.name, k)
        claims += 2
    assert claims == 2 * len(MsgType) >= 60
    # Silent connections, each from its own address (the per-address cap stays out of it).
    silent = [raw(source=f"127.0.2.{i + 1}") for i in range(20)]
    for r in silent:
        r.expect_kick(KickCode.HANDSHAKE_TIMEOUT, HANDSHAKE_S + 2 * SLACK_S)
        assert r.closed_at - r.opened >= HANDSHAKE_S * 0.9, "closed before the deadline"
        assert r.welcome is None
    rss1 = _rss_bytes(master.proc.pid)
    print(f"strangers: master RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB")
    assert rss1 - rss0 < RSS_BOUND, (rss0, rss1)
    admit_fresh_peer(master.port)


class Flood:
    """``n`` connections that say nothing, spread over source addresses 127.0.3.x (at most
    ``per_address`` each), read through one epoll selector (1000+ fds exceed select())."""

    def __init__(self, port: int, n: int, per_address: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.decoders: dict[socket.socket, FrameDecoder] = {}
        self.got: dict[socket.socket, list[m.Message]] = {}
        self.closed: set[socket.socket] = set()
        self.port = port
        self.n = n
        self.per_address = per_address

    def open(self, i: int) -> None:
        src = f"127.0.3.{i // self.per_address + 1}"
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10, source_address=(src, 0))
        s.setblocking(False)
        self.socks.append(s)
        self.decoders[s] = FrameDecoder()
        self.got[s] = []
        self.sel.register(s, selectors.EVENT_READ)

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self.closed.add(s)
                self.sel.unregister(s)
                continue
            for t, body in self.decoders[s].feed(data):
                self.got[s].append(m.decode(t, body))

    def settled(self) -> bool:
        """Every connection was accepted (got its challenge) or closed."""
        return all(s in self.closed or self.got[s] for s in self.socks)

    def kicks(self) -> Counter:
        out: Counter = Counter()
        for s in self.closed:
            k = [x for x in self.got[s] if isinstance(x, m.Kick)]
            out[KickCode.parse(k[-1].code) if k else None] += 1
        return out

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.sel.close()


@pytest.mark.timeout(180)
def test_flood_of_half_open_connections_spares_honest_peers(tmp_path: Path) -> None:
    """1,000 connections that open and say nothing, while two registered peers heartbeat:
    nobody honest is kicked, the master holds at most MAX_UNAUTHENTICATED of the strangers
    (the oldest are closed as BUSY), a new peer completes its hello and joins the run while
    the flood holds its connections, and the master's memory stays bounded."""
    _raise_nofile(FLOOD + 200)
    # A long handshake deadline: the flood's connections are held, never timed out, here.
    env = {**ROBUST_ENV, "PCCL_HANDSHAKE_TIMEOUT_S": "60"}
    mp = start_master(tmp_path / "master.log", env)
    a, b = Raw(mp.port), Raw(mp.port)
    flood = Flood(mp.port, FLOOD, per_address=16)
    try:
        _join_run(a, b)
        rss0 = _rss_bytes(mp.proc.pid)
        deadline = time.monotonic() + 60
        for i in range(FLOOD):
            flood.open(i)
            if i % 25 == 0:  # the honest peers keep heartbeating and reading meanwhile
                for r in (a, b):
                    r.wait_for(lambda x: False, timeout=0.001)
                flood.pump(0)
        while not flood.settled():
            assert time.monotonic() < deadline, f"{len(flood.closed)} closed; flood unsettled"
            for r in (a, b):
                r.wait_for(lambda x: False, timeout=0.001)
            flood.pump(0.05)
        # The caps held: all but MAX_UNAUTHENTICATED strangers were closed, as BUSY, and the
        # rest are still open (nothing else closed them: the handshake deadline is far).
        while len(flood.closed) < FLOOD - TOTAL_CAP and time.monotonic() < deadline:
            flood.pump(0.05)
        assert len(flood.closed) == FLOOD - TOTAL_CAP, flood.kicks()
        assert flood.kicks() == {KickCode.BUSY: FLOOD - TOTAL_CAP}, flood.kicks()
        rss1 = _rss_bytes(mp.proc.pid)
        # A new honest peer, from an address of its own, while the flood holds its connections.
        c = Raw(mp.port)
        wc = c.hello()
        assert not wc.accepted and wc.peer_id not in (a.welcome.peer_id, b.welcome.peer_id)  # type: ignore[union-attr]
        _vote_in([a, b], [c])
        while len(flood.closed) < FLOOD - TOTAL_CAP + 1 and time.monotonic() < deadline:
            flood.pump(0.05)
        flood.pump(0.05)
        # c's connection displaced exactly one stranger (the oldest); the rest still hold.
        assert len(flood.closed) == FLOOD - TOTAL_CAP + 1, flood.kicks()
        assert sum(1 for s in flood.socks if s not in flood.closed) == TOTAL_CAP - 1
        for r in (a, b, c):
            assert r.kick() is None and not r.eof, r.msgs
        rss2 = _rss_bytes(mp.proc.pid)
        print(
            f"flood: {FLOOD} half-open connections, {len(flood.closed)} closed as BUSY, "
            f"{FLOOD - len(flood.closed)} held; master RSS {rss0 / 2**20:.1f} -> "
            f"{rss1 / 2**20:.1f} (flood settled) -> {rss2 / 2**20:.1f} MiB (newcomer joined)"
        )
        assert max(rss1, rss2) - rss0 < RSS_BOUND, (rss0, rss1, rss2)
        mp.check_healthy()
    finally:
        flood.close()
        for r in (a, b):
            r.close()
        stop_process(mp.proc)


@pytest.mark.timeout(60)
def test_hello_with_an_out_of_range_resume_id_closes_only_that_connection(
    tmp_path: Path,
) -> None:
    """Ids beyond MAX_PEER_ID are refused at decode (a Welcome carrying one used to fail to
    encode inside the master); the largest valid one is granted and does not exhaust the ids
    of the peers that come after it. Registered peers never notice."""
    mp = start_master(tmp_path / "master.log", ROBUST_ENV)
    a = Raw(mp.port)
    clients = [a]
    try:
        _join_run(a)
        for resume in (2**64 - 1, 2**31):
            r = Raw(mp.port)
            clients.append(r)
            r.send(_hello_resuming(resume))
            r.expect_kick(KickCode.PROTOCOL, 2.0, reason="resume_peer_id")
            assert r.welcome is None
            assert a.wait_for(lambda x: False, timeout=0.3) is None and a.kick() is None
        top = Raw(mp.port)
        clients.append(top)
        top.send(_hello_resuming(m.MAX_PEER_ID))
        wt = top.wait_for(lambda x: isinstance(x, m.Welcome))
        assert isinstance(wt, m.Welcome) and wt.peer_id == m.MAX_PEER_ID, top.msgs
        newcomers = [Raw(mp.port) for _ in range(3)]
        clients += newcomers
        ids = {a.welcome.peer_id, m.MAX_PEER_ID}  # type: ignore[union-attr]
        for r in newcomers:
            w = r.hello()
            assert 0 < w.peer_id <= m.MAX_PEER_ID and w.peer_id not in ids, w
            ids.add(w.peer_id)
        _vote_in([a], [top, *newcomers])
        assert all(r.kick() is None for r in (a, top, *newcomers))
        mp.check_healthy()
    finally:
        for r in clients:
            r.close()
        stop_process(mp.proc)


@pytest.mark.timeout(90)
def test_restarted_master_never_reissues_ids_nor_admits_newcomers_alone(tmp_path: Path) -> None:
    """``--state-file``: a master killed (SIGKILL) and restarted on the same port gives a
    newcomer an id never issued before and keeps it out of any run until a peer of the previous
    run returns; then both form one run together."""
    state = tmp_path / "master-state.json"
    env = {**ROBUST_ENV, "PCCL_RECONNECT_TIMEOUT_S": "60", "PCCL_RESTART_GRACE_S": "0.5"}
    args = ("--state-file", str(state))
    m1 = start_master(tmp_path / "master1.log", env, args=args)
    a, b = Raw(m1.port), Raw(m1.port)
    clients = [a, b]
    m2: MasterProc | None = None
    try:
        _join_run(a, b)
        issued = {a.welcome.peer_id, b.welcome.peer_id}  # type: ignore[union-attr]

        def members() -> list[int]:
            try:
                return sorted(json.loads(state.read_text())["members"])
            except (OSError, ValueError, KeyError):
                return []

        deadline = time.monotonic() + 10
        while members() != sorted(issued):  # the master persists on its next tick
            assert time.monotonic() < deadline, f"membership never persisted: {members()}"
            for r in (a, b):  # waiting here keeps both heartbeating
                r.wait_for(lambda x: False, timeout=0.05)
        os.killpg(m1.proc.pid, signal.SIGKILL)
        m1.proc.wait(10)
        assert a.wait_closed(5.0) and b.wait_closed(5.0)

        m2 = start_master(tmp_path / "master2.log", env, port=m1.port, args=args)
        assert m2.port == m1.port
        newcomer = Raw(m2.port)
        clients.append(newcomer)
        wn = newcomer.hello()
        assert wn.peer_id not in issued and wn.peer_id > 0, (wn, issued)
        assert not wn.accepted, "the welcome says admitted, but the newcomer must wait"
        # Several master ticks and more than the restart grace: still no run of its own.
        alone = newcomer.wait_for(
            lambda x: isinstance(x, m.Topology | m.TopologyDone), timeout=4 * 0.5 + 1.0
        )
        assert alone is None, f"the newcomer formed a run without the previous one: {alone}"
        # An incumbent returns under its id: both form one run.
        back = Raw(m2.port)
        clients.append(back)
        wb = back.hello(resume_peer_id=a.welcome.peer_id)  # type: ignore[union-attr]
        assert wb.peer_id == a.welcome.peer_id and wb.accepted, wb  # type: ignore[union-attr]
        topos = wait_each([back, newcomer], lambda x: isinstance(x, m.Topology))
        assert all(isinstance(t, m.Topology) for t in topos), (back.msgs, newcomer.msgs)
        for t in topos:
            assert [p[0] for p in t.ring] == [wb.peer_id, wn.peer_id]  # type: ignore[union-attr]
        epoch = topos[0].epoch  # type: ignore[union-attr]
        for r in (back, newcomer):
            r.send_msg(m.TopologyReady(epoch, True))
        dones = wait_each([back, newcomer], lambda x: isinstance(x, m.TopologyDone))
        assert dones == [m.TopologyDone(epoch, True)] * 2, (back.msgs, newcomer.msgs)
        # And ids keep never repeating: the next newcomer's is new too.
        late = Raw(m2.port)
        clients.append(late)
        assert late.hello().peer_id not in issued | {wn.peer_id}
        m2.check_healthy()
    finally:
        for r in clients:
            r.close()
        stop_process(m1.proc)
        if m2 is not None:
            stop_process(m2.proc)


# --------------------------------------------------------------------------- fuzz under load


def _valid_p2m(rng: random.Random) -> list[bytes]:
    return [
        m.Hello(
            PROTOCOL_VERSION, rng.randrange(3), rng.randrange(1, 65536), "h" * rng.randrange(4)
        ).encode(),
        m.Heartbeat(rng.randrange(1 << 40)).encode(),
        m.UpdateTopology(rng.randrange(100)).encode(),
        m.TopologyReady(rng.randrange(50), rng.random() < 0.5, [1, 2, 3], "x").encode(),
        m.CollectiveInitiate(rng.randrange(4), rng.randrange(1, 9), 1 << 18, 0, 0, 0).encode(),
        m.CollectiveWithdraw(rng.randrange(4), rng.randrange(1, 9), "fuzz").encode(),
        m.VerdictQuery(rng.randrange(1 << 40)).encode(),
        m.CollectiveComplete(rng.randrange(4), rng.randrange(1, 100), False, "forged").encode(),
        m.Leave("fuzz").encode(),
        m.SyncSharedState(0, 0, [("w", 0, 4, [1], b"\x00" * 16, False)]).encode(),
        m.SyncDone(1, False, "forged").encode(),
        m.Welcome(1, 0.5, 3.0, True).encode(),
        m.P2PHello(1, 1, 0).encode(),
    ]


_CONFUSERS: list[Any] = [
    None,
    True,
    -1,
    2**64 - 1,
    0.5,
    float("nan"),
    "",
    "x" * 600,
    b"\x00",
    [],
    [[]],
    {},
    {"k": 1},
    msgpack.ExtType(1, b"a"),
]


def _confuse(obj: Any, rng: random.Random) -> Any:
    if isinstance(obj, list) and obj and rng.random() < 0.8:
        obj = list(obj)
        i = rng.randrange(len(obj))
        obj[i] = _confuse(obj[i], rng)
        return obj
    return rng.choice(_CONFUSERS)


def malformed(frames: list[bytes], rng: random.Random) -> bytes:
    """One malformed frame derived from a valid one (see tests/test_wire_fuzz.py)."""
    base = rng.choice(frames)
    body, mtype = base[HEADER.size :], base[3]
    op = rng.randrange(9)
    if op == 0:
        b = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == 1:
        cut = body[: rng.randrange(len(body))]
        return hdr(mtype, len(cut)) + cut
    if op == 2:
        n = rng.choice([0, len(body) - 1, MAX_CONTROL_FRAME + 1, 2**32 - 1, rng.randrange(2**32)])
        return hdr(mtype, max(n, 0)) + body
    if op == 3:
        other = rng.choice(frames)
        return base[: rng.randrange(len(base))] + other[rng.randrange(len(other)) :]
    if op == 4:
        new = msgpack.packb(_confuse(msgpack.unpackb(body), rng), use_bin_type=rng.random() < 0.7)
        return hdr(mtype, len(new)) + new
    if op == 5:
        return hdr(rng.randrange(256), len(body), version=rng.choice([VERSION, 0, 1, 3])) + body
    if op == 6:
        return rng.randbytes(rng.randint(1, 48))
    if op == 7:
        bomb = b"\x91" * rng.randint(200, 5000)
        return hdr(mtype, len(bomb)) + bomb
    new = msgpack.packb(msgpack.unpackb(body)[: rng.randrange(4)] + [0] * rng.randrange(3))
    return hdr(mtype, len(new)) + new


async def _fuzz_connection(
    port: int, payload: bytes, stats: Counter, linger: float, source: str
) -> None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), timeout=10
        )
    except (OSError, TimeoutError):
        stats["connect_failed"] += 1
        return
    dec = FrameDecoder()
    try:
        writer.write(payload)
        with contextlib.suppress(OSError):
            await writer.drain()
        deadline = asyncio.get_running_loop().time() + linger
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                stats["left_open"] += 1
                break
            try:
                data = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                stats["left_open"] += 1
                break
            except OSError:
                stats["reset"] += 1
                break
            if not data:
                stats["closed_by_master"] += 1
                break
            for t, body in dec.feed(data):  # the master's output must decode
                msg = m.decode(t, body)
                stats[f"got_{type(msg).__name__}"] += 1
                if isinstance(msg, m.Kick):
                    stats[f"kick_{KickCode.parse(msg.code).name.lower()}"] += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _progress(ctl: Path, n: int) -> list[int]:
    out = []
    for i in range(n):
        try:
            out.append(int((ctl / f"progress-{i}").read_text() or 0))
        except (OSError, ValueError):
            out.append(-1)
    return out


async def _fuzz(
    port: int,
    ctl: Path,
    procs: list[subprocess.Popen[bytes]],
    min_frames: int,
    min_iters: int,
    budget_s: float,
) -> tuple[int, int, Counter]:
    """Throw malformed frames at the master until ``min_frames`` were sent *and* every worker
    finished ``min_iters`` iterations since the start (or one exited, or ``budget_s`` passed).
    Returns (frames, connections, stats)."""
    world = len(procs)
    rng = random.Random(20240607)
    frames = _valid_p2m(rng)
    hello = m.Hello(PROTOCOL_VERSION, 0, 9999).encode()
    stats: Counter = Counter()
    sent = conns = 0
    start_iters = _progress(ctl, world)
    deadline = time.monotonic() + budget_s
    enough = asyncio.Event()

    async def monitor() -> None:  # polls the workers' progress files
        while time.monotonic() < deadline:
            now = _progress(ctl, world)
            if sent >= min_frames and all(b - a >= min_iters for a, b in zip(start_iters, now)):
                break
            if any(p.poll() is not None for p in procs):
                break  # a worker failed: stop and let the test report it
            await asyncio.sleep(0.2)
        enough.set()

    async def one_task(source: str) -> None:
        nonlocal sent, conns
        while not enough.is_set():
            k = 1 if rng.random() < 0.7 else rng.randint(2, 3)  # mostly one frame per connection
            bad = [malformed(frames, rng) for _ in range(k)]
            prefix = hello if rng.random() < 0.3 else b""
            sent += k
            conns += 1
            await _fuzz_connection(port, prefix + b"".join(bad), stats, 0.3, source)

    # One address per task (one connection at a time each): the unauthenticated caps, which
    # close the oldest connections of a crowded address as BUSY, stay out of the fuzz.
    await asyncio.gather(monitor(), *(one_task(f"127.0.4.{i + 1}") for i in range(48)))
    return sent, conns, stats


@pytest.mark.timeout(240)
def test_fuzz_storm_while_real_peers_all_reduce(tmp_path: Path) -> None:
    world = 3
    mp = start_master(tmp_path / "master.log", {})
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(world):
            with (tmp_path / f"worker{i}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(HERE / "fuzz_peer_worker.py"),
                            f"127.0.0.1:{mp.port}",
                            str(i),
                            str(world),
                            str(ctl),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

        def logs() -> str:
            parts = [f"--- master\n{mp.log_text()[-3000:]}"]
            for i in range(world):
                text = (tmp_path / f"worker{i}.log").read_text(errors="replace")
                parts.append(f"--- worker {i}\n{text[-3000:]}")
                res = ctl / f"result-{i}.json"
                if res.exists():
                    parts.append(res.read_text()[-3000:])
            return "\n".join(parts)

        # Wait until the run is formed and every peer has all-reduced at least once.
        deadline = time.monotonic() + 90
        while min(_progress(ctl, world)) < 1:
            dead = [p.returncode for p in procs if p.poll() is not None]
            assert not dead, f"a worker exited early ({dead})\n{logs()}"
            assert time.monotonic() < deadline, f"peers never formed a run\n{logs()}"
            time.sleep(0.05)  # polling the progress files, not synchronising on time

        rss_before = _rss_bytes(mp.proc.pid)
        (ctl / "fuzzing").touch()
        t0 = time.monotonic()
        frames, conns, stats = asyncio.run(
            _fuzz(mp.port, ctl, procs, min_frames=FUZZ_FRAMES, min_iters=3, budget_s=150)
        )
        fuzz_s = time.monotonic() - t0
        rss_after = _rss_bytes(mp.proc.pid)
        (ctl / "fuzzing").unlink()
        (ctl / "stop").touch()

        deadline = time.monotonic() + 60
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {p.pid} did not finish\n{logs()}")
        results = [json.loads((ctl / f"result-{i}.json").read_text()) for i in range(world)]
        for p, res in zip(procs, results):
            assert p.returncode == 0 and "error" not in res, f"{res.get('error')}\n{logs()}"

        # The storm really happened, and really overlapped the all-reduces.
        assert frames >= FUZZ_FRAMES >= 10_000, (frames, stats)
        assert conns >= FUZZ_FRAMES // 2, (conns, stats)
        assert stats["connect_failed"] == 0, stats
        # At least 10k malformed frames reached the master's decoder and were refused.
        assert stats["kick_protocol"] >= 10_000, stats
        assert stats["kick_busy"] == 0, stats
        assert all(r["during_fuzz"] >= 3 for r in results), [r["during_fuzz"] for r in results]
        # Nothing accumulates per connection: memory after the storm is about what it was.
        assert rss_after - rss_before < 64 << 20, (rss_before, rss_after)
        # Correct, byte-identical results on every peer, every iteration; nobody evicted.
        assert len({r["iterations"] for r in results}) == 1
        assert results[0]["hashes"] == results[1]["hashes"] == results[2]["hashes"]
        assert len({r["peer_id"] for r in results}) == world
        # The master survived, logged no traceback, and still admits a fresh peer.
        mp.check_healthy()
        admit_fresh_peer(mp.port)
        mp.check_healthy()
        print(
            f"fuzz: {frames} malformed frames over {conns} connections in {fuzz_s:.1f}s; "
            f"peers ran {results[0]['iterations']} iterations ({results[0]['during_fuzz']} during "
            f"the fuzz); master RSS {rss_before >> 20} -> {rss_after >> 20} MiB; "
            f"master replies: {dict(stats)}"
        )
    finally:
        for p in procs:
            stop_process(p)
        stop_process(mp.proc)
