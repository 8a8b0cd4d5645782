"""The ring solver (pccl.master.topology): exact against an independent brute force, the
heuristic on planted instances, determinism, the probe schedule and the link table."""

from __future__ import annotations

import itertools
import random

import pytest
from pccl.master.topology import LinkTable, evaluate, probe_rounds, solve_ring


def brute_force(peers: list[int], gbps: dict, rtt: dict) -> tuple[float, float]:
    """Best (bottleneck, total RTT) over every directed cyclic order, written independently."""
    best: tuple[float, float] | None = None
    first, rest = peers[0], peers[1:]
    for perm in itertools.permutations(rest):
        order = [first, *perm]
        hops = [(order[i], order[(i + 1) % len(order)]) for i in range(len(order))]
        low = min(gbps.get(h, 0.0) for h in hops)
        total = sum(rtt.get(h, 1e6) for h in hops)
        if best is None or (-low, total) < (-best[0], best[1]):
            best = (low, total)
    assert best is not None
    return best


def random_links(rng: random.Random, peers: list[int], symmetric: bool = True) -> tuple[dict, dict]:
    gbps: dict = {}
    rtt: dict = {}
    for a, b in itertools.combinations(peers, 2):
        g = rng.choice([0.1, 0.1, 1.0, 1.0, 1.0, 10.0]) * rng.uniform(0.9, 1.1)
        r = rng.uniform(1, 100)
        gbps[(a, b)] = g
        gbps[(b, a)] = g if symmetric else g * rng.uniform(0.5, 1.5)
        rtt[(a, b)] = rtt[(b, a)] = r
    return gbps, rtt


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
def test_exact_matches_brute_force(n: int) -> None:
    rng = random.Random(n)
    for _ in range(20):
        peers = rng.sample(range(1, 1000), n)
        gbps, rtt = random_links(rng, peers)
        plan = solve_ring(peers, gbps, rtt)
        assert plan.exact
        assert sorted(plan.order) == sorted(peers)
        want = brute_force(sorted(peers), gbps, rtt)
        assert evaluate(plan.order, gbps, rtt) == pytest.approx(want)
        assert (plan.bottleneck_gbps, plan.total_rtt_ms) == pytest.approx(want)


def test_exact_bottleneck_with_asymmetric_links() -> None:
    rng = random.Random(7)
    for _ in range(20):
        peers = list(range(1, 7))
        gbps, rtt = random_links(rng, peers, symmetric=False)
        plan = solve_ring(peers, gbps, rtt)
        # The search folds both directions into one weight; the directed optimum bounds the
        # pick from above, and the pick is never below the best order's slower direction.
        best = brute_force(peers, gbps, rtt)
        undirected = {k: min(gbps[k], gbps[(k[1], k[0])]) for k in gbps}
        assert plan.bottleneck_gbps <= best[0] + 1e-12
        assert plan.bottleneck_gbps >= 0.5 * brute_force(peers, undirected, rtt)[0]


def planted(rng: random.Random, n: int) -> tuple[list[int], dict, dict, float]:
    """A hidden ring of fast links (>= 8 Gbit/s) among slow ones (<= 1 Gbit/s)."""
    peers = rng.sample(range(1, 10_000), n)
    hidden = peers[:]
    rng.shuffle(hidden)
    gbps: dict = {}
    rtt: dict = {}
    for a, b in itertools.combinations(peers, 2):
        g = rng.uniform(0.05, 1.0)
        gbps[(a, b)] = gbps[(b, a)] = g
        rtt[(a, b)] = rtt[(b, a)] = rng.uniform(10, 100)
    low = 1e9
    for i in range(n):
        a, b = hidden[i], hidden[(i + 1) % n]
        g = rng.uniform(8, 10)
        low = min(low, g)
        gbps[(a, b)] = gbps[(b, a)] = g
    return peers, gbps, rtt, low


@pytest.mark.parametrize("n", [6, 8, 12, 24, 48])
def test_heuristic_finds_a_planted_fast_ring(n: int) -> None:
    rng = random.Random(100 + n)
    for _ in range(3):
        peers, gbps, rtt, low = planted(rng, n)
        plan = solve_ring(peers, gbps, rtt, exact_max=0)
        assert not plan.exact
        assert sorted(plan.order) == sorted(peers)
        assert plan.bottleneck_gbps >= 8.0  # no slow hop
        if n <= 8:
            exact = solve_ring(peers, gbps, rtt)
            assert plan.bottleneck_gbps == pytest.approx(exact.bottleneck_gbps)
        assert plan.bottleneck_gbps <= low + 1e-12 or plan.bottleneck_gbps >= 8.0


def test_heuristic_is_close_to_exact_on_random_instances() -> None:
    rng = random.Random(3)
    worse = 0
    for _ in range(30):
        peers = list(range(1, 9))
        gbps, rtt = random_links(rng, peers)
        h = solve_ring(peers, gbps, rtt, exact_max=0)
        e = solve_ring(peers, gbps, rtt)
        assert h.bottleneck_gbps <= e.bottleneck_gbps + 1e-12
        worse += h.bottleneck_gbps < e.bottleneck_gbps - 1e-12
    assert worse <= 3  # the bottleneck is exact in at least 90 % of random instances


def test_solution_is_deterministic_whatever_the_input_order() -> None:
    rng = random.Random(11)
    for n in (5, 14):
        peers = rng.sample(range(1, 500), n)
        gbps, rtt = random_links(rng, peers)
        want = solve_ring(peers, gbps, rtt)
        for _ in range(5):
            shuffled = peers[:]
            rng.shuffle(shuffled)
            items = list(gbps.items())
            rng.shuffle(items)
            got = solve_ring(shuffled, dict(items), dict(reversed(list(rtt.items()))))
            assert got == want
        assert want.order[0] == min(peers)


def test_rtt_breaks_bottleneck_ties() -> None:
    peers = [1, 2, 3, 4]
    gbps = {(a, b): 1.0 for a in peers for b in peers if a != b}
    rtt = {(a, b): 50.0 for a in peers for b in peers if a != b}
    for a, b in ((1, 3), (3, 2), (2, 4), (4, 1)):
        rtt[(a, b)] = rtt[(b, a)] = 1.0
    plan = solve_ring(peers, gbps, rtt)
    assert plan.total_rtt_ms == pytest.approx(4.0)
    assert plan.order in ((1, 3, 2, 4), (1, 4, 2, 3))


def test_unmeasured_links_are_avoided() -> None:
    peers = [1, 2, 3, 4]
    gbps = {(a, b): 1.0 for a in peers for b in peers if a != b}
    del gbps[(1, 2)], gbps[(2, 1)]
    plan = solve_ring(peers, gbps, {})
    assert plan.bottleneck_gbps == 1.0
    hops = {(plan.order[i], plan.order[(i + 1) % 4]) for i in range(4)}
    assert (1, 2) not in hops and (2, 1) not in hops


@pytest.mark.parametrize("n", [1, 2, 3, 6, 7, 16])
def test_probe_rounds_pair_everyone_once_without_sharing_an_endpoint(n: int) -> None:
    peers = list(range(10, 10 + n))
    rounds = probe_rounds(peers)
    seen = [p for r in rounds for p in r]
    assert sorted(seen) == sorted(itertools.combinations(peers, 2))
    for r in rounds:
        ends = [x for p in r for x in p]
        assert len(ends) == len(set(ends))
    assert len(rounds) <= max(n, 1)


def test_link_table_missing_refresh_and_ring_feedback() -> None:
    t = LinkTable()
    t.record_probe(1, 2, 0.5, 10.0, now=100.0)
    t.record_probe(2, 1, 0.5, 10.0, now=100.0)
    t.record_probe(1, 3, 0.5, 10.0, now=100.0)  # only one direction of (1, 3)
    assert t.missing([1, 2, 3], 0, now=101.0) == [(1, 3), (2, 3)]
    assert t.missing([1, 2, 3], 50.0, now=200.0) == [(1, 2), (1, 3), (2, 3)]
    t.record_ring(1, 2, 0.9)  # the ring did better than the probe: raise the estimate
    t.record_ring(1, 2, 0.2)  # a slower operation never lowers it
    t.record_ring(3, 2, 5.0)  # never probed: ignored
    g, _ = t.weights([1, 2])
    assert g == {(1, 2): 0.9, (2, 1): 0.5}
    mat = t.matrix([1, 2, 3])
    assert mat["gbps"] == [[None, 0.9, 0.5], [0.5, None, None], [None, None, None]]
    t.forget(1)
    assert set(t.links) == set()
