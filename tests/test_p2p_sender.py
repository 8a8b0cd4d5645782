"""The per-stream sender thread (:class:`pccl.peer.p2p._Sender`) on real loopback sockets."""

from __future__ import annotations

import asyncio
import os
import socket

import numpy as np
import pytest
from pccl.peer.p2p import _Sender

pytestmark = pytest.mark.timeout(30)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
    c.setblocking(False)  # as a transport's socket is
    return c, s


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, min(1 << 20, n - len(buf)))
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    return bytes(buf)


def test_frames_arrive_in_order_and_stop_closes_the_duplicate() -> None:
    async def main() -> None:
        base = _open_fds()
        c, s = _pair()
        s.setblocking(False)
        errors: list[OSError] = []
        sender = _Sender(c.fileno(), errors.append)
        rng = np.random.default_rng(3)
        frames = [(bytes([i]) * 7, rng.integers(0, 256, 3 << 20, dtype=np.uint8)) for i in range(6)]
        total = sum(7 + p.nbytes for _, p in frames)
        reader = asyncio.get_running_loop().create_task(_read_exactly(s, total))
        for hdr, payload in frames:  # 18 MiB: far beyond the socket buffers, so it waits for room
            sender.put(hdr, payload.data.cast("B"))
        got = await asyncio.wait_for(reader, 20)
        assert got == b"".join(h + p.tobytes() for h, p in frames)
        sender.stop()
        for _ in range(100):  # the thread closes its descriptor within its poll interval
            if _open_fds() == base + 2:
                break
            await asyncio.sleep(0.02)
        assert _open_fds() == base + 2  # only c and s remain
        assert not errors
        c.close()
        s.close()

    asyncio.run(main())


def test_a_dead_receiver_is_reported_once_on_the_loop() -> None:
    async def main() -> None:
        c, s = _pair()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST: the next writes fail
        errors: list[OSError] = []
        done = asyncio.Event()

        def on_error(e: OSError) -> None:
            errors.append(e)
            done.set()

        sender = _Sender(c.fileno(), on_error)
        for _ in range(4):
            sender.put(b"h", memoryview(bytes(1 << 20)))
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(0.2)
        assert len(errors) == 1 and isinstance(errors[0], OSError)
        sender.stop()
        c.close()

    asyncio.run(main())


def test_a_failure_other_than_oserror_is_reported_not_swallowed() -> None:
    """A payload larger than the shared-memory ring is a broken invariant (ValueError in the
    thread): the stream is reported broken on the loop, never left to hang."""
    from pccl.peer import shm_link

    if not shm_link.AVAILABLE:
        pytest.skip("no shared-memory links here")

    async def main() -> None:
        c, s = _pair()
        ring = shm_link.ShmWriter(1 << 20)
        ring.unlink()
        errors: list[OSError] = []
        done = asyncio.Event()

        def on_error(e: OSError) -> None:
            errors.append(e)
            done.set()

        sender = _Sender(c.fileno(), on_error, ring)
        sender.put(b"h", memoryview(bytes((1 << 20) + 1)))
        await asyncio.wait_for(done.wait(), 10)
        assert len(errors) == 1 and "exceeds" in str(errors[0]), errors
        with pytest.raises(BlockingIOError):  # the header never went out without its payload
            s.recv(16, socket.MSG_DONTWAIT)
        sender.stop()
        c.close()
        s.close()

    asyncio.run(main())
