"""Metrics through ``prometheus_client``: the master's ``/metrics`` and each peer's own.

End-to-end: a real ``pccl master --status-port 0`` process and two ``pccl.aio.Communicator``
peers in one event loop all-reduce (one attempt refused for mismatched counts, then retried),
sync shared state and pass a quorum gate. We check that the master's ``/metrics`` parses with
``prometheus_client``'s own parser and carries the expected families and values, that each
peer's ``metrics()`` counts exactly what its operations returned (and agrees with what the
master says it sent), that a ``metrics_port`` serves parsable exposition and stops at
``close()``, and the same accessors on the blocking ``pccl.Communicator``. The pure parts
(recording, histogram buckets, retry memory) are tested without sockets.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from test_status import StatusMaster, http_get, running_status_master

import pccl
import pccl.aio

Families = dict[str, dict[str, Any]]


def parse(text: str) -> Families:
    """``{family name: {"type": ..., "samples": [Sample]}}``, parsed by prometheus_client."""
    out: Families = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"family {fam.name} repeated"
        out[fam.name] = {"type": fam.type, "samples": list(fam.samples)}
    return out


def value(fams: Families, sample: str, **labels: Any) -> float:
    """The one sample named ``sample`` whose labels include ``labels``."""
    want = {k: str(v) for k, v in labels.items()}
    hits: list[Sample] = [
        s
        for fam in fams.values()
        for s in fam["samples"]
        if s.name == sample and all(s.labels.get(k) == v for k, v in want.items())
    ]
    assert len(hits) == 1, (sample, labels, hits)
    return float(hits[0].value)


def scrape(port: int) -> tuple[str, str]:
    """``(content type, body)`` of ``GET /metrics`` on 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        return resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def status_master(tmp_path: Path) -> Iterator[StatusMaster]:
    with running_status_master(tmp_path) as master:
        yield master


async def _pair(address: str, **kw: Any) -> list[pccl.aio.Communicator]:
    comms = [pccl.aio.Communicator(address, streams=1, **kw) for _ in range(2)]

    async def start(c: pccl.aio.Communicator) -> None:
        await c.connect(timeout=30)
        await c.wait_for_world(2, timeout=30)

    await asyncio.gather(*(start(c) for c in comms))
    return comms


REDUCES = 3
COUNT = 4096


async def _workload(comms: list[pccl.aio.Communicator]) -> list[list[pccl.ReduceInfo]]:
    """REDUCES all-reduces at tag 0; tag 1 refused once (mismatched counts) then retried; a
    shared-state sync that moves one entry; a quorum gate. Returns each peer's ReduceInfos."""
    infos: list[list[pccl.ReduceInfo]] = [[], []]
    for step in range(REDUCES):
        data = [np.full(COUNT, float(i + step), np.float32) for i in range(2)]
        got = await asyncio.gather(*(c.all_reduce(d) for c, d in zip(comms, data, strict=True)))
        for i, info in enumerate(got):
            infos[i].append(info)
    bad = [np.ones(8 + i, np.float32) for i in range(2)]
    results = await asyncio.gather(
        *(c.all_reduce(d, tag=1) for c, d in zip(comms, bad, strict=True)),
        return_exceptions=True,
    )
    assert all(isinstance(r, pccl.ProtocolError) for r in results), results
    retry = [np.ones(8, np.float32) for _ in range(2)]
    got = await asyncio.gather(*(c.all_reduce(d, tag=1) for c, d in zip(comms, retry, strict=True)))
    for i, info in enumerate(got):
        infos[i].append(info)
    states = [pccl.SharedState({"w": np.full(256, float(i), np.float32)}) for i in range(2)]
    states[1].revision = 5  # peer 1's content wins: peer 0 fetches it
    syncs = await asyncio.gather(
        *(c.sync_shared_state(s) for c, s in zip(comms, states, strict=True))
    )
    assert syncs[0].rx_bytes == 256 * 4 and syncs[1].tx_bytes == 256 * 4, syncs
    gates = await asyncio.gather(
        *(c.quorum_gate(7, ready=True, min_quorum=2, timeout=20) for c in comms)
    )
    assert all(g.included for g in gates)
    return infos


# ---------------------------------------------------------------------------------- e2e


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_master_and_peer_metrics_after_all_reduces(status_master: StatusMaster) -> None:
    comms = await _pair(status_master.address, metrics_port=0)
    try:
        infos = await _workload(comms)
        ids = [c.peer_id for c in comms]

        # ------------------------------------------------------------ the peers' accessor
        for c, mine in zip(comms, infos, strict=True):
            got = c.metrics()
            assert all(isinstance(v, (int, float)) for v in got.values()), got
            assert got["all_reduce_completed"] == REDUCES + 1
            assert got["all_reduce_aborted"] == 1 and got["all_reduce_retried"] == 1
            assert got["all_reduce_tx_bytes"] == sum(i.tx_bytes for i in mine) > 0
            assert got["all_reduce_rx_bytes"] == sum(i.rx_bytes for i in mine) > 0
            assert got["all_reduce_seconds_count"] == REDUCES + 1
            assert got["all_reduce_seconds_sum"] == pytest.approx(sum(i.seconds for i in mine))
            assert got["state_syncs"] == 1 and got["state_transfers"] == 1
            assert got["gates_included"] == 1 and got["gates_aborted"] == 0
            assert got["group_world_size"] == 2
            assert got["p2p_authenticated"] >= 1  # the predecessor's ring stream
        m0, m1 = (c.metrics() for c in comms)
        assert (m0["state_rx_bytes"], m0["state_tx_bytes"]) == (256 * 4, 0)
        assert (m1["state_rx_bytes"], m1["state_tx_bytes"]) == (0, 256 * 4)

        # ------------------------------------------------------------ the master's /metrics
        code, ctype, text = await asyncio.to_thread(http_get, status_master.status_port, "/metrics")
        assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
        fams = parse(text)
        expected = {
            "pccl_master_uptime_seconds": "gauge",
            "pccl_peers": "gauge",
            "pccl_phase": "gauge",
            "pccl_epoch": "gauge",
            "pccl_topology_changes": "counter",
            "pccl_collectives_completed": "counter",
            "pccl_aborts": "counter",
            "pccl_departures": "counter",
            "pccl_group_world_size": "gauge",
            "pccl_peer_tx_bytes": "counter",
            "pccl_peer_last_gbps": "gauge",
            "pccl_peer_collectives_completed": "counter",
            "pccl_peer_last_seen_seconds": "gauge",
            "pccl_status_connections_rejected": "counter",
        }
        assert {k: fams[k]["type"] for k in expected} == expected
        samples = [s for f in fams.values() for s in f["samples"]]
        assert not [s.name for s in samples if s.name.endswith("_created")]
        assert value(fams, "pccl_peers", state="accepted") == 2
        assert value(fams, "pccl_phase", phase="idle") == 1
        assert value(fams, "pccl_group_world_size", group=0) == 2
        assert value(fams, "pccl_collectives_completed_total") == REDUCES + 1  # per group op
        assert value(fams, "pccl_aborts_total") == 1
        for pid, c in zip(ids, comms, strict=True):
            # what the master counted is what the peer counted itself
            sent = c.metrics()["all_reduce_tx_bytes"]
            assert value(fams, "pccl_peer_tx_bytes_total", peer=pid, group=0) == sent
            assert value(fams, "pccl_peer_collectives_completed_total", peer=pid) == REDUCES + 1
            assert value(fams, "pccl_peer_last_gbps", peer=pid) > 0

        # ------------------------------------------------------------ a peer's metrics_port
        port = comms[0].metrics_port
        assert port is not None and port > 0
        ctype, text = await asyncio.to_thread(scrape, port)
        assert ctype.startswith("text/plain; version=0.0.4")
        fams = parse(text)
        assert fams["pccl_comm_all_reduce_seconds"]["type"] == "histogram"
        assert value(fams, "pccl_comm_all_reduce_completed_total") == REDUCES + 1
        assert value(fams, "pccl_comm_all_reduce_aborted_total") == 1
        assert value(fams, "pccl_comm_all_reduce_retried_total") == 1
        assert value(fams, "pccl_comm_all_reduce_tx_bytes_total") == m0["all_reduce_tx_bytes"]
        assert value(fams, "pccl_comm_all_reduce_seconds_count") == REDUCES + 1
        assert value(fams, "pccl_comm_all_reduce_seconds_bucket", le="+Inf") == REDUCES + 1
        buckets = [
            s.value for s in fams["pccl_comm_all_reduce_seconds"]["samples"] if "le" in s.labels
        ]
        assert buckets == sorted(buckets)  # cumulative
        assert value(fams, "pccl_comm_state_rx_bytes_total") == 256 * 4
        assert value(fams, "pccl_comm_quorum_gates_total", outcome="included") == 1
        assert value(fams, "pccl_comm_group_world_size") == 2
        assert comms[0].metrics_port != comms[1].metrics_port  # one registry and port each
    finally:
        await asyncio.gather(*(c.close() for c in comms))
    assert all(c.metrics_port is None for c in comms)
    assert refused(port)  # stopped serving at close()
    assert comms[0].metrics()["all_reduce_completed"] == REDUCES + 1  # still readable


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_blocking_communicator_metrics_and_port(master: Any) -> None:
    comm = pccl.Communicator(master.address, metrics_port=0)
    try:
        comm.connect(timeout=30)  # a lone first peer is admitted at once
        port = comm.metrics_port
        assert port is not None
        got = comm.metrics()
        assert got["all_reduce_completed"] == 0 and got["group_world_size"] == 1
        with pytest.raises(pccl.TooFewPeers):
            comm.all_reduce(np.zeros(4, np.float32))  # refused before it starts: not counted
        assert comm.metrics()["all_reduce_aborted"] == 0
        _, text = scrape(port)
        assert value(parse(text), "pccl_comm_group_world_size") == 1
        assert comm.metrics_registry is comm.aio.metrics_registry
    finally:
        comm.close()
    assert comm.metrics_port is None and refused(port)


def test_metrics_port_is_off_by_default_and_validated() -> None:
    comm = pccl.aio.Communicator("127.0.0.1:1")
    assert comm.metrics_port is None
    assert comm.metrics()["all_reduce_completed"] == 0
    for bad in (-1, 65536, True, "9100"):
        with pytest.raises(ValueError, match="metrics_port"):
            pccl.aio.Communicator("127.0.0.1:1", metrics_port=bad)


# ---------------------------------------------------------------------------------- pure


def test_peer_metrics_record_and_expose_without_sockets() -> None:
    from pccl.peer.metrics import FAILED_TAG_MEMORY, LATENCY_BUCKETS_S, Live, PeerMetrics

    pm = PeerMetrics(lambda: Live(3, 2, {"accepted": 4, "authenticated": 3}))
    pm.all_reduce_started(5)
    pm.all_reduce_done(5, None)
    pm.all_reduce_started(5)  # a retry of the tag that failed
    pm.all_reduce_done(5, pccl.ReduceInfo(3, 100, 90, 0.3))
    pm.all_reduce_started(5)  # after a success: not a retry
    pm.all_reduce_done(5, pccl.ReduceInfo(3, 10, 9, 1000.0))  # beyond every bucket
    pm.sync_done(pccl.SyncInfo(1, 0, 0))  # steady state: no transfer
    pm.sync_done(pccl.SyncInfo(2, 0, 64))
    pm.sync_done(None)
    pm.gate_done(True)
    pm.gate_done(False)
    pm.gate_done(None)
    snap = pm.snapshot()
    assert snap["all_reduce_completed"] == 2 and snap["all_reduce_aborted"] == 1
    assert snap["all_reduce_retried"] == 1
    assert (snap["all_reduce_tx_bytes"], snap["all_reduce_rx_bytes"]) == (110, 99)
    assert snap["all_reduce_seconds_last"] == 1000.0
    assert (snap["state_syncs"], snap["state_syncs_failed"], snap["state_transfers"]) == (2, 1, 1)
    assert (snap["gates_included"], snap["gates_excluded"], snap["gates_aborted"]) == (1, 1, 1)
    assert (snap["group_world_size"], snap["stale_frames"], snap["p2p_accepted"]) == (3, 2, 4)

    fams = parse(pm.exposition().decode())
    assert fams["pccl_comm_all_reduce_seconds"]["type"] == "histogram"
    assert value(fams, "pccl_comm_all_reduce_seconds_bucket", le="0.25") == 0
    assert value(fams, "pccl_comm_all_reduce_seconds_bucket", le="0.5") == 1
    top = str(LATENCY_BUCKETS_S[-1])
    assert value(fams, "pccl_comm_all_reduce_seconds_bucket", le=top) == 1
    assert value(fams, "pccl_comm_all_reduce_seconds_bucket", le="+Inf") == 2
    assert value(fams, "pccl_comm_all_reduce_seconds_sum") == pytest.approx(1000.3)
    assert value(fams, "pccl_comm_p2p_connections_total", outcome="authenticated") == 3
    assert value(fams, "pccl_comm_quorum_gates_total", outcome="excluded") == 1
    # a registry of its own, never the process-wide default
    from prometheus_client import REGISTRY

    assert pm.registry() is not REGISTRY
    assert not [f.name for f in REGISTRY.collect() if f.name.startswith("pccl_")]

    # Tags that failed are remembered within a bound.
    for tag in range(FAILED_TAG_MEMORY + 10):
        pm.all_reduce_done(tag, None)
    pm.all_reduce_started(0)  # forgotten: the oldest
    pm.all_reduce_started(FAILED_TAG_MEMORY + 9)
    assert pm.snapshot()["all_reduce_retried"] == 2
