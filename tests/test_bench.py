"""``pccl bench allreduce`` end to end, and the WAN-emulating delay proxy.

The benchmark runs as a real subprocess (real master, real peers, real gloo ranks) on a small
buffer; we check the JSON a user reads: schema, parity, exactness and positive timings. The proxy
runs as a real ``python -m pccl.tools.wanproxy`` process in front of an echo server: it must add at
least the configured delay to a round trip, forward bytes intact, enforce its in-flight cap and
exit by itself when its launcher's pipe closes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash

from pccl.tools import wanproxy

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _run_bench(
    tmp_path: Path,
    *extra: str,
    timeout: float,
    mib: float = 4,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    out = tmp_path / "sub" / "result.json"
    cmd = [
        sys.executable,
        "-m",
        "pccl.cli",
        "bench",
        "allreduce",
        "--peers",
        "2",
        "--mib",
        str(mib),
        "--repeats",
        "5",
        "--json",
        str(out),
        *extra,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert json.loads(proc.stdout) == doc  # stdout carries the same document
    assert "median" in proc.stderr  # human progress goes to stderr
    return doc


def _check_half(res: dict[str, Any], nbytes: int, world: int, repeats: int) -> None:
    assert res["seconds"] > 0 and res["min_s"] > 0
    assert res["min_s"] <= res["seconds"] <= res["max_s"]
    assert len(res["times_s"]) == repeats
    expected_bw = 2 * (world - 1) / world * nbytes / res["seconds"] / 1e9
    assert res["busbw_gbps"] == pytest.approx(expected_bw)
    assert res["parity"] is True
    assert res["exact"] is True


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_bench_allreduce_json(tmp_path: Path) -> None:
    extra = ["--compare", "gloo,floor,tcp" if HAVE_TORCH else "floor,tcp"]
    doc = _run_bench(tmp_path, *extra, timeout=80)
    assert set(doc) == {
        "pccl",
        "gloo",
        "floor",
        "pccl_tcp",
        "speedup",
        "floor_ratio",
        "tcp_speedup",
        "tcp_floor_ratio",
        "config",
    }
    cfg = doc["config"]
    mach = cfg["machine"]
    assert mach["cores"] >= 1 and mach["kernel"] and mach["python"] and "backend" in mach
    assert isinstance(mach["caches"], dict)
    nbytes = 4 << 20
    assert cfg["bytes"] == nbytes and cfg["peers"] == 2 and cfg["repeats"] == 5
    p = doc["pccl"]
    _check_half(p, nbytes, 2, 5)
    # Two peers each send one half for reduce-scatter and one for all-gather: S bytes each.
    assert p["tx_bytes"] == nbytes and p["rx_bytes"] == nbytes
    if HAVE_TORCH:
        _check_half(doc["gloo"], nbytes, 2, 5)
        assert doc["speedup"] == pytest.approx(doc["gloo"]["seconds"] / p["seconds"])
    else:
        assert doc["gloo"] is None and doc["speedup"] is None
    # The floor: the plain TCP ring moved what a ring all-reduce moves per peer, in the same run.
    f = doc["floor"]
    assert 0 < f["min_s"] <= f["seconds"] <= f["max_s"] and len(f["times_s"]) == 5
    # Loopback peers: payloads through shared memory; the tcp half proves it can be turned off.
    assert cfg["shm_link_bytes"] > 0 and p["shm_links"] == [1, 1]
    t = doc["pccl_tcp"]
    _check_half(t, nbytes, 2, 5)
    assert t["shm_links"] == [0, 0] and t["hash"] == p["hash"]
    assert doc["tcp_floor_ratio"] == pytest.approx(t["seconds"] / f["seconds"])
    assert f["bytes_per_peer"] == nbytes  # 2 (N-1)/N of the buffer with N = 2
    assert len(f["cpu_s_per_op"]) == 2 and all(c > 0 for c in f["cpu_s_per_op"])
    assert doc["floor_ratio"] == pytest.approx(p["seconds"] / f["seconds"])


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_bench_allreduce_through_wan_proxy(tmp_path: Path) -> None:
    """Behind a 50 ms one-way delay with a per-stream window, 8 streams beat 1 stream.

    Scaled down from the README's 256 MiB / 4 MiB-cap figure: a 0.25 MiB window per stream caps
    one stream at a few MiB/s, so a 2.5 MiB all-reduce (1.25 MiB per ring step and link) is
    window-bound on one stream; 64 KiB chunks stripe each step over all 8 streams. Measured here:
    about 0.57 s on 1 stream, 0.16 s on 8 (3.6x); 2x is required.
    """
    delay_ms, cap_mib, mib, chunk = 50.0, 0.25, 2.5, 64 << 10
    nbytes = int(mib * (1 << 20))
    docs = {
        streams: _run_bench(
            tmp_path / f"streams{streams}",
            "--streams",
            str(streams),
            "--warmup",
            "0",
            "--wan-delay-ms",
            str(delay_ms),
            "--wan-cap-mib",
            str(cap_mib),
            mib=mib,
            env={"PCCL_CHUNK_BYTES": str(chunk)},
            timeout=60,
        )
        for streams in (1, 8)
    }
    for streams, doc in docs.items():
        assert doc["gloo"] is None and doc["speedup"] is None
        cfg = doc["config"]
        assert (cfg["wan_delay_ms"], cfg["wan_cap_mib"]) == (delay_ms, cap_mib)
        assert (cfg["bytes"], cfg["chunk_bytes"]) == (nbytes, chunk)
        # Proxied links stand for remote hosts: every requested stream is opened.
        assert cfg["streams"] == cfg["streams_used"] == streams
        p = doc["pccl"]
        _check_half(p, nbytes, 2, 5)
        # Data needs at least one one-way trip through a proxy, and the master's verdict follows.
        assert p["min_s"] >= delay_ms / 1e3
    one, eight = docs[1]["pccl"], docs[8]["pccl"]
    assert eight["busbw_gbps"] >= 2.0 * one["busbw_gbps"], (one["times_s"], eight["times_s"])


# ------------------------------------------------------------------------------ proxy


class _Echo:
    """A blocking echo server in a thread: echoes each connection until EOF, then half-closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            buf = bytearray(1 << 20)
            while n := conn.recv_into(buf):
                conn.sendall(memoryview(buf)[:n])
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        assert k, f"EOF after {got} of {n} bytes"
        got += k
    return bytes(buf)


@pytest.fixture
def echo() -> Any:
    e = _Echo()
    yield e
    e.close()


@pytest.mark.timeout(30)
def test_wanproxy_delays_round_trips_and_keeps_bytes(echo: _Echo) -> None:
    delay_ms, cap_mib = 30.0, 1.0
    with wanproxy.spawn(f"127.0.0.1:{echo.port}", delay_ms, cap_mib) as px:
        with socket.create_connection(("127.0.0.1", px.port), timeout=10) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for i in range(5):
                t0 = time.monotonic()
                c.sendall(bytes([i]))
                assert _recv_exactly(c, 1) == bytes([i])
                rtts.append(time.monotonic() - t0)
            # Each direction is delayed by delay_ms (the first trip also waits for the dial).
            assert min(rtts) >= 2 * delay_ms / 1e3
            assert min(rtts) < 2 * delay_ms / 1e3 + 0.2

            payload = os.urandom(6 << 20)
            received: list[bytes] = []
            reader = threading.Thread(
                target=lambda: received.append(_recv_exactly(c, len(payload))), daemon=True
            )
            t0 = time.monotonic()
            reader.start()
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            reader.join(20)
            elapsed = time.monotonic() - t0
            assert received, "echo did not come back"
            assert xxhash.xxh3_128_digest(received[0]) == xxhash.xxh3_128_digest(payload)
            assert c.recv(1) == b""  # the echo's half-close is forwarded as EOF
        # The cap is a window: at most cap bytes per round trip in each direction.
        window_rate = cap_mib * (1 << 20) / (2 * delay_ms / 1e3)
        assert elapsed >= 0.6 * len(payload) / window_rate
    assert px.proc.returncode == 0  # exited by itself when its stdin closed


@pytest.mark.timeout(30)
def test_wanproxy_exits_when_launcher_pipe_closes(echo: _Echo) -> None:
    px = wanproxy.spawn(f"127.0.0.1:{echo.port}", 5, 1)
    try:
        assert px.proc.stdin is not None
        px.proc.stdin.close()
        assert px.proc.wait(10) == 0
    finally:
        px.stop(grace_s=0)


@pytest.mark.timeout(30)
def test_wanproxy_closes_client_when_upstream_is_down() -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with (
        wanproxy.spawn(f"127.0.0.1:{dead}", 5, 1) as px,
        socket.create_connection(("127.0.0.1", px.port), timeout=10) as c,
    ):
        c.settimeout(10)
        try:
            assert c.recv(1) == b""
        except ConnectionResetError:
            pass  # an abort is the expected way to close it


@pytest.mark.timeout(30)
def test_wanproxy_cli_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pccl.tools.wanproxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--delay-ms",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "--delay-ms" in proc.stderr


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_bench_matrix_rows_share_their_references(tmp_path: Path) -> None:
    """``pccl bench matrix``: every row of the grid is a full allreduce run (parity checked);
    the floor is measured once per (size, peers) and shared by the rows of that pair, and the
    table printed at the end has one line per row."""
    out = tmp_path / "m.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pccl.cli",
            "bench",
            "matrix",
            "--mib",
            "1",
            "--peers",
            "2",
            "--kinds",
            "fp32,uint8",
            "--placement",
            "out,in",
            "--compare",
            "floor",
            "--repeats",
            "5",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["row"]["kind"], r["row"]["in_place"]) for r in rows] == [
        ("fp32", False),
        ("fp32", True),
        ("uint8", False),
        ("uint8", True),
    ]
    assert all(r["pccl"]["parity"] for r in rows)
    assert [r["config"]["quantization"] for r in rows] == ["none", "none", "uint8", "uint8"]
    assert all(r["floor"] == rows[0]["floor"] for r in rows) and rows[0]["floor"]["seconds"] > 0
    assert all(
        r["floor_ratio"] == pytest.approx(r["pccl"]["seconds"] / r["floor"]["seconds"])
        for r in rows
    )
    assert doc["machine"]["cores"] >= 1
    assert proc.stderr.count("| 1 | 2 |") == 4  # the table
    bad = subprocess.run(
        [sys.executable, "-m", "pccl.cli", "bench", "matrix", "--kinds", "fp64"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "fp64" in bad.stderr
