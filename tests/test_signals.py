"""Signals: a preempted peer (SIGTERM, or Ctrl-C's SIGINT) leaves cleanly, and its group carries on.

Real master (with its status endpoint), real peer processes. The heartbeat timeout is raised to
30 s for the run, so a survivor that had to wait for it instead of learning of the departure at
once would take far longer than the bound asserted here.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from test_status import get_status, running_status_master

HEARTBEAT_TIMEOUT_S = 30


@pytest.mark.e2e
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signalled_peer_departs_cleanly_and_the_group_carries_on(
    tmp_path: Path, workers: Any, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals
) -> None:
    monkeypatch.setenv("PCCL_HEARTBEAT_TIMEOUT_S", str(HEARTBEAT_TIMEOUT_S))
    with running_status_master(tmp_path) as master:
        ws = [
            workers.spawn("signal_peer.py", master, {"world": 3, "rounds": 10**6}, name=f"p{i}")
            for i in range(3)
        ]
        for w in ws:
            workers.wait_event(lambda x, e, w=w: x is w and e["event"] == "joined", 60, "join")
        for w in ws:
            workers.wait_event(
                lambda x, e, w=w: x is w and e["event"] == "reduced" and e["n"] >= 3, 60, "work"
            )
        victim = ws[2]
        vid = next(e["peer_id"] for e in victim.events if e["event"] == "joined")
        t0 = time.monotonic()
        victim.proc.send_signal(sig)
        for w in ws[:2]:  # the survivors carry on as two, long before a heartbeat timeout
            workers.wait_event(
                lambda x, e, w=w: x is w and e["event"] == "reduced" and e["world"] == 2,
                HEARTBEAT_TIMEOUT_S / 2,
                "the survivors' first all-reduce without the victim",
            )
        recovered = time.monotonic() - t0
        rc = victim.proc.wait(10)
        assert rc == (-signal.SIGTERM if sig == signal.SIGTERM else 130), rc
        doc = get_status(master.status_port)
        dep = [d for d in doc["departures"] if d["peer_id"] == vid]
        assert len(dep) == 1 and dep[0]["kind"] == "left", doc["departures"]
        assert f"received {sig.name}" in dep[0]["reason"]
        assert doc["totals"]["departures"]["lost"] == 0
        assert recovered < HEARTBEAT_TIMEOUT_S / 2
        for w in ws[:2]:
            w.proc.send_signal(signal.SIGTERM)
            assert w.proc.wait(10) == -signal.SIGTERM
