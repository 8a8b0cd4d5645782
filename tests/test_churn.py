"""Churn with real processes: a peer killed or hung mid all-reduce, and a peer joining a loop.

Fault tests follow torchft's counted fault injection: the fault is proven to have fired (exit
status -SIGKILL, or process state ``T`` for SIGSTOP), it lands while data is moving (the victim
reports ring payload received before the test strikes), every survivor raises
``CollectiveAborted`` within 5 s of the fault with its input intact, and after
``update_topology()`` the retry succeeds at world size 3 with exact, byte-identical results.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

WORLD = 4
VICTIM = 3
ABORT_WITHIN_S = 5.0


def _proc_state(pid: int) -> str:
    """Linux scheduler state letter of ``pid`` (``T`` = stopped, ``Z`` = zombie)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def _start_run(master, workers, *, inplace: bool, mib: int = 64, world: int = WORLD):
    victim = world - 1
    ws = [
        workers.spawn(
            "churn.py",
            master,
            {"world": world, "idx": i, "victim": victim, "inplace": inplace, "mib": mib},
            name=f"peer{i}",
        )
        for i in range(world)
    ]
    for w in ws:
        workers.wait_event(
            lambda ww, ev, w=w: ww is w and ev.get("event") == "ready", 120, f"{w.name} ready"
        )
    _, progress = workers.wait_event(
        lambda ww, ev: ww is ws[victim] and ev.get("event") == "progress",
        60,
        "the victim's ring operation to receive data",
    )
    return ws, progress


def _check_survivors(workers, ws, t_fault: float, progress: dict) -> None:
    survivors = [w for i, w in enumerate(ws) if i != VICTIM]
    results = workers.wait_exit(survivors, 120)
    # The fault struck mid-operation: data had started to flow but not all of it.
    assert 0 < progress["rx_bytes"] < progress["total_bytes"]
    hashes = set()
    for w in survivors:
        res = results[w.name]
        assert not res["first_completed"], f"{w.name} finished the all-reduce despite the fault"
        aborted = [ev for ev in w.events if ev.get("event") == "aborted"]
        assert len(aborted) == 1, w.events
        ab = aborted[0]
        assert ab["error_type"] == "CollectiveAborted"
        delay = ab["t_abort"] - t_fault
        assert 0 <= delay < ABORT_WITHIN_S, f"{w.name} aborted {delay:.2f}s after the fault"
        assert ab["intact"], f"{w.name}: input not intact after the abort"
        assert res["world"] == WORLD - 1 and res["info_world"] == WORLD - 1
        assert res["exact"], f"{w.name}: retry result differs from the survivors' exact sum"
        assert res["send_intact_after_retry"]
        hashes.add(res["hash"])
    assert len(hashes) == 1, "survivors disagree on the retry's bytes"


@pytest.mark.chaos
@pytest.mark.timeout(150)
def test_sigkill_mid_allreduce_aborts_survivors_and_retry_succeeds(master, workers):
    """In place: the survivors' buffers are restored bit-exactly after the abort."""
    ws, progress = _start_run(master, workers, inplace=True)
    victim = ws[VICTIM]
    t_fault = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.proc.wait(10) == -signal.SIGKILL
    _check_survivors(workers, ws, t_fault, progress)


@pytest.mark.chaos
@pytest.mark.timeout(150)
def test_sigstop_mid_allreduce_evicts_hung_peer_and_retry_succeeds(master, workers):
    """A hung (stopped) peer keeps its sockets open: only the master's heartbeat timeout
    (default heartbeat_timeout_s=3.0) can evict it. Out of place: ``send`` stays untouched."""
    ws, progress = _start_run(master, workers, inplace=False)
    victim = ws[VICTIM]
    t_fault = time.monotonic()
    os.kill(victim.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while _proc_state(victim.pid) != "T":
        assert time.monotonic() < deadline, "SIGSTOP did not take effect"
        time.sleep(0.01)  # polling the kernel's process state, not synchronising peers
    _check_survivors(workers, ws, t_fault, progress)
    assert _proc_state(victim.pid) == "T", "the victim was not hung for the whole episode"
    assert victim.proc.poll() is None


@pytest.mark.chaos
@pytest.mark.timeout(150)
def test_sigkill_with_two_tags_in_flight_aborts_both_and_retry_succeeds(master, workers):
    """Two concurrent in-place all-reduces (tag 1 SUM, tag 2 MAX) when a peer dies: survivors
    get CollectiveAborted from both handles within 5 s, both buffers restored, and running both
    again at world 3 gives exact, identical results."""
    world = 4
    ws = [
        workers.spawn(
            "churn_tags.py", master, {"world": world, "idx": i, "mib": 32}, name=f"peer{i}"
        )
        for i in range(world)
    ]
    victim = ws[-1]
    for w in ws:
        workers.wait_event(
            lambda ww, ev, w=w: ww is w and ev.get("event") == "ready", 120, f"{w.name} ready"
        )
    _, progress = workers.wait_event(
        lambda ww, ev: ww is victim and ev.get("event") == "progress", 60, "victim progress"
    )
    t_fault = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.proc.wait(10) == -signal.SIGKILL
    results = workers.wait_exit(ws[:-1], 120)
    assert 0 < progress["rx_bytes"] < progress["total_bytes"]
    for w in ws[:-1]:
        res = results[w.name]
        assert not res["first_completed"], f"{w.name} completed an operation despite the fault"
        (ab,) = [ev for ev in w.events if ev.get("event") == "aborted"]
        assert ab["outcome"] == {"1": "CollectiveAborted", "2": "CollectiveAborted"}, ab
        assert ab["intact"] == {"1": True, "2": True}, f"{w.name}: buffers not restored"
        for t in ab["t_abort"].values():
            assert 0 <= t - t_fault < ABORT_WITHIN_S
        assert res["exact"] == {"1": True, "2": True}
        assert res["worlds"] == [world - 1, world - 1]
    assert len({tuple(results[w.name]["hashes"]) for w in ws[:-1]}) == 1


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_sigkill_leaves_lone_survivor_with_too_few_peers(master, workers):
    """World 2, one killed mid all-reduce: the survivor aborts within 5 s with its buffer
    restored, its next update shrinks the run to itself, and a retry raises TooFewPeers
    (before any I/O, so its buffer is still intact)."""
    ws, progress = _start_run(master, workers, inplace=True, world=2)
    t_fault = time.monotonic()
    os.kill(ws[1].pid, signal.SIGKILL)
    assert ws[1].proc.wait(10) == -signal.SIGKILL
    res = workers.wait_exit([ws[0]], 60)["peer0"]
    assert 0 < progress["rx_bytes"] < progress["total_bytes"]
    assert not res["first_completed"]
    (ab,) = [ev for ev in ws[0].events if ev.get("event") == "aborted"]
    assert ab["error_type"] == "CollectiveAborted" and ab["intact"]
    assert 0 <= ab["t_abort"] - t_fault < ABORT_WITHIN_S
    assert res["world"] == 1
    assert res["retry_raised"] == "TooFewPeers"
    assert res["send_intact_after_retry"]


@pytest.mark.timeout(120)
def test_newcomer_is_admitted_while_peers_loop(master, workers):
    """Four peers loop update_topology -> all_reduce; a fifth connects meanwhile and is admitted
    at one of their updates: from that step on all five see world 5 and identical, exact
    results."""
    n = 1 << 16
    base = {"n": n, "final": 5, "after_join": 3, "max_seconds": 90}
    inc = [
        workers.spawn(
            "loop.py", master, {**base, "idx": i, "world": 4, "newcomer": False}, name=f"peer{i}"
        )
        for i in range(4)
    ]
    for w in inc:  # the incumbents are looping at world 4 before the newcomer exists
        workers.wait_event(
            lambda ww, ev, w=w: ww is w and ev.get("event") == "step" and ev["step"] >= 2,
            90,
            f"{w.name} looping",
        )
    new = workers.spawn("loop.py", master, {**base, "idx": 4, "newcomer": True}, name="peer4")
    workers.wait_exit([*inc, new], 90)

    steps = {w.name: [ev for ev in w.events if ev.get("event") == "step"] for w in [*inc, new]}
    join_step = steps["peer4"][0]["step"]
    assert all(ev["world"] == 5 for ev in steps["peer4"])
    for w in inc:
        evs = steps[w.name]
        worlds = [ev["world"] for ev in evs]
        assert [ev["step"] for ev in evs] == list(range(evs[0]["step"], evs[-1]["step"] + 1))
        first5 = next(ev["step"] for ev in evs if ev["world"] == 5)
        assert first5 == join_step, f"{w.name} saw world 5 from step {first5}, not {join_step}"
        assert set(worlds) == {4, 5} and worlds == sorted(worlds)
    by_step: dict[int, list[dict]] = {}
    for evs in steps.values():
        for ev in evs:
            assert ev["ok"], f"wrong all-reduce result: {ev}"
            assert ev["info_world"] == ev["world"]
            by_step.setdefault(ev["step"], []).append(ev)
    for step, evs in by_step.items():
        if step < steps["peer0"][0]["step"]:
            continue
        assert len(evs) == evs[0]["world"], f"step {step}: {len(evs)} reports"
        assert len({ev["hash"] for ev in evs}) == 1, f"step {step}: results differ across peers"
    assert {ev["world"] for ev in by_step[join_step]} == {5}
