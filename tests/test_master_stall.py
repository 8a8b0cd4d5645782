"""A machine that freezes (every process stopped at once, as a VM pause or a host swap storm
does) must not cost the run its peers: the master does not count its own stall as the peers'
silence. Real master, real peer processes, SIGSTOP/SIGCONT of all of them."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.timeout(120)]


def test_a_frozen_machine_keeps_its_peers(master_factory, workers) -> None:
    master = master_factory(PCCL_HEARTBEAT_TIMEOUT_S="2.0")
    env = {"PCCL_HEARTBEAT_TIMEOUT_S": "2.0"}
    peers = [
        workers.spawn("freeze.py", master, {"world": 2, "n": 1 << 16}, env=env, stdin_pipe=True)
        for _ in range(2)
    ]
    ids = {}
    for _ in peers:
        w, ev = workers.wait_event(lambda w, ev: ev.get("event") == "ready", 60, "ready")
        ids[w.name] = ev["peer_id"]
    procs = [master.proc.pid] + [w.pid for w in peers]
    for pid in procs:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(3.5)  # longer than heartbeat_timeout_s: every heartbeat timer is overdue
    for pid in reversed(procs):  # the master last: the peers' sockets are live by then
        os.kill(pid, signal.SIGCONT)
    time.sleep(1.5)
    for w in peers:
        assert w.proc.stdin is not None
        w.proc.stdin.write(b"go\n")
        w.proc.stdin.flush()
    results = workers.wait_exit(peers, 60)
    assert all(r["ok"] and r["world"] == 2 for r in results.values()), results
    assert {w.name: results[w.name]["peer_id"] for w in peers} == ids  # same ids: never evicted
    assert len({r["digest"] for r in results.values()}) == 1
    log = master.log_tail()
    assert "HEARTBEAT_TIMEOUT" not in log, log
    assert "master loop stalled" in log, log  # the stall was seen and forgiven, not missed
