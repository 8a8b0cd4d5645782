"""A master killed (SIGKILL) or stopped (SIGTERM) mid-run and restarted on the same port:
peers keep their state, reconnect with backoff under their ids, the restarted master re-forms
the ring from them, and the run continues at the same shared-state revision with equal hashes.
"""

from __future__ import annotations

import re
import signal
import socket
from collections import defaultdict
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

WORLD = 3
STEPS = 40


def _steps_by_worker(ws: Any) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for w in ws:
        out[w.name] = [e for e in w.events if e.get("event") == "step"]
    return out


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["kill9", "term", "int"]
)
def test_master_restart_keeps_revision_and_parity(master_factory, workers, sig) -> None:
    m1 = master_factory()
    params = {"world": WORLD, "n": 200_003, "steps": STEPS, "max_seconds": 120, "pause_s": 0.05}
    ws = [workers.spawn("restart.py", m1, params) for _ in range(WORLD)]
    workers.wait_event(
        lambda w, e: e.get("event") == "step" and e["step"] == 10, 60, "step 10 before the kill"
    )
    m1.expect_exit = True
    m1.proc.send_signal(sig)
    rc = m1.proc.wait(10)
    # The fault fired as intended: SIGKILL ends the master with no cleanup; SIGTERM and SIGINT
    # (Ctrl-C) are a clean stop that kicks every peer with SHUTDOWN and exits 0.
    log1 = m1.log.read_text(errors="replace")
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL, rc
        assert "master stopped" not in log1
    else:
        assert rc == 0, f"rc={rc}\n{m1.log_tail()}"
        kicked = set(re.findall(r"peer (\d+) removed \(shutdown: master shutting down", log1))
        assert len(kicked) == WORLD, log1[-3000:]
        assert "master stopped" in log1
    # Nobody serves the port until the restart: the peers really lost their master.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((m1.host, m1.port), timeout=5).close()
    m2 = master_factory(port=m1.port)
    try:
        results = workers.wait_exit(ws, 120)
    except AssertionError as e:
        log = m2.log.read_text(errors="replace").splitlines()
        events = "\n".join(x for x in log if " sync " not in x and " epoch " not in x)
        raise AssertionError(f"{e}\n--- restarted master, membership events\n{events}") from None

    steps = _steps_by_worker(ws)
    for w in ws:
        assert max(e["step"] for e in steps[w.name]) == STEPS - 1
    # The peers came back under their ids: the restarted master saw them resume and registered
    # exactly the ids the first one had accepted, and formed its ring from all of them.
    log2 = m2.log.read_text(errors="replace")
    ids1 = set(re.findall(r"peer (\d+) accepted into the run", log1))
    assert len(ids1) == WORLD, log1[-3000:]
    assert "peers are resuming" in log2
    assert set(re.findall(r"peer (\d+) registered", log2)) == ids1
    rings = re.findall(r"group 0 epoch \d+: ring \[([\d, ]+)\] \((\d+) peers in all\)", log2)
    assert rings and all(int(k) == WORLD and set(m.split(", ")) == ids1 for m, k in rings), rings
    # The restarted master served the rest of the run from the peers' revision (not from 0): it
    # synced every revision from the first one it saw to the last, and the first one is past the
    # step 10 the peers reached under the old master.
    revs1 = [int(r) for r in re.findall(r" sync \d+: revision (\d+)", log1)]
    revs2 = [int(r) for r in re.findall(r" sync \d+: revision (\d+)", log2)]
    assert revs2 and 10 < revs2[0] < STEPS, revs2
    assert sorted(set(revs2)) == list(range(revs2[0], STEPS)), revs2
    assert max(revs1) <= revs2[0], (revs1, revs2)  # at most the in-flight sync was re-run
    # Parity and revisions: every step's hash and revision equal across peers; revisions never
    # went back (the restarted master accepted the peers' revision, +1 per step).
    by_step: dict[int, set[tuple[str, int]]] = defaultdict(set)
    for evs in steps.values():
        for ev in evs:
            by_step[ev["step"]].add((ev["hash"], ev["revision"]))
    assert sorted(by_step) == list(range(STEPS))
    for s, seen in by_step.items():
        assert len(seen) == 1, f"step {s}: peers disagree {seen}"
    revs = [next(iter(by_step[s]))[1] for s in range(STEPS)]
    assert revs == list(range(STEPS)), revs
    # After the first sync, state never moved over the network: peers stayed identical.
    assert all(e["rx"] == 0 for evs in steps.values() for e in evs[1:])
    assert len({r["hash"] for r in results.values()}) == 1
