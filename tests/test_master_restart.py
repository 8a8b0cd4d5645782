"""A master killed (SIGKILL) or stopped (SIGTERM) mid-run and restarted on the same port:
peers keep their state, reconnect with backoff under their ids, the restarted master re-forms
the ring from them, and the run continues at the same shared-state revision with equal hashes.
"""

from __future__ import annotations

import signal
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
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "term"])
def test_master_restart_keeps_revision_and_parity(master_factory, workers, sig) -> None:
    m1 = master_factory()
    params = {"world": WORLD, "n": 200_003, "steps": STEPS, "max_seconds": 120, "pause_s": 0.05}
    ws = [workers.spawn("restart.py", m1, params) for _ in range(WORLD)]
    workers.wait_event(
        lambda w, e: e.get("event") == "step" and e["step"] == 10, 60, "step 10 before the kill"
    )
    m1.expect_exit = True
    m1.proc.send_signal(sig)
    m1.proc.wait(10)
    assert m1.proc.returncode is not None  # the fault fired: the master is gone
    before = {w.name: max(e["step"] for e in w.events if e.get("event") == "step") for w in ws}
    m2 = master_factory(port=m1.port)
    try:
        results = workers.wait_exit(ws, 120)
    except AssertionError as e:
        log = m2.log.read_text(errors="replace").splitlines()
        events = "\n".join(x for x in log if " sync " not in x and " epoch " not in x)
        raise AssertionError(f"{e}\n--- restarted master, membership events\n{events}") from None

    steps = _steps_by_worker(ws)
    # Progress after the restart, by every peer.
    for w in ws:
        assert max(e["step"] for e in steps[w.name]) == STEPS - 1
        assert max(e["step"] for e in steps[w.name]) > before[w.name]
    # Parity and revisions: every step's hash and revision equal across peers; revisions never
    # went back (the restarted master accepted the peers' revision, +1 per step).
    by_step: dict[int, set[tuple[str, int]]] = defaultdict(set)
    for evs in steps.values():
        for e in evs:
            by_step[e["step"]].add((e["hash"], e["revision"]))
    assert sorted(by_step) == list(range(STEPS))
    for s, seen in by_step.items():
        assert len(seen) == 1, f"step {s}: peers disagree {seen}"
    revs = [next(iter(by_step[s]))[1] for s in range(STEPS)]
    assert revs == list(range(STEPS)), revs
    # After the first sync, state never moved over the network: peers stayed identical.
    assert all(e["rx"] == 0 for evs in steps.values() for e in evs[1:])
    assert len({r["hash"] for r in results.values()}) == 1
    assert "epoch" in m2.log_tail()  # the new master formed a ring
