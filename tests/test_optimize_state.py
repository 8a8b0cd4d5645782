"""``optimize_topology()`` in the master's state machine, without sockets (pccl.master.optimize).

Driven through :class:`test_master_state.Harness`: the vote, the probe plans (every pair once,
no shared endpoint per round, only uncached pairs), the decision (re-order when the solver's
bottleneck beats the ring's by ``min_gain``, else "order kept"), churn and deadlines answered
with a retryable ``TopologyDone(ok=False)``, and ``auto_optimize_topology``.
"""

from __future__ import annotations

import itertools
import time

import pytest
from pccl.master.optimize import link_samples
from pccl.master.topology import solve_ring
from test_master_state import Harness, ring_ids

from pccl import messages as m
from pccl.config import Config

pytestmark = pytest.mark.timeout(30)

FAST, SLOW = 1.0, 0.1


def rates(slow_pairs: set[frozenset[int]], peers: list[int]) -> dict[tuple[int, int], float]:
    return {
        (a, b): SLOW if frozenset((a, b)) in slow_pairs else FAST
        for a, b in itertools.permutations(peers, 2)
    }


def answer_plans(h: Harness, gbps: dict[tuple[int, int], float]) -> dict[int, m.ProbePlan]:
    """Every plan sent is answered with ``gbps`` for its targets; returns the plans."""
    plans = {pid: msg for pid, msg in h.take(m.ProbePlan)}
    for pid, plan in plans.items():
        assert isinstance(plan, m.ProbePlan)
        links = [(t, gbps[(pid, t)], 1.0 + t) for t, _, _ in plan.targets if t]
        h.state.optimizer.on_report(pid, m.ProbeReport(plan.round_id, links))
    return plans


def optimize(h: Harness, pids: list[int], min_gain: float = 0.1, reprobe: bool = False) -> None:
    for p in pids:
        h.state.optimizer.on_vote(p, m.OptimizeTopology(min_gain, reprobe))


def test_probe_plans_cover_every_pair_once_per_direction_in_disjoint_rounds() -> None:
    h = Harness()
    pids = h.admit(5)
    optimize(h, pids)
    plans = {pid: msg for pid, msg in h.take(m.ProbePlan)}
    assert sorted(plans) == pids
    nrounds = {len(p.targets) for p in plans.values()}  # type: ignore[attr-defined]
    assert len(nrounds) == 1
    directed = set()
    for r in range(nrounds.pop()):
        partner = {pid: p.targets[r][0] for pid, p in plans.items()}  # type: ignore[attr-defined]
        for a, b in partner.items():
            if b:
                assert partner[b] == a  # both ends probe each other that round, nobody else
                directed.add((a, b))
    assert directed == set(itertools.permutations(pids, 2))
    for plan in plans.values():
        for t, host, port in plan.targets:  # type: ignore[attr-defined]
            if t:
                assert (host, port) == (h.state.peers[t].host, h.state.peers[t].port)


def test_group_rewires_to_the_solved_order_and_keeps_it_next_time() -> None:
    h = Harness()
    pids = h.admit(4)
    assert h.ring() == pids  # admission order: 1 -> 2 -> 3 -> 4 -> 1
    a, b, c, d = pids
    # Slow between ring neighbours: the order a, c, b, d avoids every slow pair.
    gbps = rates({frozenset((a, b)), frozenset((c, d))}, pids)
    optimize(h, pids)
    answer_plans(h, gbps)
    (_, topo), *rest = h.take(m.Topology)
    assert len(rest) == len(pids) - 1
    assert isinstance(topo, m.Topology)
    want = solve_ring(pids, gbps, {k: 1.0 + k[1] for k in gbps})
    assert tuple(ring_ids(topo)) == want.order and want.bottleneck_gbps == FAST
    h.ready()
    done = h.take(m.TopologyDone)
    assert sorted(p for p, _ in done) == pids and all(x.ok for _, x in done)  # type: ignore[attr-defined]
    assert h.state.optimizer.last[0]["decision"] == "rewired"
    # Again: every link is cached, nothing is probed, the order is already the best one.
    optimize(h, pids)
    assert not h.take(m.ProbePlan) and not h.take(m.Topology)
    kept = h.take(m.TopologyDone)
    assert sorted(p for p, _ in kept) == pids
    assert all(x.ok and "already optimal" in x.reason for _, x in kept)  # type: ignore[attr-defined]
    matrix = h.state.optimizer.status(0, h.group_of(a))["links"]
    assert matrix["peers"] == pids and matrix["gbps"][0][1] == SLOW
    fams = {name: samples for name, _, _, samples in link_samples(h.state.optimizer)}
    assert len(fams["pccl_link_gbps"]) == 12  # every directed link of 4 peers
    assert ({"src": a, "dst": b}, SLOW) in fams["pccl_link_gbps"]
    assert ({"decision": "rewired"}, 1.0) in fams["pccl_topology_optimizations_total"]


def test_a_small_gain_keeps_the_order() -> None:
    h = Harness()
    pids = h.admit(4)
    a, b = pids[:2]
    gbps = rates(set(), pids)
    gbps[(a, b)] = gbps[(b, a)] = 0.95  # the ring's slowest hop is 5 % below the best order's
    optimize(h, pids, min_gain=0.1)
    answer_plans(h, gbps)
    assert not h.take(m.Topology)
    kept = h.take(m.TopologyDone)
    assert len(kept) == 4 and all(x.ok and "below min_gain" in x.reason for _, x in kept)  # type: ignore[attr-defined]


def test_a_departure_while_probing_fails_the_vote_retryably() -> None:
    h = Harness()
    pids = h.admit(4)
    optimize(h, pids)
    plans = h.take(m.ProbePlan)
    assert len(plans) == 4
    h.drop(pids[2])
    done = h.take(m.TopologyDone)
    assert sorted(p for p, _ in done) == [pids[0], pids[1], pids[3]]
    assert all(not x.ok and "left" in x.reason and "retry" in x.reason for _, x in done)  # type: ignore[attr-defined]
    assert not h.take(m.Topology)
    # A late report of the abandoned round changes nothing; the group recovers as usual.
    h.state.optimizer.on_report(pids[0], m.ProbeReport(plans[0][1].round_id, []))  # type: ignore[attr-defined]
    h.vote(pids[0], pids[1], pids[3])
    assert ring_ids(h.take(m.Topology)[0][1]) == [pids[0], pids[1], pids[3]]  # type: ignore[arg-type]


def test_a_departure_of_a_peer_yet_to_vote_fails_the_vote_at_once() -> None:
    h = Harness()
    pids = h.admit(3)
    optimize(h, pids[:2])
    h.drop(pids[2])  # it never voted: the ring is broken, the voters must not wait it out
    done = h.take(m.TopologyDone)
    assert sorted(p for p, _ in done) == pids[:2]
    assert all(not x.ok and "left" in x.reason for _, x in done)  # type: ignore[attr-defined]
    assert not h.state.optimizer.rounds


def test_votes_are_refused_with_collectives_outstanding_or_before_admission() -> None:
    h = Harness()
    pids = h.admit(2)
    newcomer = h.join()
    h.initiate(pids[0], tag=5)
    optimize(h, [pids[0], newcomer])
    done = dict(h.take(m.TopologyDone))
    assert not done[pids[0]].ok and "collectives outstanding" in done[pids[0]].reason  # type: ignore[attr-defined]
    assert not done[newcomer].ok and "not accepted" in done[newcomer].reason  # type: ignore[attr-defined]


def test_deadlines_end_a_vote_and_a_probe_round() -> None:
    h = Harness()
    pids = h.admit(3)
    optimize(h, pids[:2])
    h.state.tick(time.monotonic() + h.state.config.vote_timeout_s + 1)
    done = h.take(m.TopologyDone)
    assert sorted(p for p, _ in done) == pids[:2]
    assert all(not x.ok and str([pids[2]]) in x.reason for _, x in done)  # type: ignore[attr-defined]
    optimize(h, pids)
    assert len(h.take(m.ProbePlan)) == 3
    h.state.tick(time.monotonic() + 3600)
    done = h.take(m.TopologyDone)
    assert sorted(p for p, _ in done) == pids
    assert all(not x.ok and "in time" in x.reason for _, x in done)  # type: ignore[attr-defined]


def test_auto_optimize_probes_newcomers_before_their_epoch_incrementally() -> None:
    h = Harness(config=Config(auto_optimize_topology=True))
    a, b = h.admit(2)  # two peers: one ring, nothing to probe
    c = h.join()
    d = h.join()
    everyone = [a, b, c, d]
    gbps = rates({frozenset((a, b)), frozenset((c, d))}, everyone)
    h.vote(a, b)
    assert not h.take(m.Topology)  # the epoch waits for the probes
    plans = answer_plans(h, gbps)
    assert sorted(plans) == everyone  # the pending newcomers probe and are probed too
    (_, topo), *_ = h.take(m.Topology)
    ring = ring_ids(topo)  # type: ignore[arg-type]
    assert sorted(ring) == everyone
    hops = {frozenset((ring[i], ring[(i + 1) % 4])) for i in range(4)}
    assert frozenset((a, b)) not in hops and frozenset((c, d)) not in hops
    h.ready()
    h.take()
    # A later newcomer: only its own links are probed.
    e = h.join()
    for q in everyone:
        gbps[(q, e)] = gbps[(e, q)] = FAST
    h.vote(*everyone)
    plans = answer_plans(h, gbps)
    probed = {frozenset((p, t)) for p, plan in plans.items() for t, _, _ in plan.targets if t}
    assert probed == {frozenset((q, e)) for q in everyone}
    (_, topo), *_ = h.take(m.Topology)
    assert sorted(ring_ids(topo)) == [*everyone, e]  # type: ignore[arg-type]


def test_a_large_group_is_solved_off_the_loop_and_a_departure_drops_the_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above EXACT_MAX peers the heuristic runs in a worker thread (phase SOLVING) while the
    loop keeps running; the group stays busy until the decision, which then re-wires it. A
    departure while solving fails the round retryably and its late result changes nothing."""
    import asyncio
    import threading
    from typing import Any

    from pccl.master import optimize as optimize_mod
    from pccl.master.optimize import OptPhase
    from pccl.master.topology import EXACT_MAX

    started, go, solved = threading.Event(), threading.Event(), threading.Event()

    def solve_and_tell(*args: Any, **kwargs: Any) -> Any:
        # Held until the test has seen the loop run on while the solve is in progress.
        started.set()
        try:
            if not go.wait(20):
                raise TimeoutError("the test never released the solver")
            return real_solve(*args, **kwargs)
        finally:
            solved.set()

    real_solve = optimize_mod.solve_ring
    monkeypatch.setattr(optimize_mod, "solve_ring", solve_and_tell)

    async def scenario() -> None:
        for leave in (False, True):
            h = Harness()
            pids = h.admit(EXACT_MAX + 3)
            slow = {frozenset((p, q)) for p, q in itertools.pairwise(pids)}
            optimize(h, pids)
            answer_plans(h, rates(slow, pids))
            rnd = h.state.optimizer.rounds[0]
            assert rnd.phase is OptPhase.SOLVING and h.state.optimizer.busy(0)
            assert not h.take(m.Topology)  # nothing decided on the loop's step
            if leave:
                h.drop(pids[-1], "gone")
                failed = h.take(m.TopologyDone)
                assert failed and all(not x.ok for _, x in failed)  # type: ignore[attr-defined]
            # The loop keeps running while the solver thread is busy: other work gets steps.
            steps = 0
            while not started.is_set() or steps < 3:
                await asyncio.sleep(0.001)
                steps += 1
                assert steps < 20_000, "the solver thread never started"
            assert h.state.optimizer.rounds.get(0) is (None if leave else rnd)
            go.set()
            t_end = time.monotonic() + 10
            while not solved.is_set() or (not leave and 0 in h.state.optimizer.rounds):
                await asyncio.sleep(0.005)  # until solved and, when still wanted, applied
                assert time.monotonic() < t_end, "no decision 10 s after the solver ran"
            for e in (started, go, solved):
                e.clear()
            await asyncio.sleep(0.2)  # an abandoned round's result reaches the loop too
            topo = h.take(m.Topology)
            if leave:  # the late result of an abandoned round changes nothing
                assert not topo and 0 not in h.state.optimizer.rounds
                assert 0 not in h.state.optimizer.last
            else:
                assert topo and h.state.optimizer.last[0]["decision"] == "rewired"

    asyncio.run(scenario())
