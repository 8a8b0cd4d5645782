"""The WAN testbed (pccl.tools.wantestbed): seeded rates with a planted fast ring, the brute
force over orders, pair links that really carry peer traffic at their own tbf rate, and (slow,
root) the ring-order benchmark: optimize_topology() within 10 % of the best order and at least
2x faster than the worst."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pccl.tools import netns, wantestbed

pytestmark = pytest.mark.timeout(300)


def test_planted_rates_have_a_fast_ring_and_slow_pairs() -> None:
    rates = wantestbed.planted_rates(6, "200mbit", "20mbit", seed=1)
    assert len(rates) == 30 and all(rates[(i, j)] == rates[(j, i)] for i, j in rates)
    assert "20mbit" in rates.values()
    best, worst = wantestbed.brute_force(6, rates)
    assert wantestbed._bottleneck(best, rates) == 200.0
    assert wantestbed._bottleneck(worst, rates) == 20.0
    assert sorted(best) == sorted(worst) == list(range(6))
    every = [[0, *p] for p in itertools.permutations(range(1, 6))]
    assert max(wantestbed._bottleneck(o, rates) for o in every) == 200.0


def _bed_or_skip(peers: int, rates: dict[tuple[int, int], str]) -> wantestbed.Testbed:
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")
    try:
        return wantestbed.Testbed(peers, rates).up()
    except netns.NetnsError as e:
        pytest.skip(f"cannot create the testbed: {e}")


def _throughput_mbit(bed: wantestbed.Testbed, src: str, dst: str, nbytes: int) -> float:
    """Receiver-timed TCP transfer from ``src`` to ``dst``'s address (over their pair link)."""
    server = (
        "import socket,sys,time;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
        "socket.SO_REUSEADDR,1);s.bind((sys.argv[1],5201));s.listen();print('up',flush=True);"
        "c,_=s.accept();n=0;t=None\n"
        "while n<int(sys.argv[2]):\n b=c.recv(1<<20)\n t=t or time.perf_counter()\n n+=len(b)\n"
        "print(n*8/(time.perf_counter()-t)/1e6,flush=True)"
    )
    client = (
        "import socket,sys;c=socket.create_connection((sys.argv[1],5201),10);"
        "c.sendall(bytes(int(sys.argv[2])))"
    )
    srv = subprocess.Popen(
        bed.cluster.exec_argv(dst, [sys.executable, "-c", server, bed.ip(dst), str(nbytes)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "up"
        subprocess.run(
            bed.cluster.exec_argv(src, [sys.executable, "-c", client, bed.ip(dst), str(nbytes)]),
            check=True,
            timeout=60,
        )
        return float(srv.stdout.readline())
    finally:
        srv.kill()
        srv.wait(10)


def test_pair_links_carry_peer_traffic_at_their_own_rate() -> None:
    rates = {(0, 1): "20mbit", (1, 0): "20mbit", (0, 2): "200mbit", (2, 0): "200mbit"}
    bed = _bed_or_skip(3, rates)
    try:
        route = subprocess.run(
            bed.cluster.exec_argv("p0", ["ip", "route", "get", bed.ip("p1")]),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "dev l1" in route  # the pair link, not the bridge
        slow = _throughput_mbit(bed, "p0", "p1", 4 << 20)
        fast = _throughput_mbit(bed, "p0", "p2", 16 << 20)
        assert 10 < slow < 40  # 20 Mbit/s (tbf burst counted)
        assert fast > 4 * slow
    finally:
        bed.down()
    assert not [ns for ns in netns.list_namespaces() if bed.cluster.tag in ns]


@pytest.mark.slow
def test_optimized_ring_is_near_the_best_order_and_far_from_the_worst(tmp_path: Path) -> None:
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")
    out = tmp_path / "tb.json"
    args = ["topology", "--peers", "4", "--mib", "2", "--repeats", "2", "--json", str(out)]
    rc = wantestbed.main(args)
    assert rc == 0

    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert s["optimized_vs_best"] <= 1.10
    assert s["worst_vs_optimized"] >= 2.0
    assert doc["start_then_optimized"]["rewired"] is True
    assert doc["start_then_optimized"]["after"]["parity"] is True


def test_bench_allreduce_runs_on_the_testbed(tmp_path: Path) -> None:
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pccl.cli", "bench", "allreduce", "--peers", "3", "--mib", "1"]
    cmd += ["--streams", "2", "--repeats", "5", "--warmup", "1", "--json", str(out)]
    cmd += ["--testbed", "200mbit,20mbit,1", "--optimize"]
    subprocess.run(cmd, check=True, timeout=240, capture_output=True)
    doc = json.loads(out.read_text())
    assert doc["config"]["testbed"] == "200mbit,20mbit,1" and doc["config"]["optimize"]
    assert doc["pccl"]["parity"] is True and doc["pccl"]["exact"] is True


def test_auto_streams_follow_a_delayed_links_bdp_on_the_testbed(tmp_path: Path) -> None:
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")
    out = tmp_path / "live.json"
    args = ["streams-live", "--delays", "25", "--streams", "1", "--mib", "4", "--repeats", "2"]
    assert wantestbed.main([*args, "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"]["25"]
    assert run["1"]["streams_open"] == [1, 1] and run["1"]["parity"]
    # 1 Gbit/s x 50 ms RTT is ~6 MB in flight: more than one 4 MiB window, so auto opens more
    # than one stream, sized from what the peers measured over the delayed path.
    auto = run["auto"]
    assert auto["parity"] and all(2 <= k <= 16 for k in auto["streams_open"])
    for links in auto["links"]:
        ((gbps, rtt_ms),) = links.values()
        assert 40 < rtt_ms < 200 and gbps > 0.3
