"""Strangers at a peer's p2p port, on real loopback sockets, without a master.

Two :class:`~pccl.peer.p2p.P2PNode`s are wired as a 2-ring (each is the other's predecessor and
successor) with a real :class:`~pccl.peer.ring.RingOp` registered on both. Port scanners, HTTP
probes, garbage, oversized and mis-typed headers, forged or stale hellos and floods of half-open
connections hit the listener; each test then checks that the registered operation was not failed
and still completes with exact bytes, that the node's memory did not grow, and how the node
counted the connections. State serving is checked for its progress deadline and for
``close()`` leaving no task behind, and the requester side (``fetch_entries``) end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import socket
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
import pytest
import xxhash
from pccl.peer.p2p import P2PNode
from pccl.peer.ring import BufferPool, RingOp
from pccl.peer.rx_stream import _NEXT, _ON_FULL, PRE_AUTH, RING_DATA, RxState
from pccl.peer.state_sync import fetch_entries

from pccl import messages as m
from pccl.auth import prove
from pccl.config import Config
from pccl.errors import SharedStateError
from pccl.frame import HEADER, MAGIC, PRE_AUTH_MAX_BODY, VERSION, MsgType, encode_data_header
from pccl.shared_state import SharedState
from pccl.types import DType, Quantization, ReduceOp

pytestmark = pytest.mark.timeout(120)

TOKEN = b"hostile-p2p-test-token-0123456789"
EPOCH = 3
A_ID, B_ID = 11, 22
OP_ID = 41
N = 1 << 20  # float32 elements per all-reduce (4 MiB)
MIB = 1 << 10  # VmRSS is in KiB


def _config(**kw: float | bool) -> Config:
    base: dict[str, float | bool] = {
        "handshake_timeout_s": 5.0,
        "progress_timeout_s": 10.0,
        "chunk_bytes": 1 << 20,
        "local_streams": 0,  # two striped streams even on loopback
    }
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _header(mtype: int, length: int, *, magic: int = MAGIC, version: int = VERSION) -> bytes:
    return HEADER.pack(magic, version, mtype, length)


async def _until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` on the loop until true; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


@contextlib.asynccontextmanager
async def _ring(cfg: Config | None = None, *, wire: bool = True) -> AsyncIterator[list[P2PNode]]:
    """Nodes A (rank 0) and B (rank 1) of a 2-ring; wired unless ``wire`` is false."""
    cfg = cfg or _config()
    nodes = [P2PNode(cfg, 2, TOKEN), P2PNode(cfg, 2, TOKEN)]
    a, b = nodes
    try:
        await a.start("127.0.0.1", 0)
        await b.start("127.0.0.1", 0)
        a.announce(EPOCH, A_ID, B_ID)
        b.announce(EPOCH, B_ID, A_ID)
        if wire:
            await _wire(a, b)
        yield nodes
    finally:
        for node in nodes:
            await node.close()


async def _wire(a: P2PNode, b: P2PNode) -> None:
    async with asyncio.timeout(20):
        await asyncio.gather(
            a.connect_next(B_ID, "127.0.0.1", b.port, EPOCH),
            b.connect_next(A_ID, "127.0.0.1", a.port, EPOCH),
        )


class _Reduce:
    """One float32 SUM all-reduce, registered on both nodes of a 2-ring, out of place unless
    ``in_place``."""

    def __init__(
        self, nodes: Sequence[P2PNode], op_id: int, n: int = N, in_place: bool = False
    ) -> None:
        self.nodes = nodes
        self.inputs = [(np.arange(n, dtype=np.float32) % 1000) * (r + 1) for r in range(2)]
        self.want = self.inputs[0] + self.inputs[1]
        if in_place:  # each peer's input is its result buffer
            self.outs = [x.copy() for x in self.inputs]
        else:
            self.outs = [np.empty(n, dtype=np.float32) for _ in range(2)]
        self.rings: list[RingOp] = []
        for rank, node in enumerate(nodes):
            turn = itertools.count()

            def send(
                hdr: bytes,
                payload: memoryview,
                node: P2PNode = node,
                turn: itertools.count[int] = turn,
            ) -> None:
                tx = node.tx  # the streams wired when the operation begins
                tx[next(turn) % len(tx)].send(hdr, payload)

            self.rings.append(
                RingOp(
                    op_id=op_id,
                    tag=0,
                    rank=rank,
                    world=2,
                    src=self.outs[rank] if in_place else self.inputs[rank],
                    work=self.outs[rank],
                    dtype=DType.FLOAT32,
                    op=ReduceOp.SUM,
                    quant=Quantization.NONE,
                    sub=node.config.chunk_bytes // 4,
                    block=4096,
                    send_frame=send,
                    pool=BufferPool(),
                )
            )

    def register(self) -> _Reduce:
        for node, ring in zip(self.nodes, self.rings):
            node.register(ring)
        return self

    def untouched(self) -> bool:
        return not any(r.finished for r in self.rings)

    async def run(self, timeout: float = 30.0) -> None:
        """Begin on both peers and check every peer ends with the exact sum."""
        for ring in self.rings:
            ring.begin()
        await asyncio.wait_for(asyncio.gather(*(r.future for r in self.rings)), timeout)
        for out in self.outs:
            np.testing.assert_array_equal(out, self.want)

    def close(self) -> None:
        for node, ring in zip(self.nodes, self.rings):
            ring.close()
            node.unregister(ring)
            ring.release()


# ------------------------------------------------------------------------ blocking clients


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    return buf


def _read_challenge(s: socket.socket) -> bytes:
    head = _recv_exactly(s, HEADER.size)
    _, _, mtype, length = HEADER.unpack(head)
    assert mtype == MsgType.P2P_CHALLENGE
    ch = m.decode(MsgType.P2P_CHALLENGE, _recv_exactly(s, length))
    assert isinstance(ch, m.P2PChallenge)
    return ch.nonce


def _read_to_close(s: socket.socket) -> bytes:
    """Everything the peer sends until it closes (EOF or reset); raises on the socket timeout."""
    out = b""
    try:
        while chunk := s.recv(1 << 16):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _replies(data: bytes) -> list[m.Message]:
    msgs, pos = [], 0
    while pos + HEADER.size <= len(data):
        _, _, mtype, length = HEADER.unpack_from(data, pos)
        msgs.append(m.decode(MsgType(mtype), data[pos + HEADER.size : pos + HEADER.size + length]))
        pos += HEADER.size + length
    return msgs


def _exchange(port: int, make: Callable[[bytes], bytes], timeout: float) -> list[m.Message]:
    """Connect, read the challenge, send ``make(nonce)``, and read until the peer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        nonce = _read_challenge(s)
        with contextlib.suppress(OSError):  # the peer may close while we still send
            s.sendall(make(nonce))
        return _replies(_read_to_close(s))


def _open_many(
    port: int, count: int, sources: Sequence[str], first: Callable[[int], bytes]
) -> list[socket.socket]:
    """Open ``count`` connections round-robin from ``sources``; connection i sends ``first(i)``
    and nothing more (half-open: it never completes a hello)."""
    socks = []
    for i in range(count):
        s = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(sources[i % len(sources)], 0)
        )
        if data := first(i):
            s.sendall(data)
        socks.append(s)
    return socks


def _is_closed_by_peer(s: socket.socket, wait: float = 0.0) -> bool:
    """Whether the peer closed ``s`` (EOF or reset) within ``wait`` seconds; whatever it sent
    before (its challenge) is skipped."""
    deadline = time.monotonic() + wait
    s.setblocking(False)
    while True:
        try:
            if not s.recv(1 << 16):
                return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            select.select([s], [], [], 0.05)
        except ConnectionResetError:
            return True


def _data_frame(op_id: int) -> bytes:
    """A well-formed data frame for chunk 1 at step 0 of a 2-ring op (what rank 1 sends)."""
    count = 4096
    return encode_data_header(op_id, 0, 0, 1, 0, count, count * 4) + bytes(count * 4)


# ------------------------------------------------------------------------ hostile bytes

#: What a stranger sends after the challenge, by name ("silence": then nothing, held open).
HOSTILE: dict[str, Callable[[bytes], bytes]] = {
    "garbage_8_bytes": lambda nonce: b"\xde\xad\xbe\xef\x00\x01\x02\x03",
    "http_get": lambda nonce: b"GET /health HTTP/1.1\r\nHost: peer\r\n\r\n",
    "tls_client_hello": lambda nonce: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
    "old_protocol_version": lambda nonce: _header(MsgType.P2P_HELLO, 40, version=1) + bytes(40),
    "unknown_type": lambda nonce: _header(200, 0),
    "oversized_hello": lambda nonce: (
        _header(MsgType.P2P_HELLO, PRE_AUTH_MAX_BODY + 1) + bytes(PRE_AUTH_MAX_BODY + 1)
    ),
    "data_frame_for_the_running_op": lambda nonce: _data_frame(OP_ID),
    "state_request_claiming_16_mib": lambda nonce: (
        _header(MsgType.P2P_STATE_REQUEST, 16 << 20) + bytes(1 << 16)
    ),
    "hello_ack_from_a_dialler": lambda nonce: m.P2PHelloAck(True).encode(),
    "malformed_hello_body": lambda nonce: _header(MsgType.P2P_HELLO, 12) + b"\xc1" * 12,
    "hello_with_a_forged_proof": lambda nonce: (
        m.P2PHello(B_ID, EPOCH, 0, os.urandom(32)).encode() + _data_frame(OP_ID)
    ),
    "hello_with_a_replayed_proof": lambda nonce: (
        m.P2PHello(
            B_ID, EPOCH, 0, prove(TOKEN, b"pccl-p2p", os.urandom(32), B_ID, EPOCH, 0, b"", 0)
        ).encode()
        + _data_frame(OP_ID)
    ),
    "state_hello_with_a_forged_proof": lambda nonce: (
        m.StateHello(B_ID, 1, os.urandom(32)).encode() + m.StateRequest([("w", 0, 4)]).encode()
    ),
    # Token holders, but not our predecessor for this epoch: refused, nothing failed either.
    "stale_epoch_hello": lambda nonce: (
        m.P2PHello(
            B_ID, EPOCH - 1, 0, prove(TOKEN, b"pccl-p2p", nonce, B_ID, EPOCH - 1, 0, b"", 0)
        ).encode()
        + _data_frame(OP_ID)
    ),
    "hello_from_a_non_predecessor": lambda nonce: (
        m.P2PHello(99, EPOCH, 0, prove(TOKEN, b"pccl-p2p", nonce, 99, EPOCH, 0, b"", 0)).encode()
        + _data_frame(OP_ID)
    ),
    "truncated_header_then_silence": lambda nonce: b"PC",
    "truncated_hello_then_silence": lambda nonce: m.P2PHello(B_ID, EPOCH, 0).encode()[:-3],
}
REPLY: dict[str, type[m.Message]] = {
    "hello_with_a_forged_proof": m.P2PHelloAck,
    "hello_with_a_replayed_proof": m.P2PHelloAck,
    "state_hello_with_a_forged_proof": m.StateError,
    "stale_epoch_hello": m.P2PHelloAck,
    "hello_from_a_non_predecessor": m.P2PHelloAck,
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_stranger_never_fails_a_running_operation(case: str) -> None:
    async with _ring(_config(handshake_timeout_s=1.0)) as (a, b):
        red = _Reduce((a, b), OP_ID).register()
        try:
            before = a.stats.copy()
            t0 = time.monotonic()
            got = await asyncio.to_thread(_exchange, a.port, HOSTILE[case], 10.0)
            elapsed = time.monotonic() - t0
            # Only that connection was closed: with a refusal where a hello was judged, else
            # without a word; a silent one at the handshake deadline, every other one for
            # what it sent (counted by cause).
            want = REPLY.get(case)
            if want is None:
                assert got == [], got
            else:
                assert len(got) == 1 and isinstance(got[0], want), got
                assert not getattr(got[0], "ok", False)
            assert elapsed < 5.0, elapsed
            assert red.untouched(), "a stranger's bytes reached the operation"
            delta = a.stats - before
            assert delta["accepted"] == 1
            outcome = {"protocol_error", "rejected", "timed_out"} & set(delta)
            assert len(outcome) == 1 and sum(delta[k] for k in outcome) == 1, delta
            assert (outcome == {"timed_out"}) == ("silence" in case), outcome
            assert not a.unauthenticated and a.stale_frames == 0
            await red.run()  # the ring never noticed
        finally:
            red.close()


async def test_strangers_during_running_all_reduces() -> None:
    async with _ring() as (a, b):
        stop, started = threading.Event(), threading.Event()
        sent = [0]
        probes = [HOSTILE[k](b"") for k in ("garbage_8_bytes", "http_get", "oversized_hello")]
        probes.append(_data_frame(OP_ID + 3))  # aimed at an operation that is running

        def blast() -> None:  # a scanner: connect, say something, hang up, again
            for i in itertools.count():
                if stop.is_set():
                    return
                port = (a.port, b.port)[i % 2]
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=5) as s,
                ):
                    s.sendall(probes[i % len(probes)])
                    sent[0] += 1
                    started.set()

        thread = threading.Thread(target=blast, daemon=True)
        thread.start()
        during = 0
        try:
            assert await asyncio.to_thread(started.wait, 10)
            for i in range(6):
                red = _Reduce((a, b), OP_ID + i, n=4 * N).register()  # 16 MiB
                seen = a.stats["accepted"] + b.stats["accepted"]
                try:
                    await red.run()
                finally:
                    red.close()
                during += a.stats["accepted"] + b.stats["accepted"] - seen
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 10)
        assert during > 0 and sent[0] > 0  # strangers really arrived while operations ran
        assert a.stale_frames == b.stale_frames == 0


# ------------------------------------------------------------------------ memory and caps


async def test_headers_claiming_16_mib_allocate_nothing() -> None:
    """The v1 flaw: a pre-auth state-request header made the peer allocate what it claimed."""
    async with _ring() as (a, b):
        red = _Reduce((a, b), OP_ID).register()
        body = bytes(1 << 16)
        attacks = [
            _header(MsgType.P2P_STATE_REQUEST, 16 << 20) + body,
            _header(MsgType.P2P_STATE_HELLO, 16 << 20) + body,
            _header(MsgType.P2P_HELLO, 16 << 20) + body,
            _header(MsgType.P2P_DATA, 64 << 20) + body,
        ]
        rss0 = _rss_kib()
        tracemalloc.start()
        try:

            def attack() -> list[socket.socket]:
                socks = []
                for i in range(40):  # all held open until the end
                    s = socket.create_connection(("127.0.0.1", a.port), timeout=10)
                    _read_challenge(s)
                    with contextlib.suppress(OSError):
                        s.sendall(attacks[i % len(attacks)])
                    socks.append(s)
                return socks

            socks = await asyncio.to_thread(attack)
            await _until(lambda: a.stats["protocol_error"] >= 40, 10, "40 refusals")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        grew = _rss_kib() - rss0
        print(f"40 headers claiming 16-64 MiB: RSS +{grew} KiB, traced peak {peak >> 10} KiB")
        try:
            assert peak < 2 << 20, peak
            assert grew < 8 * MIB, grew
            assert all(await asyncio.to_thread(lambda: [_is_closed_by_peer(s, 2) for s in socks]))
            assert red.untouched()
            await red.run()
        finally:
            for s in socks:
                s.close()
            red.close()


async def test_a_thousand_connections_are_capped_oldest_evicted_and_cost_little() -> None:
    async with _ring(_config(handshake_timeout_s=60.0)) as (a, b):
        red = _Reduce((a, b), OP_ID).register()
        # Every other connection from 127.0.0.1, the rest from 50 other addresses (10 each).
        sources = [h for i in range(2, 52) for h in ("127.0.0.1", f"127.0.0.{i}")]
        rss0 = _rss_kib()
        base = a.stats["accepted"]  # b's streams
        socks: list[socket.socket] = []
        try:
            socks = await asyncio.to_thread(
                _open_many, a.port, 1000, sources, lambda i: b"PC\x02" if i % 3 == 0 else b""
            )
            await _until(lambda: a.stats["accepted"] == base + 1000, 30, "1000 more connections")
            grew = _rss_kib() - rss0
            stats = a.stats
            print(f"1000 connections: RSS +{grew} KiB, {dict(stats)}")
            assert len(a.unauthenticated) == a.max_unauthenticated == 128
            per_host = {h: len(c) for h, c in a._unauth_by_host.items()}
            assert per_host["127.0.0.1"] == a.max_unauthenticated_per_address == 16
            assert max(per_host.values()) <= 16
            assert stats["evicted_total"] > 0 and stats["evicted_per_address"] > 0
            assert stats["evicted_total"] + stats["evicted_per_address"] == 1000 - 128
            assert grew < 8 * MIB, grew
            # Oldest first: the first connections are gone; the newest 16 of the crowded
            # address and the newest 64 of the others are all still held.
            local, others = socks[0::2], socks[1::2]
            early = await asyncio.to_thread(
                lambda: [_is_closed_by_peer(s, 2.0) for s in socks[:50]]
            )
            late = await asyncio.to_thread(
                lambda: [_is_closed_by_peer(s) for s in local[-16:] + others[-64:]]
            )
            assert all(early) and not any(late)
            assert red.untouched()
            await red.run()
        finally:
            for s in socks:
                s.close()
            red.close()
        await _until(lambda: not a.unauthenticated, 10, "the strangers' connections to close")


async def test_predecessor_connects_while_300_half_open_connections_are_held() -> None:
    async with _ring(_config(handshake_timeout_s=60.0), wire=False) as (a, b):
        socks: list[socket.socket] = []
        stop = threading.Event()
        trickle: list[socket.socket] = []

        def more() -> None:  # new strangers keep arriving from the predecessor's own address
            while not stop.wait(0.005):
                with contextlib.suppress(OSError):
                    trickle.append(socket.create_connection(("127.0.0.1", a.port), timeout=5))

        thread = threading.Thread(target=more, daemon=True)
        try:
            socks = await asyncio.to_thread(_open_many, a.port, 300, ["127.0.0.1"], lambda i: b"")
            await _until(lambda: a.stats["accepted"] >= 300, 30, "300 half-open connections")
            thread.start()
            await _wire(a, b)  # b dials a from 127.0.0.1, behind 300 strangers of that address
            red = _Reduce((a, b), OP_ID).register()
            try:
                await red.run()
            finally:
                red.close()
            assert a.stats["evicted_per_address"] >= 300 - 16
            assert len(a.rx[B_ID]) == 2  # both of b's streams were accepted
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 10)
            for s in socks + trickle:
                s.close()


async def test_silent_connections_close_at_the_handshake_deadline() -> None:
    async with _ring(_config(handshake_timeout_s=1.0)) as (a, b):
        red = _Reduce((a, b), OP_ID).register()
        try:
            socks = await asyncio.to_thread(_open_many, a.port, 20, ["127.0.0.1"], lambda i: b"")
            t = await _until(lambda: a.stats["timed_out"] >= 16, 10, "handshake deadlines")
            assert 0.5 < t < 4.0, t
            assert a.stats["evicted_per_address"] == 4  # 20 from one address, cap 16
            assert all(await asyncio.to_thread(lambda: [_is_closed_by_peer(s, 2.0) for s in socks]))
            assert red.untouched()
            await red.run()
        finally:
            for s in socks:
                s.close()
            red.close()


# ------------------------------------------------------------------------ state serving


def _stalled_requester(port: int, sync_id: int, nbytes: int) -> socket.socket:
    """An authenticated requester that asks for ``nbytes`` and then never reads."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    nonce = _read_challenge(s)
    proof = prove(TOKEN, b"pccl-state", nonce, 5, sync_id)
    s.sendall(
        m.StateHello(5, sync_id, proof).encode() + m.StateRequest([("w", 0, nbytes)]).encode()
    )
    return s


async def test_a_stalled_state_requester_is_cut_off_within_the_progress_deadline() -> None:
    node = P2PNode(_config(progress_timeout_s=1.0), 1, TOKEN)
    await node.start("127.0.0.1", 0)
    state = SharedState({"w": np.ones(8 << 20, dtype=np.float32)})  # 32 MiB
    node.state_server.open(state).sync_id = 7
    s = None
    try:
        s = await asyncio.to_thread(_stalled_requester, node.port, 7, 32 << 20)
        await _until(lambda: bool(node.serving), 10, "serving to start")
        t = await _until(lambda: node.stats["stalled"] == 1, 10, "the stall to be detected")
        assert t < 1.0 + 2.0, t
        await _until(lambda: not node.serving and not node.conns, 5, "the task to end")
    finally:
        await node.close()
        if s is not None:
            s.close()


async def test_a_slow_state_requester_that_keeps_draining_is_served() -> None:
    """The deadline is on progress, not on speed: a 4 MiB piece may take longer than
    ``progress_timeout_s`` to drain as long as bytes keep moving."""
    node = P2PNode(_config(progress_timeout_s=1.0), 1, TOKEN)
    await node.start("127.0.0.1", 0)
    data = np.arange(6 << 20, dtype=np.uint8)
    node.state_server.open(SharedState({"w": data})).sync_id = 7

    def slow() -> bytes:  # about 1.5 MiB/s: the first 4 MiB piece drains in about 2.7 s
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
            nonce = _read_challenge(s)
            proof = prove(TOKEN, b"pccl-state", nonce, 5, 7)
            hello = m.StateHello(5, 7, proof).encode()
            s.sendall(hello + m.StateRequest([("w", 0, data.nbytes)]).encode())
            got = bytearray()
            while chunk := s.recv(1 << 16):
                got += chunk
                time.sleep(0.04)
            return bytes(got)

    try:
        got = await asyncio.to_thread(slow)
        frames = -(-data.nbytes // (4 << 20))
        assert len(got) == data.nbytes + frames * 20  # header + (range, offset) per frame
        assert node.stats["served"] == 1 and node.stats["stalled"] == 0
    finally:
        await node.close()


async def test_close_cancels_and_awaits_every_serving_task() -> None:
    node = P2PNode(_config(progress_timeout_s=60.0), 1, TOKEN)
    await node.start("127.0.0.1", 0)
    state = SharedState({"w": np.ones(8 << 20, dtype=np.float32)})
    node.state_server.open(state).sync_id = 7
    socks = []
    try:
        for _ in range(3):
            socks.append(await asyncio.to_thread(_stalled_requester, node.port, 7, 32 << 20))
        await _until(lambda: len(node.serving) == 3, 10, "three serving tasks")
        tasks = list(node.serving)
        t0 = time.monotonic()
        await node.close()
        assert time.monotonic() - t0 < 2.0
        assert all(t.done() for t in tasks) and not node.serving and not node.conns
    finally:
        for s in socks:
            s.close()


async def test_fetch_sends_hello_then_request_and_verifies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(5)
    src: dict[str, np.ndarray] = {
        "w": rng.standard_normal(3 << 18).astype(np.float32),
        "b": rng.integers(0, 9, 1000),
    }
    sources = [P2PNode(_config(), 1, TOKEN) for _ in range(2)]
    try:
        addresses = {}
        for pid, node in enumerate(sources, start=1):
            addresses[pid] = ("127.0.0.1", await node.start("127.0.0.1", 0))
            node.state_server.open(SharedState({k: v.copy() for k, v in src.items()})).sync_id = 9
        digests = {k: xxhash.xxh3_128(v.data).digest() for k, v in src.items()}
        fetch = [(k, digests[k], [1, 2]) for k in src]

        async def pull(token: bytes, sync_id: int = 9) -> tuple[SharedState, int]:
            dst = SharedState({k: np.zeros_like(v) for k, v in src.items()})
            staging = {k: np.empty(v.nbytes, dtype=np.uint8) for k, v in src.items()}
            res = await fetch_entries(
                my_id=3,
                sync_id=sync_id,
                fetch=fetch,
                addresses=addresses,
                state=dst,
                staging=staging,
                connect_timeout=5.0,
                token=token,
                progress_timeout=5.0,
            )
            return dst, res.rx_bytes

        dst, rx = await pull(TOKEN)
        for k, v in src.items():
            np.testing.assert_array_equal(dst.entries[k].array.view(v.dtype), v)
        assert rx == sum(v.nbytes for v in src.values())
        assert all(n.stats["served"] >= 1 for n in sources)  # the load was spread
        with pytest.raises(SharedStateError, match="every source"):
            await pull(b"not-the-token-but-long-enough")
        assert all(n.stats["rejected"] >= 1 for n in sources)
        # A refusal after authentication reaches the requester with its reason.
        with caplog.at_level("WARNING", "pccl.peer"), pytest.raises(SharedStateError):
            await pull(TOKEN, sync_id=10)
        assert "source refused: not serving sync 10" in caplog.text
        assert all(n.stats["refused"] >= 1 for n in sources)
    finally:
        for node in sources:
            await node.close()


# ------------------------------------------------------------------------ send side, tables


async def test_a_hello_ahead_of_our_epoch_waits_for_its_announcement() -> None:
    async with _ring(wire=False) as (a, b):
        b.announce(EPOCH + 1, B_ID, A_ID)
        dial = asyncio.ensure_future(b.connect_next(A_ID, "127.0.0.1", a.port, EPOCH + 1))
        await _until(lambda: len(a.parked_hellos) == 2, 10, "both hellos to park")
        assert not dial.done()
        a.announce(EPOCH + 1, A_ID, B_ID)  # the master's word reaches a: both are accepted
        await asyncio.wait_for(dial, 10)
        await a.connect_next(B_ID, "127.0.0.1", b.port, EPOCH + 1)
        red = _Reduce((a, b), OP_ID).register()
        try:
            await red.run()
        finally:
            red.close()


async def test_frames_ahead_of_registration_park_then_land() -> None:
    async with _ring() as (a, b):
        red = _Reduce((a, b), OP_ID)
        b.register(red.rings[1])
        red.rings[1].begin()  # b sends before a knows the operation: a's streams park
        await _until(lambda: bool(a.parked), 10, "a stream to park")
        a.register(red.rings[0])
        red.rings[0].begin()
        try:
            await asyncio.wait_for(asyncio.gather(*(r.future for r in red.rings)), 30)
            for out in red.outs:
                np.testing.assert_array_equal(out, red.want)
            assert not a.parked and a.stale_frames == 0
        finally:
            red.close()


async def test_a_commenced_operation_registered_after_a_later_one_still_lands() -> None:
    """Commenced X then Y; this peer registers Y first (X is still copying its input): X's
    frames must park, not be judged stale because a higher id registered."""
    x, y = OP_ID, OP_ID + 1
    async with _ring() as (a, b):
        rx, ry = _Reduce((a, b), x), _Reduce((a, b), y)
        try:
            for node in (a, b):
                node.expect(x)
                node.expect(y)
            for red in (rx, ry):
                b.register(red.rings[1])
                red.rings[1].begin()
            a.register(ry.rings[0])
            ry.rings[0].begin()
            await _until(lambda: bool(a.parked), 10, "a stream to park on x")
            await asyncio.sleep(0.2)
            assert not rx.rings[0].finished and a.stale_frames == 0
            a.register(rx.rings[0])
            rx.rings[0].begin()
            futs = [r.future for red in (rx, ry) for r in red.rings]
            await asyncio.wait_for(asyncio.gather(*futs), 30)
            for red in (rx, ry):
                for out in red.outs:
                    np.testing.assert_array_equal(out, red.want)
            assert not a.parked and a.stale_frames == 0 and not a.expected
        finally:
            rx.close()
            ry.close()


async def test_a_given_up_operation_discards_its_parked_frames_and_the_stream_goes_on() -> None:
    """An attempt that ends before registering (say, its input copy failed) gives its op id
    up: the frames parked for it are dropped as stale and the next operation runs on the same
    streams."""
    x, y = OP_ID, OP_ID + 1
    async with _ring() as (a, b):
        rx = _Reduce((a, b), x)
        ry = _Reduce((a, b), y)
        try:
            a.expect(x)
            b.register(rx.rings[1])
            rx.rings[1].begin()
            await _until(lambda: bool(a.parked), 10, "a stream to park on x")
            a.give_up(x)
            await _until(lambda: not a.parked and a.stale_frames > 0, 10, "x's frames dropped")
            rx.rings[1].fail("the peer gave up on x")
            assert len(a.rx[B_ID]) == 2  # both streams from b still open
            await ry.register().run()
        finally:
            rx.close()
            ry.close()


async def test_a_garbage_successor_fails_the_dial_not_the_operations() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\xde\xad\xbe\xef" * 4)
        await writer.drain()
        await reader.read()
        writer.close()

    fake = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = fake.sockets[0].getsockname()[1]
    async with _ring(wire=False) as (a, b):
        red = _Reduce((a, b), OP_ID).register()
        try:
            with pytest.raises(ConnectionError):
                await a.connect_next(B_ID, "127.0.0.1", port, EPOCH)
            assert red.untouched()
            await _wire(a, b)
            await red.run()
        finally:
            red.close()
            fake.close()
            await fake.wait_closed()


def test_the_authentication_boundary_is_in_the_tables() -> None:
    assert set(_ON_FULL) == set(RxState) == set(_NEXT)
    entry = {RxState.PARKED_HELLO, RxState.FRAME_HDR, RxState.STATE_REQUEST, RxState.PROBE}
    for state in PRE_AUTH:  # out of pre-auth only through a judged hello, or closed
        assert _NEXT[state] <= PRE_AUTH | entry | {RxState.CLOSED}
    assert {s for s in PRE_AUTH if _NEXT[s] & entry} == {RxState.HELLO_BODY}
    for state in RING_DATA:  # a ring stream never turns into anything else
        assert _NEXT[state] <= RING_DATA | {RxState.CLOSED}
    assert _NEXT[RxState.SERVING] == {RxState.CLOSED} and not _NEXT[RxState.CLOSED]
    assert _NEXT[RxState.PROBE] == {RxState.PROBE, RxState.CLOSED}  # a prober stays one
    assert not (RING_DATA & PRE_AUTH)
