"""Same-host shared-memory ring links (pccl.peer.shm_link), on real loopback sockets.

The 2-ring of ``test_p2p_hostile`` (two real :class:`~pccl.peer.p2p.P2PNode`s, each the other's
predecessor) carries real :class:`~pccl.peer.ring.RingOp`s: payloads through the segments must
give the exact sums that TCP gives, across ring wrap-arounds and operations of every size; a
token holder offering a segment that is not a pccl peer's gets a TCP stream, never a mapping;
a writer blocked on a full ring ends when its receiver goes; nothing is left in /dev/shm.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from pccl.peer import shm_link
from pccl.peer.p2p import P2PNode
from pccl.peer.ring import BufferPool, RingOp
from pccl.peer.shm_link import ShmReader, ShmWriter
from test_p2p_hostile import (
    B_ID,
    EPOCH,
    OP_ID,
    TOKEN,
    _config,
    _read_challenge,
    _recv_exactly,
    _Reduce,
    _ring,
    _until,
)

from pccl import messages as m
from pccl.auth import prove
from pccl.errors import ProtocolError
from pccl.frame import HEADER, MsgType
from pccl.types import DType, Quantization, ReduceOp

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not shm_link.AVAILABLE, reason="no futex / /dev/shm here"),
]


def _ours() -> set[str]:
    """Segment names this process created that still exist."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"pccl-{os.getpid()}-")}


def _links(node: object) -> list[object]:
    return [s.shm for s in node.tx]  # type: ignore[attr-defined]


async def test_payloads_through_shared_memory_equal_tcp_across_wraps_and_sizes() -> None:
    # 256 KiB frames through a 1 MiB ring: every operation wraps it several times, and odd
    # sizes leave short frames, so the start-at-the-next-ring-start rule is exercised.
    sizes = [(1 << 20) + 7, 3, 1, (1 << 18) - 1, 5 * (1 << 18) + 12345]
    for shm_bytes in (1 << 20, 0):
        cfg = _config(chunk_bytes=1 << 18, shm_link_bytes=shm_bytes)
        async with _ring(cfg) as (a, b):
            assert all(x is not None for x in _links(a) + _links(b)) == bool(shm_bytes)
            assert a.stats["shm_links"] == b.stats["shm_links"] == (2 if shm_bytes else 0)
            assert not _ours(), "segments are unlinked once both ends hold them"
            for i, n in enumerate(sizes * 2):  # out of place, then in place
                red = _Reduce((a, b), OP_ID + i, n=n, in_place=i >= len(sizes)).register()
                try:
                    await red.run()  # asserts the exact sum on both peers
                finally:
                    red.close()
            assert a.stale_frames == b.stale_frames == 0
    assert not _ours()


def _hello_ack(port: int, name: str, cap: int) -> m.P2PHelloAck:
    """Dial as a token holder (our predecessor, stream 7), offer segment ``name``, read the ack."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        nonce = _read_challenge(s)
        proof = prove(TOKEN, b"pccl-p2p", nonce, B_ID, EPOCH, 7, name.encode(), cap)
        s.sendall(m.P2PHello(B_ID, EPOCH, 7, proof, name, cap).encode())
        _, _, mtype, length = HEADER.unpack(_recv_exactly(s, HEADER.size))
        assert mtype == MsgType.P2P_HELLO_ACK
        ack = m.decode(MsgType.P2P_HELLO_ACK, _recv_exactly(s, length))
        assert isinstance(ack, m.P2PHelloAck)
        return ack


async def test_a_segment_that_is_not_a_pccl_peers_is_never_mapped(tmp_path: object) -> None:
    cap = 1 << 20
    target = os.path.join(str(tmp_path), "victim")
    with open(target, "wb") as f:
        f.truncate(64 + cap)
    tag = os.urandom(8).hex()
    link = f"/dev/shm/pccl-1-{tag}"
    wrong_size = f"/dev/shm/pccl-2-{tag}"
    os.symlink(target, link)
    with open(wrong_size, "wb") as f:
        f.truncate(64 + cap + 1)
    good = ShmWriter(cap)
    bogus = {
        "path traversal": ("../../../etc/passwd", cap),
        "absolute path": ("/etc/passwd", cap),
        "missing": (f"pccl-3-{tag}", cap),
        "symlink": (f"pccl-1-{tag}", cap),
        "wrong size": (f"pccl-2-{tag}", cap),
        "huge ring": (good.name, 1 << 40),
        "tiny ring": (good.name, 4096),
    }
    try:
        async with _ring() as (a, b):
            before = a.stats["shm_links"]
            for case, (name, size) in bogus.items():
                ack = await asyncio.to_thread(_hello_ack, a.port, name, size)
                assert ack.ok and not ack.shm, case
            assert a.stats["shm_links"] == before
            assert os.path.exists(wrong_size) and os.path.islink(link)
            assert os.path.getsize(target) == 64 + cap  # never opened for writing, never grown
            ack = await asyncio.to_thread(_hello_ack, a.port, good.name, cap)
            assert ack.ok and ack.shm
            assert a.stats["shm_links"] == before + 1
            assert not os.path.exists(good.path), "the receiver unlinks a segment it maps"
            await _until(lambda: len(a.rx.get(B_ID, ())) == 2, 10, "the dialler's stream to go")
            red = _Reduce((a, b), OP_ID).register()  # the ring is unharmed
            try:
                await red.run()
            finally:
                red.close()
    finally:
        good.unlink()
        for p in (link, wrong_size):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


async def test_a_writer_blocked_on_a_full_ring_ends_when_its_receiver_goes() -> None:
    cfg = _config(chunk_bytes=1 << 18, shm_link_bytes=1 << 20, local_streams=1)
    async with _ring(cfg) as (a, b):
        assert all(x is not None for x in _links(a))
        red = _Reduce((a, b), OP_ID, n=4 << 20)  # 16 MiB per peer: 64 frames, ring holds 4
        a.register(red.rings[0])
        red.rings[0].begin()  # b never registers it: b parks, the ring fills, a's writer waits
        await _until(lambda: bool(b.parked), 10, "b's stream to park")
        await asyncio.sleep(0.3)
        assert not red.rings[0].finished
        senders = [t for t in threading.enumerate() if t.name == "pccl-send"]
        assert senders
        t0 = time.monotonic()
        await b.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(red.rings[0].future, 5)
        assert time.monotonic() - t0 < 3.0
        await _until(lambda: not any(t.is_alive() for t in senders), 5, "sender threads to end")
        red.close()
    assert not _ours()


def test_the_reader_refuses_a_payload_larger_than_its_ring() -> None:
    w = ShmWriter(1 << 20)
    try:
        r = ShmReader.attach(w.name, 1 << 20)
        with pytest.raises(ProtocolError):
            r.take((1 << 20) + 1)
        # The ring rule: a payload that would cross the end starts at the next ring start.
        data = np.arange(300_000, dtype=np.uint8)
        for _ in range(5):
            assert w.write(memoryview(data), lambda: False)
            got = r.take(data.size)
            np.testing.assert_array_equal(got, data)
            r.release()
        assert r.pos == w.pos == (1 << 20) + 2 * 300_000  # the 4th skipped the ring's tail
    finally:
        w.unlink()


@pytest.mark.parametrize("kw", [{"shm_link_bytes": 0}, {"send_threads": False}])
async def test_without_shm_link_bytes_or_send_threads_payloads_stay_on_tcp(
    kw: dict[str, int | bool],
) -> None:
    async with _ring(_config(**kw)) as (a, b):
        assert _links(a) == _links(b) == [None, None]
        assert a.stats["shm_links"] == b.stats["shm_links"] == 0
        red = _Reduce((a, b), OP_ID).register()
        try:
            await red.run()
        finally:
            red.close()
    with pytest.raises(ValueError):
        _config(shm_link_bytes=4096)


def test_a_full_tmpfs_refuses_the_segment_at_creation_not_with_sigbus_later(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    mnt = os.path.join(str(tmp_path), "tiny")
    os.mkdir(mnt)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], check=False)
    if mount.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        monkeypatch.setattr(shm_link, "_DIR", mnt)
        for cap in (2 << 20, 1 << 20):  # neither fits: 1 MiB of tmpfs, plus the control block
            with pytest.raises(OSError):
                ShmWriter(cap)
            assert os.listdir(mnt) == []  # nothing left behind
    finally:
        subprocess.run(["umount", mnt], check=False)


async def _ring_results(
    world: int, shm_bytes: int, n: int, quant: Quantization, op: ReduceOp, in_place: bool
) -> list[np.ndarray]:
    """Every peer's result of one all-reduce over a ``world``-ring of real nodes."""
    cfg = _config(chunk_bytes=1 << 16, shm_link_bytes=shm_bytes)
    nodes = [P2PNode(cfg, 2, TOKEN) for _ in range(world)]
    ids = [100 + r for r in range(world)]
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal(n).astype(np.float32) * (r + 1) for r in range(world)]
    try:
        for node in nodes:
            await node.start("127.0.0.1", 0)
        for r, node in enumerate(nodes):
            node.announce(EPOCH, ids[r], ids[r - 1])
        async with asyncio.timeout(20):
            await asyncio.gather(
                *(
                    node.connect_next(
                        ids[(r + 1) % world], "127.0.0.1", nodes[(r + 1) % world].port, EPOCH
                    )
                    for r, node in enumerate(nodes)
                )
            )
        for node in nodes:
            assert node.stats["shm_links"] == (2 if shm_bytes else 0)
        outs = [x.copy() if in_place else np.full(n, np.nan, np.float32) for x in inputs]
        rings = []
        for r, node in enumerate(nodes):
            turn = itertools.count()

            def send(hdr: bytes, payload: memoryview, node: P2PNode = node, turn=turn) -> None:
                node.tx[next(turn) % len(node.tx)].send(hdr, payload)

            rings.append(
                RingOp(
                    op_id=OP_ID,
                    tag=0,
                    rank=r,
                    world=world,
                    src=outs[r] if in_place else inputs[r],
                    work=outs[r],
                    dtype=DType.FLOAT32,
                    op=op,
                    quant=quant,
                    sub=(1 << 16) // 4,
                    block=512,
                    send_frame=send,
                    pool=BufferPool(),
                )
            )
        for node, ring in zip(nodes, rings):
            node.register(ring)
        for ring in rings:
            ring.begin()
        await asyncio.wait_for(asyncio.gather(*(x.future for x in rings)), 30)
        for node, ring in zip(nodes, rings):
            node.unregister(ring)
            ring.release()
        assert all(node.stale_frames == 0 for node in nodes)
        return outs
    finally:
        for node in nodes:
            await node.close()


@pytest.mark.parametrize(
    "quant,op",
    [
        (Quantization.UINT8, ReduceOp.SUM),
        (Quantization.UINT8, ReduceOp.AVG),
        (Quantization.UINT8, ReduceOp.MAX),
        (Quantization.INT4, ReduceOp.SUM),
        (Quantization.BF16, ReduceOp.SUM),
        (Quantization.FP16, ReduceOp.AVG),
    ],
)
async def test_quantized_frames_read_from_the_ring_give_tcps_bits(
    quant: Quantization, op: ReduceOp
) -> None:
    """Quantized reduce-scatter hops and last all-gather frames are decoded straight from the
    shared ring (no copy out): every peer's result must equal, bit for bit, what the same ring
    gives over TCP, with 3 peers (a forwarding hop and a forwarded all-gather frame) and an
    odd length (a short last sub-chunk, so ring payloads start at unaligned offsets)."""
    n = 5 * (1 << 14) + 333
    for in_place in (False, True):
        over_tcp = await _ring_results(3, 0, n, quant, op, in_place)
        over_shm = await _ring_results(3, 1 << 20, n, quant, op, in_place)
        for a, b in zip(over_tcp, over_shm):
            assert a.view(np.uint32).tobytes() == b.view(np.uint32).tobytes()
        for other in over_shm[1:]:  # and the peers agree
            np.testing.assert_array_equal(other, over_shm[0])
        assert not np.isnan(over_shm[0]).any()
