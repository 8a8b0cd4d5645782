"""Authentication on a real ``pccl master --token-file`` daemon and real peer sockets.

A peer with a wrong or missing token, a stranger injecting frames into a peer's p2p port, and a
replayed (recorded) hello are all rejected and logged, while admitted peers keep reducing.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pccl
from pccl import messages as m
from pccl.auth import new_nonce, prove, verify
from pccl.frame import (
    HEADER,
    MAGIC,
    PRE_AUTH_MAX_BODY,
    PROTOCOL_VERSION,
    VERSION,
    FrameDecoder,
    MsgType,
)
from pccl.messages import KickCode
from pccl.tools.proc import spawn_master

pytestmark = pytest.mark.e2e

TOKEN = b"correct horse battery staple 42"


@pytest.fixture
def secured_master(tmp_path: Path):
    tok = tmp_path / "token"
    tok.write_bytes(TOKEN + b"\n")
    log = tmp_path / "master.log"
    with log.open("wb") as err:
        proc, addr = spawn_master(None, extra_args=("--token-file", str(tok)), stderr=err)
    port = int(addr.rsplit(":", 1)[1])
    try:
        yield port, log
    finally:
        proc.kill()
        proc.wait(10)


def _frames(sock: socket.socket, want: int, timeout: float = 5.0) -> list[tuple[MsgType, bytes]]:
    dec, out = FrameDecoder(), []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        out.extend(dec.feed(data))
    return out


def _pair(port: int) -> tuple[pccl.Communicator, pccl.Communicator]:
    a = pccl.Communicator(f"127.0.0.1:{port}", streams=2, auth_token=TOKEN)
    a.connect(timeout=20)
    b = pccl.Communicator(f"127.0.0.1:{port}", streams=2, auth_token=TOKEN)
    import threading

    t = threading.Thread(target=b.connect, kwargs={"timeout": 20})
    t.start()
    deadline = time.monotonic() + 20
    while a.world_size < 2 and time.monotonic() < deadline:
        a.update_topology(timeout=20)
    t.join(20)
    assert a.world_size == b.world_size == 2
    return a, b


def _reduce_ok(a: pccl.Communicator, b: pccl.Communicator) -> None:
    import threading

    x, y = np.full(1000, 2.0, np.float32), np.full(1000, 3.0, np.float32)
    t = threading.Thread(target=b.all_reduce, args=(y,))
    t.start()
    a.all_reduce(x)
    t.join(20)
    assert x[0] == y[0] == 5.0 and np.array_equal(x, y)


@pytest.mark.timeout(90)
def test_wrong_missing_and_replayed_credentials_are_rejected(secured_master) -> None:
    port, log = secured_master
    a, b = _pair(port)
    try:
        for bad in (b"wrong token but long enough!", None):
            with pytest.raises(pccl.AuthenticationFailed):
                pccl.Communicator(f"127.0.0.1:{port}", auth_token=bad).connect(timeout=5)
        # Record a valid handshake, then replay it on a new connection (fresh nonce).
        s1 = socket.create_connection(("127.0.0.1", port))
        ((mt, body),) = _frames(s1, 1)
        ch = m.decode(mt, body)
        assert isinstance(ch, m.Challenge) and ch.auth_required
        mine = new_nonce()
        proof = prove(TOKEN, b"pccl-hello", ch.nonce, mine)
        hello = m.Hello(PROTOCOL_VERSION, 0, 9, "", 0, mine, proof).encode()
        s1.sendall(hello)
        kinds = [t for t, _ in _frames(s1, 2)]
        assert MsgType.M2P_WELCOME in kinds  # the recorded exchange was genuine
        s1.close()
        s2 = socket.create_connection(("127.0.0.1", port))
        _frames(s2, 1)  # its own, different challenge
        s2.sendall(hello)
        got = _frames(s2, 1)
        kick = m.decode(*got[0])
        assert isinstance(kick, m.Kick) and kick.code == KickCode.AUTH
        assert got == [(MsgType.M2P_KICK, got[0][1])]  # no welcome: refused, then closed
        s2.close()
        _reduce_ok(a, b)  # the ring never noticed
        text = log.read_text()
        # Wrong token and replay are refused (and logged) by the master; a peer without a token
        # refuses on its side as soon as the challenge says one is required.
        assert text.count("AUTH: authentication failed") >= 2
    finally:
        a.close()
        b.close()


def _challenge(port: int) -> tuple[socket.socket, m.Challenge]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    ((mt, body),) = _frames(s, 1)
    ch = m.decode(mt, body)
    assert isinstance(ch, m.Challenge) and ch.auth_required and len(ch.nonce) >= 16
    return s, ch


@pytest.mark.timeout(60)
def test_master_handshake_over_raw_sockets(secured_master) -> None:
    """The master's side of the handshake alone (no peer client): every wrong, missing,
    borrowed or oversized proof is kicked with ``KickCode.AUTH`` (or ``PROTOCOL``) before any
    welcome; the right one is welcomed with the master's own proof over both nonces."""
    port, log = secured_master
    other = b"another token, also long enough"
    cases: list[tuple[str, Any, KickCode]] = [
        ("missing", lambda ch, mine: b"", KickCode.AUTH),
        (
            "wrong token",
            lambda ch, mine: prove(other, b"pccl-hello", ch.nonce, mine),
            KickCode.AUTH,
        ),
        (
            "wrong purpose",
            lambda ch, mine: prove(TOKEN, b"pccl-p2p", ch.nonce, mine),
            KickCode.AUTH,
        ),
        (
            "nonces swapped",
            lambda ch, mine: prove(TOKEN, b"pccl-hello", mine, ch.nonce),
            KickCode.AUTH,
        ),
    ]
    for name, proof, code in cases:
        s, ch = _challenge(port)
        mine = new_nonce()
        s.sendall(m.Hello(PROTOCOL_VERSION, 0, 9, "", 0, mine, proof(ch, mine)).encode())
        got = _frames(s, 2)
        assert [t for t, _ in got] == [MsgType.M2P_KICK], (name, got)
        kick = m.decode(*got[0])
        assert isinstance(kick, m.Kick) and kick.code == code, (name, kick)
        s.close()
    # A hello larger than the pre-authentication bound is refused from its header alone.
    s, ch = _challenge(port)
    s.sendall(HEADER.pack(MAGIC, VERSION, MsgType.P2M_HELLO, PRE_AUTH_MAX_BODY + 1))
    got = _frames(s, 2)
    assert [t for t, _ in got] == [MsgType.M2P_KICK], got
    assert m.decode(*got[0]).code == KickCode.PROTOCOL  # type: ignore[attr-defined]
    s.close()
    # The right proof: welcomed, and the master proves the token back (mutual).
    s, ch = _challenge(port)
    mine = new_nonce()
    proof = prove(TOKEN, b"pccl-hello", ch.nonce, mine)
    s.sendall(m.Hello(PROTOCOL_VERSION, 0, 9, "", 0, mine, proof).encode())
    got = _frames(s, 1)
    w = m.decode(*got[0])
    assert isinstance(w, m.Welcome) and w.peer_id > 0, got
    assert verify(TOKEN, w.auth, b"pccl-welcome", mine, ch.nonce)
    assert not verify(other, w.auth, b"pccl-welcome", mine, ch.nonce)
    s.sendall(m.Leave("done").encode())
    s.close()
    assert log.read_text().count("AUTH: authentication failed") >= len(cases)


@pytest.mark.timeout(90)
def test_stranger_cannot_inject_into_a_p2p_port(secured_master, caplog) -> None:
    port, _ = secured_master
    a, b = _pair(port)
    try:
        p2p = a.aio._node.port
        s = socket.create_connection(("127.0.0.1", p2p))
        ((mt, body),) = _frames(s, 1)
        ch = m.decode(mt, body)
        assert isinstance(ch, m.P2PChallenge)
        # Claim to be b, without the token; then blast data frames.
        s.sendall(m.P2PHello(b.peer_id, a.epoch, 0, os.urandom(32)).encode())
        ack = m.decode(*_frames(s, 1)[0])
        assert isinstance(ack, m.P2PHelloAck) and not ack.ok
        try:
            s.sendall(b"PC\x01\x42" + os.urandom(4096))
        except OSError:
            pass  # already closed by the peer: what we want
        s.close()
        # A state transfer without the proof is refused as well: no byte of state is served.
        s = socket.create_connection(("127.0.0.1", p2p))
        _frames(s, 1)
        s.sendall(m.StateHello(b.peer_id, 1, os.urandom(32)).encode())
        got = _frames(s, 2)  # the refusal, then the close: never a byte of state
        assert [t for t, _ in got] == [MsgType.P2P_STATE_ERROR], got
        assert "authentication" in m.decode(*got[0]).reason  # type: ignore[attr-defined]
        s.close()
        for _ in range(3):
            _reduce_ok(a, b)
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
def test_silent_dialer_on_a_p2p_port_is_closed_at_the_handshake_deadline(secured_master) -> None:
    port, _ = secured_master
    cfg = pccl.Config(handshake_timeout_s=1.0)
    a = pccl.Communicator(f"127.0.0.1:{port}", streams=1, auth_token=TOKEN, config=cfg)
    a.connect(timeout=20)
    try:
        s = socket.create_connection(("127.0.0.1", a.aio._node.port))
        t0 = time.monotonic()
        got = _frames(s, 1)  # the challenge, then nothing: we never answer
        assert isinstance(m.decode(*got[0]), m.P2PChallenge)
        s.settimeout(10)
        try:
            rest = s.recv(4096)
        except ConnectionResetError:
            rest = b""
        elapsed = time.monotonic() - t0
        assert rest == b"" and 0.5 < elapsed < 6, elapsed  # closed by the peer, not by us
        s.close()
    finally:
        a.close()
