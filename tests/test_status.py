"""The master's HTTP status endpoint (``/status``, ``/metrics``) and ``pccl status``.

End-to-end: a real ``pccl master --port 0 --status-port 0`` and real peer processes (this file
doubles as the peer: ``python tests/test_status.py peer MASTER JSON``; it joins, all-reduces,
prints JSON events and then obeys ``pending`` / ``exit`` lines on stdin). We check that what the
endpoint reports matches what the peers themselves saw (ids, groups, rings, bytes sent), that
``/metrics`` is valid Prometheus text, that ``pccl status`` prints the peers, and that garbage,
oversized and slowloris requests neither crash nor block the master. Unit tests of the pure
parts (request parser, counters, exposition) need no sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl import messages as m
from pccl.tools.proc import read_banner, stop

START_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------------- peer side


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _peer_main(addr: str, p: dict[str, Any]) -> None:
    """Join a run of ``p["world"]`` peers, all-reduce, then obey stdin commands."""
    import numpy as np

    import pccl

    comm = pccl.Communicator(addr, peer_group=p["group"], streams=1)
    deadline = time.monotonic() + 60
    comm.connect(timeout=30)
    while comm.world_size < p["world"]:
        comm.update_topology(timeout=max(deadline - time.monotonic(), 0.1))
    _emit(
        "joined",
        peer_id=comm.peer_id,
        group=comm.peer_group,
        world=comm.world_size,
        group_world=comm.group_world_size,
    )
    tx = 0
    for step in range(p["reduces"]):
        x = np.full(4096, float(p["idx"] + step), dtype=np.float32)
        info = comm.all_reduce(x)
        tx += info.tx_bytes
    if p.get("mismatch"):  # peers of the group pass different counts: the master aborts it
        try:
            comm.all_reduce(np.ones(8 + p["idx"], dtype=np.float32), tag=9)
        except pccl.PCCLError as e:
            _emit("mismatch", type=type(e).__name__, message=str(e))
        else:
            raise AssertionError("an all-reduce with mismatched counts succeeded")
    _emit("ready", peer_id=comm.peer_id, tx_bytes=tx)
    pending = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "pending":  # initiate tag 5 alone: it stays in flight until the others join
            pending = comm.all_reduce_async(np.ones(16, dtype=np.float32), tag=5)
            _emit("pending")
        elif cmd == "exit":
            break
    if p.get("finish_tag5"):
        if pending is not None:
            pending.wait(30)
        else:
            comm.all_reduce(np.ones(16, dtype=np.float32), tag=5)
    comm.close()
    _emit("result")


# ---------------------------------------------------------------------------------- processes


_kill = stop  # SIGTERM, SIGKILL after grace_s; reap


@dataclass
class StatusMaster:
    proc: subprocess.Popen[bytes]
    port: int
    status_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text("utf-8", "replace")

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the master's log (``Workers.report`` prints it on a failure)."""
        return self.log_text()[-limit:]


@pytest.fixture
def status_master(tmp_path: Path) -> Iterator[StatusMaster]:
    """``pccl master --port 0 --status-port 0``; fails the test if it died meanwhile."""
    with running_status_master(tmp_path) as master:
        yield master


@contextlib.contextmanager
def running_status_master(tmp_path: Path, *extra: str) -> Iterator[StatusMaster]:
    """``pccl master --port 0 --status-port 0 EXTRA...``; fails if it died or did not stop."""
    log = tmp_path / "master.log"
    with log.open("wb") as err:
        argv = ["master", "--host", "127.0.0.1", "--port", "0", "--status-port", "0", *extra]
        proc = subprocess.Popen(
            [sys.executable, "-m", "pccl.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    try:
        lines = read_banner(proc, 2, START_TIMEOUT_S)
        m1 = re.fullmatch(r"pccl master listening on 127\.0\.0\.1:(\d+)", lines[0])
        m2 = re.fullmatch(r"pccl master status on 127\.0\.0\.1:(\d+)", lines[1])
        assert m1 and m2, lines
        master = StatusMaster(proc, int(m1.group(1)), int(m2.group(1)), log)
    except BaseException:
        _kill(proc)
        raise
    try:
        yield master
    except BaseException:  # the test failed: its own error is the one to report
        _kill(proc)
        raise
    rc = proc.poll()
    stopped_rc: int | None = None
    if rc is None:  # SIGTERM stops it promptly even with a status client mid-request
        idle = socket.create_connection(("127.0.0.1", master.status_port), timeout=5)
        idle.sendall(b"GET /sta")
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        try:
            stopped_rc = proc.wait(5)
        except subprocess.TimeoutExpired:
            stopped_rc = None
        idle.close()
    _kill(proc)
    if rc is not None:
        pytest.fail(f"the master exited (rc={rc}) during the test\n{master.log_text()[-3000:]}")
    assert stopped_rc == 0, f"SIGTERM: rc={stopped_rc}\n{master.log_text()[-3000:]}"
    text = master.log_text()
    leaked = [k for k in ("Traceback", "Unhandled exception", "Exception in callback") if k in text]
    assert not leaked, f"master logged {leaked}:\n{master.log_text()[-3000:]}"


@dataclass
class Peer:
    name: str
    proc: subprocess.Popen[bytes]
    stderr: Path
    events: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def wait(self, event: str, timeout: float) -> dict[str, Any]:
        """The first event named ``event`` (already printed or within ``timeout`` seconds)."""
        for old in self.seen:
            if old.get("event") == event:
                return old
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                ev = self.events.get(timeout=max(left, 0.0))
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no {event!r} within {timeout}s\n{self.stderr_tail()}"
                ) from None
            if ev is None:
                raise AssertionError(f"{self.name} exited before {event!r}\n{self.stderr_tail()}")
            self.seen.append(ev)
            if ev.get("event") == "error":
                raise AssertionError(f"{self.name} failed: {ev}\n{self.stderr_tail()}")
            if ev.get("event") == event:
                return ev

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()

    def stderr_tail(self) -> str:
        return self.stderr.read_text("utf-8", "replace")[-3000:]


@pytest.fixture
def spawn_peer(tmp_path: Path) -> Iterator[Any]:
    """``spawn(master, **params)`` starts a peer process; all are killed at teardown."""
    peers: list[Peer] = []

    def spawn(master: StatusMaster, **params: Any) -> Peer:
        name = f"peer{len(peers)}"
        log = tmp_path / f"{name}.stderr"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, __file__, "peer", master.address, json.dumps(params)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        peer = Peer(name, proc, log)

        def read() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                try:
                    peer.events.put(json.loads(raw))
                except ValueError:
                    peer.events.put({"event": "text", "line": raw.decode("utf-8", "replace")})
            peer.events.put(None)

        threading.Thread(target=read, daemon=True).start()
        peers.append(peer)
        return peer

    yield spawn
    for p in peers:
        _kill(p.proc)


# ---------------------------------------------------------------------------------- HTTP


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``(status, content type, body)`` of one GET."""
    status, resp_headers, body = http_get_full(port, path, headers)
    return status, resp_headers.get("Content-Type", ""), body


def http_get_full(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    """``(status, headers, body)`` of one GET."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def get_status(port: int) -> dict[str, Any]:
    code, ctype, body = http_get(port, "/status")
    assert code == 200 and ctype == "application/json", (code, ctype, body)
    doc: dict[str, Any] = json.loads(body)
    return doc


def raw_exchange(port: int, data: bytes, timeout: float = HTTP_TIMEOUT_S) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return _read_to_eof(s, timeout)


def _read_to_eof(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def status_code(response: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert m, response[:200]
    return int(m.group(1))


_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\\n]|\\[\\\"n])*\",?)*)\})?"
    r" (?P<value>[^ ]+)(?: -?\d+)?"
)
_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)=\"((?:[^\"\\\n]|\\[\\\"n])*)\"")


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Strictly parse text exposition 0.0.4: ``{family: [(labels, value)]}``.

    Every sample must be ``name{labels} value`` of a family whose HELP and TYPE came first;
    no series may repeat.
    """
    assert text.endswith("\n"), "exposition must end with a newline"
    families: dict[str, list[tuple[dict[str, str], float]]] = {}
    helped: set[str] = set()
    typed: dict[str, str] = {}
    series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helped, f"HELP repeated for {name}"
            helped.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in typed, f"TYPE repeated for {name}"
            assert name in helped, f"TYPE before HELP for {name}"
            typed[name] = kind
            families[name] = []
            continue
        assert not line.startswith("#") and line.strip(), f"unexpected line {line!r}"
        m = _SAMPLE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group("name")
        assert name in typed, f"sample {name} before its TYPE"
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        key = (name, tuple(sorted(labels.items())))
        assert key not in series, f"series repeated: {line!r}"
        series.add(key)
        raw = m.group("value")
        value = float(raw.replace("Inf", "inf"))  # raises on anything that is not a number
        if typed[name] == "counter":
            assert name.endswith("_total") and value >= 0, line
        families[name].append((labels, value))
    return families


def one(families: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: Any) -> float:
    want = {k: str(v) for k, v in labels.items()}
    hits = [v for lab, v in families[name] if all(lab.get(k) == x for k, x in want.items())]
    assert len(hits) == 1, (name, labels, families[name])
    return hits[0]


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pccl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_rows(text: str, section: str) -> list[list[str]]:
    """Data rows (split on whitespace) of the table under the heading ``section (N)``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"{section} ("))
    rows = []
    for ln in lines[start + 2 :]:  # skip the heading and the column names
        if not ln.strip() or ln.strip() == "(none)":
            break
        rows.append(ln.split())
    return rows


def wait_until(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------- e2e


REDUCES = 3


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_status_metrics_and_cli_reflect_a_live_run(status_master, spawn_peer):
    # Two groups of two: group 0 peers later hold a collective in flight, group 3 peers
    # produce one abort (counts that disagree).
    params = [
        {"idx": 0, "group": 0, "finish_tag5": True},
        {"idx": 1, "group": 0, "finish_tag5": True},
        {"idx": 2, "group": 3, "mismatch": True},
        {"idx": 3, "group": 3, "mismatch": True},
    ]
    peers = [spawn_peer(status_master, world=4, reduces=REDUCES, **p) for p in params]
    joined = [p.wait("joined", 90) for p in peers]
    ready = [p.wait("ready", 60) for p in peers]
    for p in peers[2:]:
        assert p.wait("mismatch", 1)["type"] == "ProtocolError"
    ids = [ev["peer_id"] for ev in joined]
    assert len(set(ids)) == 4
    assert [ev["group"] for ev in joined] == [0, 0, 3, 3]
    assert all(ev["world"] == 4 and ev["group_world"] == 2 for ev in joined)

    # ------------------------------------------------------------------ /status
    doc = get_status(status_master.status_port)
    ms = doc["master"]
    assert ms["port"] == status_master.port and ms["phase"] == "idle"
    assert ms["uptime_s"] > 0 and ms["topology_changes"] >= 1 and ms["connections"] == 4
    by_id = {p["id"]: p for p in doc["peers"]}
    assert sorted(by_id) == sorted(ids)
    for i, (pid, ev) in enumerate(zip(ids, ready)):
        rec = by_id[pid]
        assert rec["group"] == params[i]["group"]
        assert rec["accepted"] is True
        assert re.fullmatch(r"127\.0\.0\.1:\d+", rec["address"]), rec
        assert 0 <= rec["last_seen_s_ago"] < 5.0
        # The master's byte count is exactly what the peer's ReduceInfo said it sent.
        assert rec["tx_bytes"] == ev["tx_bytes"] > 0
        assert rec["ops_done"] == REDUCES and rec["last_gbps"] > 0
        assert rec["ops_in_flight"] == []
    groups = {g["id"]: g for g in doc["groups"]}
    assert sorted(groups) == [0, 3]
    for gid, members in ((0, ids[:2]), (3, ids[2:])):
        g = groups[gid]
        assert sorted(g["ring"]) == sorted(members) and g["world_size"] == 2
        assert g["broken"] is None and g["departed"] == [] and g["ops_in_flight"] == []
        assert g["sync"] is None and g["next_revision"] is None
    assert len(doc["aborts"]) == 1
    abort = doc["aborts"][0]
    assert abort["group"] == 3 and abort["tag"] == 9 and "disagree" in abort["reason"]
    assert doc["totals"] == {
        "collectives_completed": 2 * REDUCES,  # 2 groups
        "aborts": 1,
        "departures": {"left": 0, "timeout": 0, "lost": 0, "kicked": 0},
    }

    # ------------------------------------------------------------------ /metrics
    code, ctype, text = http_get(status_master.status_port, "/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    fam = parse_prometheus(text)
    assert one(fam, "pccl_peers", state="accepted") == 4
    assert one(fam, "pccl_peers", state="pending") == 0
    assert one(fam, "pccl_group_world_size", group=0) == 2
    assert one(fam, "pccl_group_world_size", group=3) == 2
    assert one(fam, "pccl_phase", phase="idle") == 1
    assert one(fam, "pccl_aborts_total") == 1
    assert one(fam, "pccl_collectives_completed_total") == 2 * REDUCES
    assert one(fam, "pccl_epoch") > 0
    for pid, ev in zip(ids, ready):
        assert one(fam, "pccl_peer_tx_bytes_total", peer=pid) == ev["tx_bytes"]
        assert one(fam, "pccl_peer_last_gbps", peer=pid) > 0
        assert one(fam, "pccl_peer_collectives_completed_total", peer=pid) == REDUCES
    assert len(fam["pccl_peer_last_seen_seconds"]) == 4

    # ------------------------------------------------------------------ ops in flight
    peers[0].send("pending")
    peers[0].wait("pending", 10)

    def in_flight() -> list[dict[str, Any]]:
        g0 = next(g for g in get_status(status_master.status_port)["groups"] if g["id"] == 0)
        return g0["ops_in_flight"]

    op = wait_until(in_flight, 10, "tag 5 in flight")[0]
    assert op == {"tag": 5, "op_id": 0, "initiated": [ids[0]], "members": [], "completed": []}
    doc = get_status(status_master.status_port)
    assert {p["id"]: p["ops_in_flight"] for p in doc["peers"]}[ids[0]] == [5]

    # ------------------------------------------------------------------ pccl status
    where = f"127.0.0.1:{status_master.status_port}"
    res = run_cli("status", "--master", where)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    peer_rows = table_rows(out, "PEERS")
    assert sorted(int(r[0]) for r in peer_rows) == sorted(ids)
    assert {int(r[0]): (int(r[1]), r[2]) for r in peer_rows} == {
        pid: (params[i]["group"], "accepted") for i, pid in enumerate(ids)
    }
    group_rows = {int(r[0]): r for r in table_rows(out, "GROUPS")}
    assert sorted(group_rows) == [0, 3] and all(r[1] == "2" for r in group_rows.values())
    ring0 = " ".join(group_rows[0][2:5])
    assert ring0 in (f"{ids[0]} -> {ids[1]}", f"{ids[1]} -> {ids[0]}"), out
    ops_rows = table_rows(out, "OPS IN FLIGHT")
    assert [r[:4] for r in ops_rows] == [["0", "5", "(waiting)", str(ids[0])]], out
    abort_rows = table_rows(out, "RECENT ABORTS")
    assert len(abort_rows) == 1 and abort_rows[0][:2] == ["3", "9"], out
    res = run_cli("status", "--master", where, "--json")
    assert res.returncode == 0, res.stderr
    assert sorted(p["id"] for p in json.loads(res.stdout)["peers"]) == sorted(ids)

    # ------------------------------------------------------------------ departures
    before = get_status(status_master.status_port)["totals"]["collectives_completed"]
    for p in peers:
        p.send("exit")
    for p in peers:
        p.wait("result", 60)
        assert p.proc.wait(30) == 0, p.stderr_tail()
    doc = wait_until(
        lambda: (d := get_status(status_master.status_port))["peers"] == [] and d,
        15,
        "every peer to be gone",
    )
    # Lifetime totals survive departures (completions of tag 5 may or may not be sampled).
    assert before <= doc["totals"]["collectives_completed"] <= before + 2
    assert doc["totals"]["aborts"] == 1 and doc["master"]["connections"] == 0
    # they closed their communicators: departures, not crashes
    assert doc["totals"]["departures"] == {"left": len(peers), "timeout": 0, "lost": 0, "kicked": 0}
    assert sorted(d["kind"] for d in doc["departures"]) == ["left"] * len(peers)


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_bad_and_slow_clients_never_hurt_the_master(status_master, spawn_peer):
    from pccl.master.status import MAX_CLIENTS, MAX_HEAD_BYTES, REQUEST_READ_TIMEOUT_S

    port = status_master.status_port
    cases: list[tuple[bytes, int]] = [
        (b"garbage\r\n\r\n", 400),
        (b"\x00\xff\xfe binary \x80\r\n\r\n", 400),
        (b"GET /status\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /status HTTP/2.0\r\n\r\n", 400),
        (b"GET status HTTP/1.1\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /status/../metrics HTTP/1.1\r\n\r\n", 404),
        (b"POST /status HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 405),
        (b"GET /status?x=1 HTTP/1.0\n\n", 200),
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        # Header bytes beyond the bound, whether or not a blank line ever comes.
        (b"GET /status HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES + 800), 431),
        (b"GET /status HTTP/1.1\r\n" + b"X-Header: bbbbbbbbbbbbbbbb\r\n" * 320 + b"\r\n", 431),
    ]
    for data, want in cases:
        assert status_code(raw_exchange(port, data)) == want, data[:60]
    # Clients that connect and vanish, or stop half way.
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /sta")
        s.shutdown(socket.SHUT_WR)
        assert status_code(_read_to_eof(s, 5)) == 400

    # Slowloris: one client trickles header lines, one sends nothing; both are dropped once
    # the request deadline passes, and the endpoint answers others meanwhile.
    results: dict[str, Any] = {}

    def trickle() -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET /status HTTP/1.1\r\n")
            try:
                while time.monotonic() - t0 < 30:
                    s.sendall(b"X-Slow: 1\r\n")
                    r, _, _ = select.select([s], [], [], 0.3)
                    if r:
                        results["trickle"] = (_read_to_eof(s, 5), time.monotonic() - t0)
                        return
            except OSError as e:  # reset by the server
                results["trickle"] = (repr(e).encode(), time.monotonic() - t0)

    silent = socket.create_connection(("127.0.0.1", port), timeout=30)
    t_silent = time.monotonic()
    th = threading.Thread(target=trickle, daemon=True)
    th.start()
    time.sleep(0.5)  # let the slow clients occupy their slots first
    t0 = time.monotonic()
    get_status(port)
    assert time.monotonic() - t0 < 2.0, "a slow client delayed another request"
    th.join(REQUEST_READ_TIMEOUT_S + 10)
    body, took = results["trickle"]
    assert REQUEST_READ_TIMEOUT_S - 0.5 <= took <= REQUEST_READ_TIMEOUT_S + 3, took
    assert not body.startswith(b"HTTP/") or status_code(body) == 408
    got = _read_to_eof(silent, REQUEST_READ_TIMEOUT_S + 5)
    assert time.monotonic() - t_silent <= REQUEST_READ_TIMEOUT_S + 3
    assert not got or status_code(got) == 408
    silent.close()

    # More idle connections than the server keeps: the oldest are evicted, requests still served.
    idle = [
        socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(MAX_CLIENTS + 8)
    ]
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        assert get_status(port)["peers"] == []
        assert time.monotonic() - t0 < 2.0
        dropped = 0
        for s in idle[:8]:  # the oldest idle ones were closed to make room
            s.settimeout(2)
            try:
                dropped += s.recv(1) == b""
            except (ConnectionResetError, TimeoutError):
                dropped += 1  # reset counts as closed; a timeout means still open
    finally:
        for s in idle:
            s.close()
    assert dropped >= 1

    # Still serving: both documents, and the control plane admits a peer.
    parse_prometheus(http_get(port, "/metrics")[2])
    peer = spawn_peer(status_master, idx=0, group=0, world=1, reduces=0)
    pid = peer.wait("ready", 60)["peer_id"]
    assert [p["id"] for p in get_status(port)["peers"]] == [pid]
    peer.send("exit")
    peer.wait("result", 30)


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_cli_reports_unreachable_and_bad_usage():
    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        res = run_cli("status", "--master", f"127.0.0.1:{port}")
    assert res.returncode == 1 and "cannot reach" in res.stderr and not res.stdout
    with socket.socket() as s:  # listens but never answers: the timeout applies
        s.bind(("127.0.0.1", 0))
        s.listen()
        t0 = time.monotonic()
        res = run_cli("status", "--master", f"127.0.0.1:{s.getsockname()[1]}", "--timeout", "1")
        assert res.returncode == 1 and "cannot reach" in res.stderr
        assert time.monotonic() - t0 < 15
    for bad in ("nohost", "127.0.0.1:", "127.0.0.1:99999", ":80"):
        res = run_cli("status", "--master", bad)
        assert res.returncode == 2 and "HOST:PORT" in res.stderr, bad
    res = run_cli("master", "--port", "0", "--status-port", "70000")
    assert res.returncode == 2 and "--status-port" in res.stderr


# ---------------------------------------------------------------------------------- units


@pytest.mark.timeout(30)
async def test_in_process_master_serves_status_and_frees_ports_on_failure():
    from pccl.master.daemon import Master

    async with Master("127.0.0.1", 0, status_port=0, status_host="127.0.0.1") as master:
        assert master.status_server is not None
        port = master.status_server.port
        assert port > 0 and port != master.port
        code, _, body = await asyncio.to_thread(http_get, port, "/status")
        assert code == 200 and json.loads(body)["master"]["port"] == master.port
    with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        master = Master("127.0.0.1", 0, status_port=taken)
        with pytest.raises(OSError, match="status endpoint"):
            await master.start()
        # The control port bound before the failure is released again.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", master.port), timeout=5).close()
    with pytest.raises(ValueError):
        Master(status_port=70000)


def test_parse_request_accepts_http1_and_rejects_the_rest():
    from pccl.master.status import BadRequest, Request, parse_request

    assert parse_request(b"GET /status HTTP/1.1\r\nHost: x\r\nAccept: */*") == Request(
        "GET", "/status", None
    )
    assert parse_request(b"GET /metrics?name=x HTTP/1.0") == Request("GET", "/metrics")
    assert parse_request(b"HEAD /status HTTP/1.1") == Request("HEAD", "/status")
    got = parse_request(b"GET /status HTTP/1.1\r\nauthORIZATION:  Bearer abc def \t\r\nX: y")
    assert got == Request("GET", "/status", "Bearer abc def")
    for bad in [
        b"GET /status HTTP/1.1\r\nAuthorization: Bearer a\r\nauthorization: Bearer b",
        b"",
        b"GET",
        b"GET /status",
        b"GET  /status HTTP/1.1",
        b"GET /status HTTP/1.1 extra",
        b"GET /status HTTP/3",
        b"GET http://x/status HTTP/1.1",
        b"G\xc3\xa9T /status HTTP/1.1",
        b"GET /st\x01tus HTTP/1.1",
        b"GET /status HTTP/1.1\r\n: empty name",
        b"GET /status HTTP/1.1\r\nbad name: x",
    ]:
        with pytest.raises(BadRequest) as e:
            parse_request(bad)
        assert e.value.status == 400, bad


def _state_master() -> Any:
    from pccl.master.daemon import Master

    master = Master(status_port=0)
    assert master.status_server is not None
    return master


def test_counters_mirror_the_master_state_verdicts():
    from pccl.master.status import Counters

    master = _state_master()
    st = master.state
    c = Counters(st)
    a, b = st.new_peer_id(), st.new_peer_id()
    st.register(a, 0, "h", 1)
    for pid in (a,):
        st.on_topology_ready(pid, m.TopologyReady(st.epoch, True))
    st.register(b, 0, "h", 2)
    st.on_update_topology(a)
    for pid in (a, b):
        st.on_topology_ready(pid, m.TopologyReady(st.epoch, True))
    for tag, ok in ((1, True), (2, True), (3, False)):
        for pid in (a, b):
            st.on_initiate(pid, m.CollectiveInitiate(tag, 1, 10, 0, 0, 0))  # attempt 1
        op_id = st._next_op_id - 1
        for pid in (a, b):
            st.on_complete(pid, m.CollectiveComplete(tag, op_id, ok, "" if ok else "boom"))
    c.sample(st)
    assert (c.collectives_completed, c.aborts) == (2, 1)  # one per group operation
    st.remove(b, "test")  # departures do not lose history
    c.sample(st)
    assert (c.collectives_completed, c.aborts) == (2, 1)
    assert c.topology_changes(st) >= 2


def test_metrics_escape_labels_and_format_values():
    from pccl.master.status import Counters, metrics_text, status_document

    master = _state_master()
    st = master.state
    st.register(st.new_peer_id(), 7, "h", 1)
    rec = st.peers[1]
    rec.tx_bytes = 10**15
    rec.last_gbps = float("nan")  # a bogus report must not break the exposition
    st.aborts.insert(0, (7, 1, 'quote " backslash \\ newline \n'))
    c = Counters(st)
    c.sample(st)
    now = time.monotonic()
    text = metrics_text(master, c, now)
    fam = parse_prometheus(text)
    assert one(fam, "pccl_peer_tx_bytes_total", peer=1, group=7) == 10**15
    # Escaping and number formatting are prometheus_client's: its own parser reads it back.
    from prometheus_client.parser import text_string_to_metric_families

    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed["pccl_peer_tx_bytes"].type == "counter"
    assert not any(s.name.endswith("_created") for f in parsed.values() for s in f.samples)
    assert one(fam, "pccl_peer_last_gbps", peer=1) == 0.0
    assert one(fam, "pccl_peers", state="pending") == 1
    assert one(fam, "pccl_phase", phase="connecting") == 1
    doc = status_document(master, c, now)
    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN leaks into the document
    assert doc["aborts"][0]["reason"].endswith("newline \n")
    assert doc["peers"][0]["last_seen_s_ago"] is None  # no connection behind this record


def test_format_status_renders_every_section():
    from pccl.tools.status import format_status, parse_address

    doc = {
        "master": {"host": "h", "port": 1, "uptime_s": 2.0, "phase": "idle", "epoch": 9},
        "peers": [
            {
                "id": 4,
                "group": 1,
                "accepted": True,
                "address": "a:1",
                "last_seen_s_ago": 0.1,
                "ops_done": 2,
                "tx_bytes": 3 << 20,
                "last_gbps": 1.5,
                "ops_in_flight": [7],
            },
        ],
        "groups": [
            {
                "id": 1,
                "world_size": 1,
                "ring": [4],
                "next_revision": 3,
                "broken": "peer 5 left",
                "ops_in_flight": [
                    {"tag": 7, "op_id": 11, "initiated": [4], "members": [4], "completed": []}
                ],
                "sync": {"phase": "transferring", "waiting": [4]},
            },
        ],
        "aborts": [{"group": 1, "tag": 2, "reason": "multi\nline"}],
        "totals": {"collectives_completed": 2, "aborts": 1},
    }
    out = format_status(doc)
    assert table_rows(out, "PEERS")[0][:3] == ["4", "1", "accepted"]
    assert (
        "3.0 MiB" in out
        and " 1.5 " in out
        and "transferring (waiting 4)" in out
        and "peer 5 left" in out
    )
    assert table_rows(out, "OPS IN FLIGHT") == [["1", "7", "11", "4", "4", "-"]]
    assert table_rows(out, "RECENT ABORTS") == [["1", "2", "multi", "line"]]
    assert parse_address("[::1]:80") == ("::1", 80)


# ---------------------------------------------------------------------------------- slots

#: Loopback source addresses for hostile clients: 13 addresses x MAX_PER_ADDRESS (8) = 104, so
#: they fill the total cap (64), not only one address's share. Legitimate requests come from
#: 127.0.0.1, which is also among them (a client sharing its address with an attacker).
HOSTILE_SOURCES = tuple(f"127.0.0.{i}" for i in range(1, 14))
#: A legitimate GET must be answered within this while hostile clients hold every slot.
PROMPT_S = 1.0
FULL_REQUEST = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"


def open_clients(
    port: int, n: int, request: bytes, rcvbuf: int = 0, first: int = 0
) -> list[socket.socket]:
    """``n`` connections from :data:`HOSTILE_SOURCES` in turn; each sends ``request`` and is
    then left alone: never read, never closed (the caller closes them)."""
    socks = []
    for i in range(first, first + n):
        s = socket.socket()
        s.settimeout(5)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((HOSTILE_SOURCES[i % len(HOSTILE_SOURCES)], 0))
        socks.append(s)
        try:
            s.connect(("127.0.0.1", port))
            if request:
                s.sendall(request)
        except OSError:
            pass  # refused or evicted at once: the server is free to do that
    return socks


def timed_get(port: int, headers: dict[str, str] | None = None) -> tuple[int, float]:
    """``(status, seconds)`` of one legitimate ``GET /status`` from 127.0.0.1."""
    t0 = time.monotonic()
    code, ctype, body = http_get(port, "/status", headers)
    took = time.monotonic() - t0
    if code == 200:
        assert ctype == JSON and json.loads(body)["master"]["phase"]
    return code, took


JSON = "application/json"


async def poll(pred: Any, timeout: float, what: str) -> None:
    """Wait on the event loop (the in-process master keeps serving) until ``pred()``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def rejected(server: Any) -> dict[str, int]:
    return {r.value: n for r, n in server.slots.rejected.items() if n}


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


@pytest.mark.timeout(60)
async def test_lingering_clients_never_lock_the_endpoint():
    """100 clients send a whole request, then neither read nor close; more keep coming while
    legitimate requests are made. Each legitimate GET is answered at once (before the fix,
    64 of them locked everybody out)."""
    from pccl.master.daemon import Master
    from pccl.master.status import MAX_CLIENTS, MAX_PER_ADDRESS
    from pccl.master.status_conns import ConnState

    async with Master("127.0.0.1", 0, status_port=0) as master:
        server = master.status_server
        assert server is not None
        port = server.port
        hostile = await asyncio.to_thread(open_clients, port, 100, FULL_REQUEST)
        stop = threading.Event()
        more: list[socket.socket] = []

        def keep_coming() -> None:  # a fresh lingering client every 5 ms, bounded
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline and len(more) < 2000:
                more.extend(open_clients(port, 1, FULL_REQUEST, first=len(more)))
                stop.wait(0.005)

        churn = threading.Thread(target=keep_coming, daemon=True)
        try:
            await poll(lambda: len(server.slots) == MAX_CLIENTS, 10, "a full table")
            churn.start()
            results: list[tuple[int, float]] = []
            full_before = 0
            deadline = time.monotonic() + 20
            while len(results) < 20 or (len(more) < 300 and time.monotonic() < deadline):
                states = server.slots.by_state()
                full_before += len(server.slots) == MAX_CLIENTS
                assert states[ConnState.LINGERING] + states[ConnState.READING_REQUEST] > 0
                results.append(await asyncio.to_thread(timed_get, port))
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.to_thread(churn.join, 10)
            codes = [c for c, _ in results]
            took = sorted(t for _, t in results)
            print(
                f"\nlingering: {len(hostile) + len(more)} hostile clients; {len(results)} GETs, "
                f"worst {took[-1] * 1e3:.1f} ms, median {took[len(took) // 2] * 1e3:.1f} ms; "
                f"{rejected(server)}"
            )
            assert codes == [200] * len(results), codes
            assert took[-1] < PROMPT_S, results
            assert full_before >= len(results) // 2, "the table was not full while GETs ran"
            assert len(more) >= 300  # the churn really overlapped the GETs
            assert len(server.slots) <= MAX_CLIENTS
            for source in HOSTILE_SOURCES:
                assert server.slots.held_by(source) <= MAX_PER_ADDRESS
            evicted = rejected(server)
            assert evicted.get("evicted_lingering", 0) + evicted.get("evicted_reading", 0) >= (
                len(hostile) + len(more) - MAX_CLIENTS
            )
            # The evictions are visible in /metrics.
            code, _, text = await asyncio.to_thread(http_get, port, "/metrics")
            assert code == 200
            fam = parse_prometheus(text)
            assert (
                one(fam, "pccl_status_connections_rejected_total", reason="evicted_lingering") > 0
            )
            assert one(fam, "pccl_status_connections_rejected_total", reason="refused_full") == 0
            assert sum(v for _, v in fam["pccl_status_connections"]) <= MAX_CLIENTS
        finally:
            stop.set()
            close_all(hostile)
            if churn.is_alive():
                await asyncio.to_thread(churn.join, 10)
            close_all(more)


@pytest.mark.timeout(60)
async def test_silent_clients_never_lock_the_endpoint():
    """100 half-open clients that connect and send nothing: each legitimate GET still gets
    its answer at once, and each evicts the oldest silent one."""
    from pccl.master.daemon import Master
    from pccl.master.status import MAX_CLIENTS, REQUEST_READ_TIMEOUT_S
    from pccl.master.status_conns import ConnState

    async with Master("127.0.0.1", 0, status_port=0) as master:
        server = master.status_server
        assert server is not None
        port = server.port
        t_attack = time.monotonic()
        hostile = await asyncio.to_thread(open_clients, port, 100, b"")
        try:
            await poll(
                lambda: server.slots.by_state()[ConnState.READING_REQUEST] == MAX_CLIENTS,
                10,
                "every slot held by a silent client",
            )
            results = []
            for _ in range(10):
                results.append(await asyncio.to_thread(timed_get, port))
                # Still within the request deadline: the silent ones hold their slots meanwhile.
                assert server.slots.by_state()[ConnState.READING_REQUEST] >= MAX_CLIENTS - 1
            assert time.monotonic() - t_attack < REQUEST_READ_TIMEOUT_S
            worst = max(t for _, t in results)
            print(
                f"\nsilent: 100 half-open clients; 10 GETs, worst {worst * 1e3:.1f} ms; "
                f"{rejected(server)}"
            )
            assert [c for c, _ in results] == [200] * 10, results
            assert worst < PROMPT_S, results
            # 36 evicted by each other, one more by the first legitimate request (each one
            # frees its slot again when it is done).
            assert rejected(server).get("evicted_reading", 0) >= 100 - MAX_CLIENTS + 1
        finally:
            close_all(hostile)


@pytest.mark.timeout(90)
async def test_clients_that_never_read_a_large_answer_are_evicted_once_slow():
    """A /status too large for the socket buffers, requested by 72 clients that never read:
    64 hold every slot with a stalled response. Once they count as slow, each legitimate GET
    evicts one of them and is answered at once."""
    from pccl.master.daemon import Master
    from pccl.master.status import MAX_CLIENTS, RESPONSE_WRITE_TIMEOUT_S, STATUS_ABORTS
    from pccl.master.status_conns import SLOW_RESPONSE_S, ConnState

    async with Master("127.0.0.1", 0, status_port=0) as master:
        server = master.status_server
        assert server is not None
        port = server.port
        for tag in range(STATUS_ABORTS):  # a ~4.5 MB document: more than the kernel buffers
            master.state.aborts.insert(0, (0, tag, "x" * 140_000))
        t_attack = time.monotonic()
        hostile = await asyncio.to_thread(
            open_clients, port, MAX_CLIENTS + 8, FULL_REQUEST, rcvbuf=4096
        )
        try:

            def stalled() -> bool:
                now = time.monotonic()
                slow = [
                    s
                    for s in server.slots.slots()
                    if s.state is ConnState.RESPONDING and now - s.since > SLOW_RESPONSE_S
                ]
                return len(slow) == MAX_CLIENTS

            await poll(stalled, 20, "every slot stalled on a response for SLOW_RESPONSE_S")
            assert sum(rejected(server).values()) >= 8  # the 8 beyond the cap
            before = rejected(server).get("evicted_slow_response", 0)
            results = [await asyncio.to_thread(timed_get, port) for _ in range(5)]
            assert time.monotonic() - t_attack < RESPONSE_WRITE_TIMEOUT_S  # all still stalled
            worst = max(t for _, t in results)
            print(
                f"\nslow readers: {len(hostile)} clients; 5 GETs of a 4.5 MB document, "
                f"worst {worst * 1e3:.1f} ms; {rejected(server)}"
            )
            assert [c for c, _ in results] == [200] * 5, results
            assert worst < PROMPT_S + 1.0, results  # includes reading 4.5 MB
            # The first GET evicted a slow one; each then frees its own slot for the next.
            assert rejected(server)["evicted_slow_response"] >= before + 1
        finally:
            close_all(hostile)


# ---------------------------------------------------------------------------------- tokens

MASTER_TOKEN = "master-token-0123456789abcdef"
STATUS_TOKEN = "status-token-fedcba9876543210"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.timeout(60)
async def test_token_protects_status_and_metrics(tmp_path: Path):
    from pccl.master.daemon import Master

    async with Master(
        "127.0.0.1", 0, token=MASTER_TOKEN, status_token=STATUS_TOKEN, status_port=0
    ) as master:
        server = master.status_server
        assert server is not None
        port = server.port
        denied: list[dict[str, str] | None] = [
            None,
            bearer("wrong-token-0123456789abcdef"),
            bearer(MASTER_TOKEN[:-1]),
            bearer(MASTER_TOKEN + "x"),
            {"Authorization": f"Basic {MASTER_TOKEN}"},
            {"Authorization": "Bearer"},
            {"Authorization": MASTER_TOKEN},
        ]
        for path in ("/status", "/metrics", "/nope"):
            for headers in denied:
                code, hdrs, body = await asyncio.to_thread(http_get_full, port, path, headers)
                assert code == 401, (path, headers)
                assert hdrs["WWW-Authenticate"].startswith("Bearer"), hdrs
                assert "127.0.0.1" not in body and "peers" not in body, body
        for token in (MASTER_TOKEN, STATUS_TOKEN):
            for scheme in ("Bearer", "bearer"):
                headers = {"Authorization": f"{scheme} {token}"}
                code, _, body = await asyncio.to_thread(http_get, port, "/status", headers)
                assert code == 200 and json.loads(body)["master"]["port"] == master.port
            code, _, text = await asyncio.to_thread(http_get, port, "/metrics", bearer(token))
            assert code == 200
        fam = parse_prometheus(text)
        assert one(fam, "pccl_status_connections_rejected_total", reason="unauthorized") == 21

        # The pccl status client: --token-file, $PCCL_STATUS_TOKEN, and clear errors.
        where = f"127.0.0.1:{port}"
        good = tmp_path / "status.token"
        good.write_text(STATUS_TOKEN + "\n")
        bad = tmp_path / "bad.token"
        bad.write_text("not-the-token-0123456789\n")
        env = {k: v for k, v in os.environ.items() if k != "PCCL_STATUS_TOKEN"}

        def cli(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "pccl.cli", "status", "--master", where, *args],
                capture_output=True,
                text=True,
                timeout=30,
                env={**env, **extra_env},
            )

        res = await asyncio.to_thread(cli, "--token-file", str(good))
        assert res.returncode == 0, res.stderr
        assert "PEERS (0)" in res.stdout
        res = await asyncio.to_thread(cli, "--json", PCCL_STATUS_TOKEN=MASTER_TOKEN)
        assert res.returncode == 0 and json.loads(res.stdout)["peers"] == [], res.stderr
        res = await asyncio.to_thread(cli)
        assert res.returncode == 1 and not res.stdout
        assert "requires a credential" in res.stderr and "--token-file" in res.stderr
        res = await asyncio.to_thread(cli, "--token-file", str(bad))
        assert res.returncode == 1 and "refused the credential" in res.stderr, res.stderr
        res = await asyncio.to_thread(cli, "--token-file", str(bad), PCCL_STATUS_TOKEN=STATUS_TOKEN)
        assert res.returncode == 1, "--token-file must win over the environment"
        res = await asyncio.to_thread(cli, "--token-file", str(tmp_path / "missing"))
        assert res.returncode == 2 and "token" in res.stderr


@pytest.mark.timeout(30)
async def test_no_token_leaves_the_endpoint_open_and_ignores_credentials():
    from pccl.master.daemon import Master

    async with Master("127.0.0.1", 0, status_port=0) as master:
        assert master.status_server is not None
        port = master.status_server.port
        for headers in (None, bearer("anything-at-all-0123456789")):
            code, _, _ = await asyncio.to_thread(http_get, port, "/status", headers)
            assert code == 200
    # A status token alone also closes the endpoint.
    async with Master("127.0.0.1", 0, status_token=STATUS_TOKEN, status_port=0) as master:
        assert master.status_server is not None
        port = master.status_server.port
        assert (await asyncio.to_thread(http_get, port, "/status"))[0] == 401
        assert (await asyncio.to_thread(http_get, port, "/status", bearer(STATUS_TOKEN)))[0] == 200
    with pytest.raises(ValueError):
        Master(status_token="short")


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_cli_master_status_token_file(tmp_path: Path):
    """``pccl master --token-file --status-token-file``: both credentials open the endpoint."""
    master_file = tmp_path / "master.token"
    master_file.write_text(MASTER_TOKEN)
    status_file = tmp_path / "status.token"
    status_file.write_text(STATUS_TOKEN + "\n")
    args = ("--token-file", str(master_file), "--status-token-file", str(status_file))
    with running_status_master(tmp_path, *args) as master:
        port = master.status_port
        assert http_get(port, "/status")[0] == 401
        assert http_get(port, "/metrics", bearer("wrong-token-0123456789abcdef"))[0] == 401
        assert http_get(port, "/status", bearer(MASTER_TOKEN))[0] == 200
        assert http_get(port, "/metrics", bearer(STATUS_TOKEN))[0] == 200
        res = run_cli("status", "--master", f"127.0.0.1:{port}", "--token-file", str(status_file))
        assert res.returncode == 0 and "PEERS (0)" in res.stdout, res.stderr
    short = tmp_path / "short.token"
    short.write_text("short")
    res = run_cli("master", "--port", "0", "--status-port", "0", "--status-token-file", str(short))
    assert res.returncode == 2 and "shorter than" in res.stderr


# ---------------------------------------------------------------------------------- slot units


def test_connection_states_move_only_along_the_table():
    from pccl.master.status_conns import TRANSITIONS, ConnState, InvalidTransition, SlotTable

    assert set(TRANSITIONS) == set(ConnState)
    for src in ConnState:
        for dst in ConnState:
            table = SlotTable()
            slot = table.admit("a", 0.0).slot
            assert slot is not None
            path = {
                ConnState.READING_REQUEST: [],
                ConnState.RESPONDING: [ConnState.RESPONDING],
                ConnState.LINGERING: [ConnState.RESPONDING, ConnState.LINGERING],
                ConnState.CLOSED: [ConnState.CLOSED],
            }[src]
            for step in path:
                table.advance(slot, step, 1.0)
            assert slot.state is src
            if dst in TRANSITIONS[src]:
                table.advance(slot, dst, 2.0)
                assert slot.state is dst
                assert len(table) == (0 if dst is ConnState.CLOSED else 1)
            else:
                with pytest.raises(InvalidTransition):
                    table.advance(slot, dst, 2.0)
                assert slot.state is src
    # Closing twice (evicted, then the handler's own cleanup) frees the slot once.
    table = SlotTable(max_total=2, max_per_address=2)
    a = table.admit("x", 0.0).slot
    b = table.admit("x", 0.0).slot
    assert a is not None and b is not None
    table.advance(a, ConnState.CLOSED, 1.0)
    table.advance(a, ConnState.CLOSED, 2.0)
    assert len(table) == 1 and table.held_by("x") == 1


def admitted(table: Any, address: str, now: float) -> Any:
    """The slot ``table.admit`` gave a newcomer that must not be refused."""
    slot = table.admit(address, now).slot
    assert slot is not None
    return slot


def test_eviction_prefers_lingering_then_slow_then_reading():
    from pccl.master.status_conns import ConnState, Reason, SlotTable

    table = SlotTable(max_total=4, max_per_address=4, slow_response_s=1.0)
    reading, fresh, slow, lingering = (admitted(table, f"10.0.0.{i}", float(i)) for i in range(4))
    for s in (fresh, slow, lingering):
        table.advance(s, ConnState.RESPONDING, 4.2 if s is fresh else 4.0)
    table.advance(lingering, ConnState.LINGERING, 4.5)
    # 4.5 s: the slow one has responded only 0.5 s: not slow yet; lingering goes first.
    adm = table.admit("10.0.0.9", 4.5)
    assert adm.victim is lingering and adm.reason is Reason.EVICTED_LINGERING
    assert lingering.state is ConnState.CLOSED and adm.slot is not None
    newcomer = adm.slot
    table.advance(newcomer, ConnState.RESPONDING, 4.5)
    adm = table.admit("10.0.0.8", 4.9)  # nothing slow or lingering: the reading one
    assert adm.victim is reading and adm.reason is Reason.EVICTED_READING
    assert adm.slot is not None
    table.advance(adm.slot, ConnState.RESPONDING, 4.9)
    # Now all four respond; none for 1 s yet: the newcomer is refused.
    adm = table.admit("10.0.0.7", 4.95)
    assert adm.slot is None and adm.victim is None and adm.reason is Reason.REFUSED_FULL
    adm = table.admit("10.0.0.7", 5.1)  # the slow one crossed 1 s
    assert adm.victim is slow and adm.reason is Reason.EVICTED_SLOW_RESPONSE
    assert table.rejected == {
        Reason.EVICTED_LINGERING: 1,
        Reason.EVICTED_READING: 1,
        Reason.REFUSED_FULL: 1,
        Reason.EVICTED_SLOW_RESPONSE: 1,
    }
    assert len(table) == 4


def test_per_address_cap_evicts_only_that_address():
    from pccl.master.status_conns import ConnState, Reason, SlotTable

    table = SlotTable(max_total=10, max_per_address=3, slow_response_s=1.0)
    mine = [admitted(table, "a", float(i)) for i in range(3)]
    other = admitted(table, "b", 0.0)  # older than all of a's: still not a's victim
    adm = table.admit("a", 10.0)
    assert adm.victim is mine[0] and adm.reason is Reason.EVICTED_READING
    assert table.held_by("a") == 3 and other.state is ConnState.READING_REQUEST
    live = [s for s in table.slots() if s.address == "a"]
    for s in live:
        table.advance(s, ConnState.RESPONDING, 10.0)
    adm = table.admit("a", 10.5)  # a's slots all respond, fresh: a is refused, b is not
    assert adm.slot is None and adm.reason is Reason.REFUSED_ADDRESS_FULL
    assert table.admit("b", 10.5).slot is not None
    # When the table is full, the victim comes from the address holding the most slots.
    full = SlotTable(max_total=4, max_per_address=4)
    crowd = [admitted(full, "crowd", 1.0 + i) for i in range(3)]
    lone = admitted(full, "lone", 0.0)
    adm = full.admit("new", 5.0)
    assert adm.victim is crowd[0]
    assert lone.state is ConnState.READING_REQUEST


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["admit", "respond", "linger", "close", "wait"]),
            st.integers(0, 5),  # address (admit) or slot index (others)
        ),
        max_size=200,
    )
)
@settings(max_examples=200, deadline=None)
def test_slot_table_invariants_hold_for_any_sequence(ops: list[tuple[str, int]]):
    """Caps hold always; a newcomer is refused only when every slot it could take is a
    fresh response; counters add up."""
    from pccl.master.status_conns import ConnState, InvalidTransition, SlotTable

    table = SlotTable(max_total=6, max_per_address=3, slow_response_s=1.0)
    now = 0.0
    admitted = closed = 0
    for op, arg in ops:
        slots = table.slots()
        if op == "admit":
            addr = f"h{arg}"
            scope = (
                [s for s in slots if s.address == addr]
                if table.held_by(addr) >= 3
                else slots
                if len(slots) >= 6
                else None
            )
            adm = table.admit(addr, now)
            if scope is not None:
                stuck = all(s.state is ConnState.RESPONDING and now - s.since < 1.0 for s in scope)
                assert (adm.slot is None) == stuck
                assert (adm.victim is None) == stuck
            else:
                assert adm.slot is not None and adm.victim is None
            admitted += adm.slot is not None
        elif op == "wait":
            now += 0.4
        elif slots:
            slot = slots[arg % len(slots)]
            to = {
                "respond": ConnState.RESPONDING,
                "linger": ConnState.LINGERING,
                "close": ConnState.CLOSED,
            }[op]
            try:
                table.advance(slot, to, now)
                closed += to is ConnState.CLOSED
            except InvalidTransition:
                pass
        assert len(table) <= 6
        assert all(table.held_by(f"h{i}") <= 3 for i in range(6))
        assert all(s.state is not ConnState.CLOSED for s in table.slots())
    # Every admitted slot is still held, was evicted for a newcomer, or was closed by us.
    evicted = sum(n for r, n in table.rejected.items() if r.value.startswith("evicted"))
    assert admitted == evicted + closed + len(table)


def test_address_key_groups_ipv6_by_64():
    from pccl.master.status_conns import address_key

    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("/run/status.sock") == "/run/status.sock"


def test_authorized_accepts_only_configured_bearer_credentials():
    from pccl.master.status import authorized, credential_digest

    accepted = (credential_digest(b"token-one-0123456789"), credential_digest(b"token-two-xyz"))
    assert authorized(None, ()) and authorized("Basic junk", ())
    assert authorized("Bearer token-one-0123456789", accepted)
    assert authorized("bearer   token-two-xyz", accepted)
    for bad in (
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic token-one-0123456789",
        "token-one-0123456789",
        "Bearer token-one-012345678",
        "Bearer token-one-0123456789x",
        "Bearer token-three",
    ):
        assert not authorized(bad, accepted), bad


def test_read_token_prefers_the_file_and_rejects_unsendable(tmp_path: Path):
    from pccl.tools.status import TOKEN_ENV, read_token

    f = tmp_path / "t"
    f.write_bytes(b"  file-token \n")
    assert read_token(str(f), {TOKEN_ENV: "env-token"}) == b"file-token"
    assert read_token(None, {TOKEN_ENV: " env-token\n"}) == b"env-token"
    assert read_token(None, {TOKEN_ENV: "  "}) is None and read_token(None, {}) is None
    f.write_bytes(b"\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(str(f), {})
    f.write_bytes("t\u00f6ken".encode())
    with pytest.raises(ValueError, match="ASCII"):
        read_token(str(f), {})
    with pytest.raises(OSError):
        read_token(str(tmp_path / "missing"), {})


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "peer":
        try:
            _peer_main(sys.argv[2], json.loads(sys.argv[3]))
        except BaseException as e:
            _emit("error", type=type(e).__name__, message=str(e))
            sys.stdout.flush()
            os._exit(1)
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} peer MASTER JSON")


def test_sliced_renders_equal_the_whole_documents_and_serve_the_loop_between_slices():
    """``/status`` and ``/metrics`` are rendered a slice of peers at a time (10,000 peers are
    megabytes): the result must be exactly the one-piece document, and other loop work must
    run while a large document is being built."""
    import asyncio

    from pccl.master.metrics import RENDER_SLICE, metrics_body
    from pccl.master.status import Counters, metrics_text, status_body, status_document

    master = _state_master()
    st = master.state
    n = RENDER_SLICE * 3 + 7
    for i in range(n):
        pid = st.new_peer_id()
        st.register(pid, i % 40, f"10.1.{i // 250}.{i % 250}", 5000 + i)
        st.peers[pid].tx_bytes = i * 1000
        st.peers[pid].last_gbps = float("nan") if i == 5 else i / 7
    c = Counters(st)
    c.sample(st)
    now = time.monotonic()

    # The render itself notes its slices as loop steps (the master's step gauges): freeze the
    # meter so the one-piece documents, computed after, see the same values.
    master.steps.note = lambda value, now: None

    async def render() -> tuple[bytes, bytes, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        start = ticks
        body = await status_body(master, c, now)
        text = await metrics_body(master, c, now)
        t.cancel()
        return body, text, ticks - start

    body, text, ticks = asyncio.run(render())
    got, want = json.loads(body), json.loads(json.dumps(status_document(master, c, now)))
    for doc in (got, want):  # the interpreter's own counter may move between the two
        doc["master"].pop("gc_full_passes")
    assert got == want
    assert len(json.loads(body)["peers"]) == n
    assert text.decode() == metrics_text(master, c, now)
    fam = parse_prometheus(text.decode())  # strict: HELP/TYPE once per family, no repeats
    assert len(fam["pccl_peer_tx_bytes_total"]) == n
    assert one(fam, "pccl_peer_tx_bytes_total", peer=n, group=(n - 1) % 40) == (n - 1) * 1000
    # Other work ran between the slices: at least once per slice of peers in each document.
    assert ticks >= 2 * (n // RENDER_SLICE), ticks
