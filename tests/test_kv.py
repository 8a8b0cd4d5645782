"""The key-value channel (``kv_set``/``kv_get``/``kv_wait``/``kv_delete``) against the real
master daemon: semantics across peers and scopes, bounds, authentication, ``/status`` and
``/metrics``, and what a master restart (SIGKILL) keeps: acknowledged values (with
``--state-file``), waits in flight, and sets issued while the master is down.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import kill_process

import pccl
from pccl import messages as m
from pccl.config import MAX_KV_KEY, MAX_KV_VALUE
from pccl.frame import HEADER, MsgType, encode_frame
from pccl.tools.proc import spawn_master_with_status

pytestmark = [pytest.mark.e2e]


def _connect(addr: str, group: int = 0) -> pccl.Communicator:
    c = pccl.Communicator(addr, peer_group=group)
    c.connect(timeout=30)
    return c


def _pair(addr: str, group: int = 0) -> tuple[pccl.Communicator, pccl.Communicator]:
    """Two peers of one group in the same run (the second admitted by the first's vote)."""
    a = _connect(addr, group)
    b = pccl.Communicator(addr, peer_group=group)
    t = threading.Thread(target=b.connect, kwargs={"timeout": 30})
    t.start()
    a.wait_for_world(2, timeout=30)
    t.join(30)
    assert b.group_world_size == 2
    return a, b


class _Later:
    """Run ``fn`` in a thread; ``result()`` returns what it returned or raises what it raised."""

    def __init__(self, fn: Any) -> None:
        self._out: list[Any] = []
        self._t = threading.Thread(target=self._run, args=(fn,))
        self._t.start()

    def _run(self, fn: Any) -> None:
        try:
            self._out.append((True, fn()))
        except BaseException as e:
            self._out.append((False, e))

    def result(self, timeout: float) -> Any:
        self._t.join(timeout)
        assert self._out, f"still running after {timeout}s"
        ok, v = self._out[0]
        if not ok:
            raise v
        return v


def test_set_get_wait_delete_across_peers_and_scopes(master) -> None:
    a, b = _pair(master.address, group=0)
    c = _connect(master.address, group=1)
    try:
        # Run scope: one key space for every group.
        v1 = a.kv_set("run/lr", b"0.1")
        assert v1 > 0
        assert c.kv_get("run/lr") == b"0.1" and b.kv_get("run/lr") == b"0.1"
        assert c.kv_get("run/missing") is None
        v2 = c.kv_set("run/lr", "0.05")  # a str is stored as UTF-8
        assert v2 > v1 and a.kv_get("run/lr") == b"0.05"
        # Group scope: the group's own key space; the run's is separate.
        a.kv_set("epoch", b"zero", scope="group")
        assert b.kv_get("epoch", scope="group") == b"zero"
        assert c.kv_get("epoch", scope="group") is None
        assert a.kv_get("epoch") is None  # not in the run scope
        c.kv_set("epoch", b"one", scope="group")
        assert (a.kv_get("epoch", scope="group"), c.kv_get("epoch", scope="group")) == (
            b"zero",
            b"one",
        )
        # A wait returns as soon as another peer sets the key (in another group here).
        waiting = _Later(lambda: b.kv_wait("stop", timeout=20))
        time.sleep(0.3)
        c.kv_set("stop", b"at step 5")
        assert waiting.result(20) == b"at step 5"
        # ... and at once when the key is already there.
        t0 = time.monotonic()
        assert a.kv_wait("stop", timeout=5) == b"at step 5"
        assert time.monotonic() - t0 < 5
        # after_version waits for the next change.
        value, version = a.kv_get_versioned("run/lr")
        assert value == b"0.05" and version == v2
        nxt = _Later(lambda: c.kv_wait("run/lr", timeout=20, after_version=version))
        time.sleep(0.3)
        b.kv_set("run/lr", b"0.01")
        assert nxt.result(20) == b"0.01"
        # No value: a wait ends in TimeoutError after its timeout, not before.
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="never"):
            a.kv_wait("never", timeout=0.6)
        assert 0.55 <= time.monotonic() - t0 < 5
        # Delete frees the key; a second delete finds nothing.
        assert a.kv_delete("stop") is True and a.kv_delete("stop") is False
        assert b.kv_get("stop") is None
        # The largest key and value go through intact.
        big_key, big = "k" * MAX_KV_KEY, bytes(range(256)) * (MAX_KV_VALUE // 256)
        a.kv_set(big_key, big)
        assert c.kv_get(big_key) == big
    finally:
        for x in (a, b, c):
            x.close()


def test_bad_arguments_raise_before_any_io(master) -> None:
    a = _connect(master.address)
    try:
        for call, exc in [
            (lambda: a.kv_set("k" * (MAX_KV_KEY + 1), b""), ValueError),
            (lambda: a.kv_set("é" * (MAX_KV_KEY // 2 + 1), b""), ValueError),  # UTF-8 bytes count
            (lambda: a.kv_set("", b"x"), ValueError),
            (lambda: a.kv_set("k", b"x" * (MAX_KV_VALUE + 1)), ValueError),
            (lambda: a.kv_set("k", 5), TypeError),
            (lambda: a.kv_set(b"k", b"x"), TypeError),
            (lambda: a.kv_set("k", b"x", scope="world"), ValueError),
            (lambda: a.kv_get("k", timeout=-1), ValueError),
            (lambda: a.kv_wait("k", timeout="5"), TypeError),
            (lambda: a.kv_wait("k", timeout=1, after_version=-1), ValueError),
        ]:
            with pytest.raises(exc):
                call()
        assert a.kv_get("k") is None  # nothing of it reached the master
    finally:
        a.close()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        body: bytes = r.read()
        return body


def test_store_bound_is_enforced_and_reported(tmp_path: Path) -> None:
    """``--kv-max-bytes`` bounds the entries together: a set beyond it is refused with
    ``KVRefused`` (nothing stored, the connection stays), a delete makes room again, and
    ``/status`` and ``/metrics`` show the store."""
    bound = 3 * (MAX_KV_VALUE + 200)
    proc, addr, status = spawn_master_with_status(
        extra_args=["--kv-max-bytes", str(bound)], stderr=(tmp_path / "m.log").open("wb")
    )
    try:
        a = _connect(addr)
        try:
            value = b"v" * MAX_KV_VALUE
            for i in range(3):
                a.kv_set(f"blob/{i}", value)
            with pytest.raises(pccl.KVRefused, match="full") as ei:
                a.kv_set("blob/3", value)
            assert not ei.value.retryable
            assert a.kv_get("blob/3") is None and a.kv_get("blob/0") == value  # link intact
            a.kv_set("blob/1", b"small")  # replacing a value charges the difference only
            a.kv_set("blob/3", value)
            doc = json.loads(_get(f"http://{status}/status"))["kv"]
            assert doc["entries"] == 4 and doc["max_bytes"] == bound
            assert doc["bytes"] <= bound and doc["durable"] is False
            keys = {k["key"]: k for k in doc["keys"]}
            assert keys["blob/1"]["preview"] == "small" and keys["blob/1"]["scope"] == "run"
            assert keys["blob/0"]["bytes"] == MAX_KV_VALUE and keys["blob/0"]["set_by"] == a.peer_id
            text = _get(f"http://{status}/metrics").decode()
            assert "pccl_kv_entries 4.0" in text
            assert 'pccl_kv_requests_total{op="set",status="refused"} 1.0' in text
        finally:
            a.close()
    finally:
        kill_process(proc)
    # A bound that cannot hold one full entry is refused at start.
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "pccl.master", "--port", "0", "--kv-max-bytes", "1000"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "--kv-max-bytes" in r.stderr


def _recv_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    head = b""
    while len(head) < HEADER.size:
        chunk = sock.recv(HEADER.size - len(head))
        if not chunk:
            return None
        head += chunk
    _, _, mtype, length = HEADER.unpack(head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return mtype, body


def test_unauthenticated_kv_messages_touch_nothing(tmp_path: Path) -> None:
    """A stranger who sends key-value messages without the handshake (or with a wrong token)
    is dropped with a protocol kick and changes nothing in the store."""
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-the-kv-test\n")
    proc, addr, status = spawn_master_with_status(
        extra_args=["--token-file", str(token)], stderr=(tmp_path / "m.log").open("wb")
    )
    host, port = addr.rsplit(":", 1)
    auth = {"Authorization": "Bearer s3cret-token-for-the-kv-test"}
    try:
        for msg in (
            m.KvSet(1, 0, "run/lr", b"evil"),
            m.KvGet(2, 0, "run/lr", 60_000),
            m.KvSet(3, 0, "run/lr", delete=True),
        ):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                first = _recv_frame(s)
                assert first is not None and first[0] == MsgType.M2P_CHALLENGE
                s.sendall(msg.encode())
                kick = _recv_frame(s)
                assert kick is not None and kick[0] == MsgType.M2P_KICK, kick
                code, reason = msgpack.unpackb(kick[1])[:2]
                assert code == m.KickCode.PROTOCOL and "KV" in reason, reason
                assert s.recv(1) == b""  # closed
        # A KV frame claiming more than the bound is refused from its header alone.
        with socket.create_connection((host, int(port)), timeout=10) as s:
            _recv_frame(s)
            s.sendall(
                HEADER.pack(*HEADER.unpack(encode_frame(MsgType.P2M_KV_SET, b""))[:3], 1 << 30)
            )
            kick = _recv_frame(s)
            assert kick is not None and kick[0] == MsgType.M2P_KICK
        # A peer with the wrong token never gets to send one.
        with pytest.raises(pccl.AuthenticationFailed):
            pccl.Communicator(addr, auth_token="not-the-token-at-all-1234").connect(timeout=10)
        req = urllib.request.Request(f"http://{status}/status", headers=auth)
        with urllib.request.urlopen(req, timeout=10) as r:
            kv = json.loads(r.read())["kv"]
        assert kv["entries"] == 0 and kv["waiters"] == 0 and kv["version"] == 0
        good = pccl.Communicator(addr, auth_token=token.read_text().strip())
        good.connect(timeout=30)
        try:
            assert good.kv_get("run/lr") is None
            good.kv_set("run/lr", b"0.1")
            assert good.kv_get("run/lr") == b"0.1"
        finally:
            good.close()
    finally:
        kill_process(proc)


@pytest.mark.timeout(150)
def test_values_waits_and_sets_survive_a_master_sigkill(master_factory, workers, tmp_path) -> None:
    """With ``--state-file`` the master persists every acknowledged value before it answers.
    SIGKILL it and restart it on the same port: the peers reconnect under their ids; what was
    set is there; a wait in flight (in another process) is answered by a set made after the
    restart; a set issued while no master runs completes once it is back."""
    state = tmp_path / "master-state.json"
    args = ["--state-file", str(state)]
    m1 = master_factory(extra_args=args)
    a = _connect(m1.address, group=0)
    c = _connect(m1.address, group=1)
    try:
        a.kv_set("run/config", b'{"lr": 0.1}')
        a.kv_set("shard", b"group zero", scope="group")
        c.kv_set("shard", b"group one", scope="group")
        a.kv_set("gone", b"x")
        assert a.kv_delete("gone")
        waiter = workers.spawn("kv.py", m1, {"group": 2, "wait": "run/go", "wait_s": 90})
        workers.wait_event(lambda w, e: e.get("event") == "ready", 60, "the waiter connected")
        time.sleep(0.5)  # its wait is parked at the master
        assert Path(f"{state}.kv").exists()
        m1.expect_exit = True
        m1.proc.send_signal(signal.SIGKILL)
        assert m1.proc.wait(10) == -signal.SIGKILL
        during = _Later(lambda: c.kv_set("run/set-while-down", b"late", timeout=60))
        time.sleep(1.0)
        m2 = master_factory(port=m1.port, extra_args=args)
        assert during.result(60) > 0
        assert a.kv_get("run/config", timeout=60) == b'{"lr": 0.1}'
        assert a.kv_get("shard", scope="group") == b"group zero"
        assert c.kv_get("shard", scope="group") == b"group one"
        assert a.kv_get("gone") is None  # the delete was durable too
        assert a.kv_get("run/set-while-down") == b"late"
        version = a.kv_set("run/go", b"now")
        got = workers.wait_event(lambda w, e: e.get("event") == "waited", 60, "the wait ended")
        assert got[1]["value"] == "now"
        results = workers.wait_exit([waiter], 60)
        assert results[waiter.name]["versions"] == {}
        # Versions keep increasing across the restart (persisted), so after_version works.
        assert version > a.kv_get_versioned("run/config")[1]  # type: ignore[index]
        # A newcomer process after the restart reads the run's settings.
        reader = workers.spawn("kv.py", m2, {"group": 5, "reads": ["run/config", "run/none"]})
        workers.wait_exit([reader], 60)
        reads = next(e for e in reader.events if e.get("event") == "read")["values"]
        assert reads == {"run/config": '{"lr": 0.1}', "run/none": None}
        log2 = m2.log.read_text(errors="replace")
        assert "key-value store: 3 entries" in log2, log2[-2000:]
    finally:
        a.close()
        c.close()


def test_without_a_state_file_a_restart_empties_the_store(master_factory) -> None:
    """Documented: without ``--state-file`` the store lives in the master's memory only."""
    m1 = master_factory()
    a = _connect(m1.address)
    try:
        a.kv_set("run/config", b"1")
        m1.expect_exit = True
        m1.proc.send_signal(signal.SIGKILL)
        m1.proc.wait(10)
        master_factory(port=m1.port)
        assert a.kv_get("run/config", timeout=60) is None
    finally:
        a.close()


def test_kv_store_file_is_checked_at_start(tmp_path: Path) -> None:
    """A corrupt ``STATE_FILE.kv`` stops the master at start (exit 2, the reason printed)
    rather than serving a store it cannot vouch for."""
    import subprocess
    import sys

    state = tmp_path / "s.json"
    for corrupt in (
        msgpack.packb({"format": 1, "version": 1, "entries": [[1]]}),  # an entry cut short
        struct.pack("<I", 7) * 3,  # not msgpack of a store at all
    ):
        Path(f"{state}.kv").write_bytes(corrupt)
        r = subprocess.run(
            [sys.executable, "-m", "pccl.master", "--port", "0", "--state-file", str(state)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2, r.stderr
        assert "key-value store" in r.stderr and "not valid" in r.stderr, r.stderr


# --------------------------------------------------------------------------- the store alone


def _store(**kw: Any) -> tuple[Any, list[tuple[int, m.KvReply]]]:
    from pccl.master.kv import KvStore

    sent: list[tuple[int, m.KvReply]] = []
    return KvStore(lambda pid, msg: sent.append((pid, msg)), **kw), sent  # type: ignore[arg-type]


def test_waits_are_bounded_per_peer_dropped_with_their_peer_and_timed_out() -> None:
    from pccl.master.kv import MAX_WAITS_PER_PEER

    kv, sent = _store()
    for i in range(MAX_WAITS_PER_PEER):
        kv.on_get(7, 0, m.KvGet(i, 0, f"k{i}", wait_ms=1000), now=100.0)
    assert sent == []
    kv.on_get(7, 0, m.KvGet(999, 0, "one-more", wait_ms=1000), now=100.0)
    assert sent[-1][1].status == m.KvStatus.REFUSED and "waiting on" in sent[-1][1].reason
    kv.on_get(8, 0, m.KvGet(1, 0, "k0", wait_ms=5000), now=100.0)  # another peer still may
    kv.peer_gone(7)
    assert kv.describe(0.0)["waiters"] == 1
    kv.tick(104.0)
    assert sent[-1] != (8, m.KvReply(1, m.KvStatus.TIMEOUT))
    kv.tick(105.0)
    assert sent[-1] == (8, m.KvReply(1, m.KvStatus.TIMEOUT))
    assert kv.describe(0.0)["waiters"] == 0
    kv.on_set(9, 0, m.KvSet(5, 0, "k0", b"v"))  # nobody waits any more: only the ack
    assert sent[-1] == (9, m.KvReply(5, m.KvStatus.OK, version=1))


def test_a_wait_past_a_version_sees_only_newer_values_and_scopes_are_apart() -> None:
    kv, sent = _store()
    kv.on_set(1, 0, m.KvSet(1, 0, "lr", b"a"))
    kv.on_get(2, 3, m.KvGet(2, 0, "lr", wait_ms=1000, after_version=1), now=0.0)
    kv.on_get(3, 3, m.KvGet(3, 0, "lr", wait_ms=1000, after_version=5), now=0.0)  # far ahead
    kv.on_get(4, 3, m.KvGet(4, 1, "lr", wait_ms=1000), now=0.0)  # group 3's own key space
    sent.clear()
    kv.on_set(1, 0, m.KvSet(2, 0, "lr", b"b"))  # version 2
    assert sent == [(1, m.KvReply(2, m.KvStatus.OK, version=2)), (2, m.KvReply(2, 0, b"b", 2))]
    kv.on_set(5, 3, m.KvSet(9, 1, "lr", b"g"))  # version 3: the group waiter
    assert sent[-1] == (4, m.KvReply(4, 0, b"g", 3))
    assert kv.describe(0.0)["waiters"] == 1  # the one past version 5 still waits
    kv.on_set(1, 0, m.KvSet(3, 7, "lr", b"x"))
    assert sent[-1][1].status == m.KvStatus.REFUSED and "scope" in sent[-1][1].reason
    kv.on_get(1, 0, m.KvGet(4, 0, "é" * 200), now=0.0)  # 400 bytes of UTF-8: over the bound
    assert sent[-1][1].status == m.KvStatus.REFUSED and "UTF-8" in sent[-1][1].reason
