"""Peers on separate hosts: the master and four peers each in their own network namespace.

``pccl.tools.netns`` (``deploy/netns.py``) builds a private bridge (10.231.0.0/24, MTU 65535)
with one namespace per process; the real ``pccl master`` runs in one, four real peer processes
in the others. The peers all-reduce over veth links, optionally through a ``tc tbf`` rate limit,
and must end with byte-identical results, exactly equal to the sum they can compute themselves,
over a ring whose members really are on distinct addresses. A short ``pccl chaos --netns`` run
adds link cuts and rate limits to kills and joins. Skips cleanly where namespaces are not
permitted (not root, or ``ip netns add`` refused); always tears the namespaces down, and checks
that it did."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pccl.tools import netns
from pccl.tools.proc import spawn_master, stop

ROOT = Path(__file__).resolve().parent.parent
NODES = ["m", "p0", "p1", "p2", "p3"]
PEERS = NODES[1:]

# One peer: connect, wait for all four, run three all-reduces, print digests as one JSON line.
WORKER = r"""
import json, sys, time
import numpy as np, xxhash, pccl
addr, idx, world, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
comm = pccl.Communicator(addr, streams=4)
comm.connect(timeout=30)
comm.wait_for_world(world, timeout=30)
n = mib * (1 << 18)
def data(i):
    return ((np.arange(n, dtype=np.int64) * (i + 3) + 11 * i) % 2053 - 1000).astype(np.float32)
x = data(idx)
out = np.empty_like(x)
info = comm.all_reduce(x, out)
q = np.empty_like(x)
comm.all_reduce(x, q, op=pccl.ReduceOp.AVG, quantization=pccl.Quantization.UINT8, tag=1)
y = np.arange(1001, dtype=np.float64) * (idx + 1) / 3
comm.all_reduce(y, op=pccl.ReduceOp.SUM, tag=2)
expected = np.sum([data(i) for i in range(world)], axis=0, dtype=np.float32)
h = lambda a: xxhash.xxh3_128_hexdigest(a.tobytes())
print(json.dumps({
    "idx": idx, "peer_id": comm.peer_id, "world": comm.world_size,
    "hosts": sorted({host for _, host, _ in comm.aio.ring}),
    "sum": h(out), "exact": bool(np.array_equal(out, expected)),
    "uint8": h(q), "f64": h(y), "seconds": info.seconds,
}), flush=True)
comm.close()
"""


_kill = stop  # SIGKILL; reap


@pytest.fixture
def cluster() -> Iterator[Any]:
    """Five namespaces on a private bridge; skips where namespaces are not permitted."""
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")
    c = netns.Cluster(NODES)
    try:
        c.up()
    except netns.NetnsError as e:
        pytest.skip(f"cannot create network namespaces: {e}")
    try:
        yield c
    finally:
        c.down()
        left = [ns for ns in netns.list_namespaces() if ns.startswith(f"pccl-{c.tag}-")]
        assert not left, f"namespaces left behind: {left}"


def _start_master(c: Any, log: Path) -> tuple[subprocess.Popen[str], str]:
    with log.open("wb") as err:
        try:
            return spawn_master(None, host=c.ip("m"), prefix=c.exec_argv("m", []), stderr=err)
        except RuntimeError as e:
            raise AssertionError(f"master did not start: {e}\n{log.read_text()[-2000:]}") from None


def _run_peers(c: Any, addr: str, tmp: Path, mib: int, timeout: float) -> list[dict[str, Any]]:
    procs = []
    try:
        for i, node in enumerate(PEERS):
            argv = [sys.executable, "-c", WORKER, addr, str(i), str(len(PEERS)), str(mib)]
            with (tmp / f"{node}.log").open("wb") as err:
                procs.append(
                    subprocess.Popen(c.exec_argv(node, argv), stdout=subprocess.PIPE, stderr=err)
                )
        results = []
        deadline = time.monotonic() + timeout
        for node, p in zip(PEERS, procs):
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"peer {node} did not finish in {timeout}s\n"
                    + (tmp / f"{node}.log").read_text()[-2000:]
                ) from None
            log = (tmp / f"{node}.log").read_text()[-2000:]
            assert p.returncode == 0, f"peer {node} exited {p.returncode}\n{log}"
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            _kill(p)


def _assert_identical(results: list[dict[str, Any]], c: Any) -> None:
    assert len(results) == 4
    for key in ("sum", "uint8", "f64"):
        assert len({r[key] for r in results}) == 1, f"{key} differs across peers: {results}"
    assert all(r["exact"] for r in results), "SUM of integer-valued floats is not exact"
    assert all(r["world"] == 4 for r in results)
    assert len({r["peer_id"] for r in results}) == 4
    # The ring really spans four hosts: every peer dialled its neighbours on their own address.
    assert all(r["hosts"] == sorted(c.ip(n) for n in PEERS) for r in results), results


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_four_peers_in_four_namespaces_get_identical_bytes(cluster, tmp_path):
    master, addr = _start_master(cluster, tmp_path / "master.log")
    try:
        results = _run_peers(cluster, addr, tmp_path, mib=4, timeout=90)
        _assert_identical(results, cluster)
        assert master.poll() is None, "the master died"
    finally:
        _kill(master)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_rate_limited_link_is_honoured_and_results_stay_identical(cluster, tmp_path):
    # 8 MiB over a 4-peer ring: each peer sends 2*(3/4)*8 = 12 MiB; through 200 Mbit/s
    # (25 MB/s) one link alone needs about 0.5 s, so the all-reduce cannot finish sooner.
    cluster.set_rate("p2", "200mbit")
    master, addr = _start_master(cluster, tmp_path / "master.log")
    try:
        results = _run_peers(cluster, addr, tmp_path, mib=8, timeout=90)
        _assert_identical(results, cluster)
        assert min(r["seconds"] for r in results) > 0.4, results
    finally:
        _kill(master)


@pytest.mark.chaos
@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_chaos_with_link_cuts_and_rate_limits(tmp_path):
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")
    before = set(netns.list_namespaces())
    out = tmp_path / "chaos.json"
    argv = [
        sys.executable,
        "-m",
        "pccl.tools.chaos",
        "--peers",
        "4",
        "--duration",
        "40",
        "--seed",
        "7",
    ]
    argv += ["--faults", "kill,join,linkcut,ratelimit", "--interval", "2.5", "--netns"]
    argv += ["--json", str(out), "--log-dir", str(tmp_path)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=150)
    report = json.loads(out.read_text()) if out.exists() else {}
    detail = f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    assert r.returncode == 0, detail
    assert report["parity_violations"] == 0 and report["stalls"] == 0, detail
    assert report["faults"]["linkcut"] >= 1 and report["faults"]["ratelimit"] >= 1, detail
    assert report["faults"]["kill"] >= 1, detail
    assert report["parity_checks"] > 100 and report["steps"] > 50, detail
    assert report["netns"] is True
    leaked = [ns for ns in set(netns.list_namespaces()) - before if ns.startswith("pccl-")]
    assert not leaked, f"chaos left namespaces behind: {leaked}"


@pytest.mark.timeout(180)
def test_bench_state_uplink_mode_pulls_from_rate_limited_sources(tmp_path: Path) -> None:
    """``bench_state --uplink``: sources in their own namespaces behind tbf-limited links; the
    newcomer's state is verified and the bytes are split over the sources. (The speed figure
    is the benchmark's business, not this test's.)"""
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pccl.tools.bench_state", "--mib", "8", "--entries", "3"]
    cmd += ["--sources", "1,2", "--runs", "1", "--hash-gib", "0.01", "--timeout", "60"]
    cmd += ["--uplink", "400mbit", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, timeout=170)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    res = json.loads(out.read_text())
    assert res["uplink"] == "400mbit"
    for p in res["pull"]:
        assert p["all_verified"] and p["uplink"] == "400mbit"
        [run] = p["runs"]
        assert run["rx_bytes"] == 8 << 20 == sum(run["source_tx_bytes"])
        assert len(run["source_tx_bytes"]) == p["sources"] and min(run["source_tx_bytes"]) > 0
    left = [ns for ns in netns.list_namespaces() if ns.startswith("pccl-o")]
    assert not left, f"namespaces left behind: {left}"
